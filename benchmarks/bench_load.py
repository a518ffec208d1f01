"""Resume: ``load_latest`` against ``torch.load`` + ``load_state_dict``, side by side, at ~200 MB and ~1 GB.

The load rows of the save benchmark on their own, with more rounds, so that a
change to the read path can be measured without running every writer.  Each
round runs the four loads in a rotated order (model + AdamW state, restored
into the same model and optimizer each time, from the page cache):
``torch.load(weights_only=True)`` and ``torch.load(mmap=True)``, each
followed by ``load_state_dict`` of both, against ``Checkpointer.load_latest``
(every digest checked) and ``load_latest(mmap=True)`` from a new Checkpointer.
The load average when the run began and ended goes in each row's note: the
ratios hold for one run, on one machine state.
"""
from __future__ import annotations

import gc
import os
import shutil
import tempfile
import time
from pathlib import Path

from . import Row, median

NAME = "load"
LOAD_GOAL = 1.00  # load_latest / (torch.load(weights_only) + load_state_dict)
MMAP_GOAL = 1.10  # load_latest(mmap=True) / (torch.load(mmap=True) + load_state_dict)


def _load_average() -> str:
    return f"load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "load average unknown"


def run(quick: bool = False) -> list:
    from .bench_save import CASES, QUICK_CASES, _loads, _state

    cases = QUICK_CASES if quick else CASES
    rounds = 1 if quick else 5
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="saverules-bench-", dir=os.environ.get("BENCH_TMPDIR")) as tmp:
        base = Path(tmp)
        for label, preset, layers in cases:
            model, opt = _state(preset, layers)
            loads = _loads(model, opt, base)
            res: dict[str, list[float]] = {k: [] for k in loads}
            before = _load_average()
            for r in range(rounds + 1):  # round 0 warms up
                k = r % len(loads)
                for name in list(loads)[k:] + list(loads)[:k]:
                    gc.collect()
                    t0 = time.perf_counter()
                    loads[name]()
                    if r > 0:
                        res[name].append(time.perf_counter() - t0)
            note = f"{before} at the start, {_load_average()} at the end; {rounds} rounds"
            m = {k: median(v) for k, v in res.items()}
            rows += [
                Row(NAME, f"{label}: torch.load(weights_only) + load_state_dict", m["torch.load"], "s",
                    samples=res["torch.load"], note=note),
                Row(NAME, f"{label}: load_latest (digests checked)", m["load_latest"], "s",
                    ratio=m["load_latest"] / m["torch.load"], vs="torch.load + load_state_dict",
                    goal=f"<= {LOAD_GOAL:g}x torch.load", met=m["load_latest"] <= LOAD_GOAL * m["torch.load"],
                    samples=res["load_latest"]),
                Row(NAME, f"{label}: torch.load(mmap=True) + load_state_dict", m["torch.load mmap"], "s",
                    samples=res["torch.load mmap"]),
                Row(NAME, f"{label}: load_latest(mmap=True) (digests checked)", m["load_latest mmap"], "s",
                    ratio=m["load_latest mmap"] / m["torch.load mmap"], vs="torch.load(mmap=True) + load_state_dict",
                    goal=f"<= {MMAP_GOAL:g}x torch.load(mmap=True)",
                    met=m["load_latest mmap"] <= MMAP_GOAL * m["torch.load mmap"], samples=res["load_latest mmap"]),
            ]
            del loads, model, opt
            gc.collect()
            for p in base.iterdir():
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    # The sharded row: 2 ranks resuming format "dcp", against dcp.load (benchmarks/bench_load_sharded.py);
    # the time to resume of the reference loop (benchmarks/bench_resume.py).
    from . import bench_load_sharded, bench_resume

    rows += bench_load_sharded.run(quick)
    rows += bench_resume.run(quick)
    return rows
