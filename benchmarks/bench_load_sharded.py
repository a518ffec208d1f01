"""Sharded resume: 2 gloo ranks, FSDP2, ``load_latest`` of a ``format = "dcp"`` checkpoint against ``dcp.load``.

The same model and AdamW state as the sharded save rows (the small preset at
5 layers, ~200 MB, fully sharded over 2 ranks on the CPU).  The peer is
``get_state_dict`` + ``dcp.load`` + ``set_state_dict`` of a ``dcp.save`` of
that same state; saverules' side is ``Checkpointer.load_latest`` from a new
Checkpointer (so that every digest is checked again), restoring into the same
model and optimizer.  Each round runs both in a rotated order; a figure is the
slowest rank's time.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import Row, median

NAME = "load"
ROOT = Path(__file__).resolve().parent.parent
GOAL = 1.00  # load_latest / (dcp.load + set_state_dict)


def run(quick: bool = False) -> list:
    with tempfile.TemporaryDirectory(prefix="saverules-bench-sharded-", dir=os.environ.get("BENCH_TMPDIR")) as tmp:
        out = Path(tmp) / "rows.json"
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   OMP_NUM_THREADS="1")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "benchmarks.bench_load_sharded", tmp, "quick" if quick else "full"]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"the sharded load benchmark failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        return [Row(**row) for row in json.loads(out.read_text())]


def _worker(tmp: str, mode: str) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    import saverules
    from saverules import Progress
    from saverules.torch import Checkpointer

    from .bench_save_sharded import POLICY, _slowest, _state

    quick = mode == "quick"
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    base = Path(tmp)
    model, opt = _state(quick)
    state = {"model": model, "optimizer": opt, "step": 0}
    policy = saverules.loads(POLICY)
    ck = Checkpointer(policy, base / "sr")
    ck.save(Progress(1, total_steps=10**9), state, reason="benchmark")
    ck.close()
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=str(base / "dcp"))
    load_average = os.getloadavg()[0]

    def dcp_load() -> None:
        m, o = get_state_dict(model, opt)
        dcp.load({"model": m, "optimizer": o}, checkpoint_id=str(base / "dcp"))
        set_state_dict(model, opt, model_state_dict=m, optim_state_dict=o)

    def store_load() -> None:
        reader = Checkpointer(policy, base / "sr")
        got = reader.load_latest(state)
        reader.close()
        if got is None or got.step != 1:
            raise RuntimeError(f"load_latest resumed {got!r}, not step 1")

    variants = {"dcp.load": dcp_load, "load_latest": store_load}
    rounds = 1 if quick else 5
    res: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for r in range(rounds + 1):  # round 0 warms up
        k = r % len(names)
        for name in names[k:] + names[:k]:
            dist.barrier()
            t0 = time.perf_counter()
            variants[name]()
            took = _slowest(time.perf_counter() - t0)
            if r > 0:
                res[name].append(took)
    if rank == 0:
        mine, peer = median(res["load_latest"]), median(res["dcp.load"])
        label = "sharded, 2 ranks, " + ("tiny" if quick else "~200 MB (small, 5 layers, weights + AdamW)")
        note = f"load average {load_average:.1f} at the start, {os.getloadavg()[0]:.1f} at the end; {rounds} rounds"
        rows = [
            Row(NAME, f"{label}: dcp.load + set_state_dict", peer, "s", samples=res["dcp.load"], note=note),
            Row(NAME, f"{label}: load_latest, format dcp (digests checked)", mine, "s", ratio=mine / peer,
                vs="dcp.load + set_state_dict", goal=f"<= {GOAL:g}x dcp.load", met=mine <= GOAL * peer,
                samples=res["load_latest"]),
        ]
        (base / "rows.json").write_text(json.dumps([row.as_dict() for row in rows]))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
