"""Running tests/helpers/integ_child.py: a held run to kill or signal, and a plain run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def env():
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(REPO), e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    e.setdefault("OMP_NUM_THREADS", "1")
    return e


def command(framework, out, policy, *extra):
    return [sys.executable, str(HERE / "integ_child.py"), framework, str(out), str(policy), *extra]


def run(framework, out, policy, *extra, timeout=180):
    proc = subprocess.run(command(framework, out, policy, *extra), env=env(), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def held(framework, out, policy, step, *extra):
    """Start a run that holds at the start of ``step``; return the process once it is holding."""
    out = Path(out)
    proc = subprocess.Popen(command(framework, out, policy, "--hold-at", str(step), *extra), env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "held").exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before holding:\n{proc.stderr.read()[-4000:]}")
        assert time.monotonic() < deadline, "the run never reached the step to hold at"
        time.sleep(0.05)
    return proc


def kill_held(framework, out, policy, step):
    proc = held(framework, out, policy, step)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    return proc


def result(out, rank=0):
    return json.loads((Path(out) / f"result-rank{rank}.json").read_text())
