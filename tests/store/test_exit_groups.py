"""At exit, saverules leaves no process group of its own alive, and a sharded save in flight ends cleanly.

Issue 16, item 14: a rank died by SIGABRT ("terminate called without an
active exception") at exit. A native thread that wakes during the
interpreter's finalization and asks for the GIL is ended by CPython, and the
unwinding through a C++ destructor aborts the process (tools/exit_abort.py
shows it). saverules therefore finishes its writes and destroys the gloo
group of sharded saves in atexit handlers, while the interpreter is whole.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from saverules.store.verify import scan

ROOT = Path(__file__).resolve().parents[2]


def torchrun(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", SAVERULES_COMMIT_TIMEOUT="60")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "helpers" / "exit_child.py"), str(out), *args]
    return subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=240)


@pytest.mark.slow
@pytest.mark.parametrize("late", [0.0, 2.0])
def test_ranks_leave_no_group_of_saverules_alive_and_never_abort(tmp_path, late):
    proc = torchrun(tmp_path, "--late", str(late))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "terminate called" not in out and "SIGABRT" not in out
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"exit-rank{rank}.json").read_text())
        # only the job's own default group is left: the sharded saves' gloo group was destroyed, its threads ended
        assert seen["groups"] == 1, seen
        assert seen["threads"].get("pt_gloo_runloop", 0) <= 2, seen  # the default group's workers only
        # the writer and hash threads ended: only the main thread is left
        assert [k for k in seen["threads"] if k.startswith("python: ")] == ["python: MainThread"], seen
    infos = scan(tmp_path / "store", verify=True)
    assert [(i.step, i.ok) for i in infos] == [(1, True)]  # rank 0's save in flight at exit was committed
