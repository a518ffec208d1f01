"""A writer that runs into a real disk limit (tests/store/test_store_disk_full.py starts it).

    python tests/helpers/disk_full_child.py ROOT FSIZE_LIMIT STATE_MIB MODE:FORMAT [MODE:FORMAT ...]

Each scenario (MODE sync, async or warn; FORMAT tensors, torch or safetensors) opens a
store in ROOT/MODE-FORMAT and saves steps 1 and 2 with a state of STATE_MIB.
With FSIZE_LIMIT > 0 the process ignores SIGXFSZ and lowers its RLIMIT_FSIZE
to that many bytes around those saves, so a write past it fails with EFBIG
from the kernel, then lifts it and saves a small step 3.  With 0, ROOT is
expected to be a small file system that fills up.  Afterwards the scenario
records what a fresh store sees (checkpoints, leftovers, the step resume
picks) and deletes its directory, so the next scenario has the space again.
It prints one JSON line: a list with one entry per scenario.

Test fixture, not part of saverules.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import sys
import warnings

import torch
from store_common import policy_toml

import saverules
from saverules import Progress
from saverules.torch import Checkpointer, CheckpointError, CheckpointWarning


class Weights(torch.nn.Module):
    def __init__(self, mib: float, value: float = 1.0):
        super().__init__()
        self.w = torch.nn.Parameter(torch.full((int(mib * (1 << 20) / 4),), value))


def attempt(ck, mode, step, state):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CheckpointWarning)
        try:
            ck.save(Progress(step), state)
            if mode == "async":
                ck.wait()
            outcome = {"step": step, "raised": None}
        except CheckpointError as exc:
            outcome = {"step": step, "raised": type(exc).__name__, "errno": getattr(exc, "errno", None),
                       "path": getattr(exc, "path", None), "message": str(exc)}
    outcome["warnings"] = [str(w.message) for w in caught if issubclass(w.category, CheckpointWarning)]
    return outcome


def scenario(root, limit, mib, mode, fmt):
    directory = os.path.join(root, f"{mode}-{fmt}")
    text = policy_toml(1, fmt=fmt)
    policy = saverules.loads(text)
    ck = Checkpointer(policy, directory, async_save=mode == "async", on_error="warn" if mode == "warn" else "raise")
    state = {"model": Weights(mib), "note": "x"}
    attempts = []
    if limit:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    try:
        attempts.append(attempt(ck, mode, 1, state))
        attempts.append(attempt(ck, mode, 2, state))
    finally:
        if limit:
            resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    tmp_left = sorted(n for n in os.listdir(directory) if n.startswith(".tmp-"))
    if limit:
        attempts.append(attempt(ck, mode, 3, {"model": Weights(0.01, 3.0), "note": "y"}))
    ck.close()
    reader = Checkpointer(policy, directory, read_only=True)
    back = {"model": Weights(0.01 if limit else mib, 0.0), "note": None}
    resumed = reader.load_latest(back)
    result = {
        "mode": mode,
        "format": fmt,
        "attempts": attempts,
        "tmp_left": tmp_left,
        "checkpoints": [(info.name, info.verified) for info in reader.list()],
        "resumed": resumed.step if resumed is not None else None,
        "restored_value": back["model"].w.detach()[0].item() if resumed is not None else None,
    }
    shutil.rmtree(directory)
    return result


def main() -> None:
    root, limit, mib = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    results = []
    for item in sys.argv[4:]:
        mode, fmt = item.split(":")
        results.append(scenario(root, limit, mib, mode, fmt))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
