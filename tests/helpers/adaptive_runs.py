"""Running tests/helpers/adaptive_callback_child.py and checking its saves against the adaptive formula.

The policy: ``kind = "adaptive"``, ``max_overhead = "50%"``, ``min_every = "0.1s"``.  Its interval,
from saverules.engine.cost (``adaptive_interval`` of the ``estimate``), written out here:

    (c, w) = the mean of the last 3 reported costs;  T = max(min_every, c / max_overhead, w)

and T = min_every before any cost.  The callbacks report synchronous saves, so w = c.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CHILD = HERE / "adaptive_callback_child.py"

POLICY = 'version = 1\n[[rules]]\nkind = "adaptive"\nmax_overhead = "50%"\nmin_every = "0.1s"\n'
MIN_EVERY = 0.1
MAX_OVERHEAD = 0.5
#: rank 0's model sleeps this long in the i-th save of a run: the third save costs far more
SLEEPS = (0.1, 0.1, 1.5)


def interval(costs) -> float:
    """T for the costs reported so far (oldest first)."""
    last = [tuple(c) for c in costs][-3:]
    if not last:
        return MIN_EVERY
    c = sum(s for s, _ in last) / len(last)
    w = sum(x for _, x in last) / len(last)
    return max(MIN_EVERY, c / MAX_OVERHEAD, w)


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(REPO), str(HERE), e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    e["OMP_NUM_THREADS"] = "1"
    e["PYTHONUNBUFFERED"] = "1"
    return e


def launch(framework: str, out: Path, policy: Path, *extra: str, ddp: bool = False, killed: bool = False,
           timeout: float = 240) -> subprocess.CompletedProcess:
    """One run of the child (under torchrun for HF with ``ddp``); ``killed``: it must end by SIGKILL."""
    args = [framework, str(out), str(policy), "--sleeps", ",".join(map(str, SLEEPS)), *extra]
    if ddp and framework == "hf":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(CHILD), *args]
    else:
        cmd = [sys.executable, str(CHILD), *args, *(["--ddp"] if ddp else [])]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=timeout, start_new_session=True)
    if killed:
        assert proc.returncode != 0, "the run was to be killed after its third save"
        if not ddp or framework == "lightning":
            assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    else:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def manifests(out: Path, framework: str) -> list[dict]:
    """Every saverules manifest the run wrote, by step."""
    if framework == "hf":
        files = list(out.glob("checkpoint-*/saverules-manifest.json"))
    else:
        files = list((out / "ckpts").glob("*.ckpt.saverules-manifest.json"))
    docs = [json.loads(f.read_text()) for f in files]
    return sorted(docs, key=lambda d: d["step"])


def result(out: Path, rank: int = 0) -> dict:
    return json.loads((out / f"result-rank{rank}.json").read_text())


def check_intervals(docs: list[dict], slack: float) -> list[float]:
    """Every adaptive save came T after the save before it (never earlier, at most ``slack`` later),
    T from the costs recorded at that save; the gaps' intervals T, in order."""
    assert docs, "no save was made"
    used = []
    previous = None
    for doc in docs:
        reasons = doc["reasons"]
        costs = previous["save_costs"] if previous is not None else []
        anchor = previous["time"] if previous is not None else 0.0
        if any(r.startswith("adaptive") for r in reasons):
            t = interval(costs)
            gap = doc["time"] - anchor
            assert t - 1e-9 <= gap <= t + slack, (doc["step"], gap, t, reasons)
            used.append(t)
        previous = doc
    return used
