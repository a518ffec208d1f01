"""The sharded row of the save benchmark: 2 gloo ranks, FSDP2, ``format = "dcp"`` against DCP itself.

The state: the minimind "small" preset with 5 layers (17.4M parameters)
sharded over 2 ranks with ``fully_shard``, with AdamW's two moments, ~200 MB
in all (~100 MB per rank).  In interleaved rounds, on both ranks at once:

* ``dcp.save`` of ``get_state_dict(model, optimizer)`` with DCP's default
  file-system writer (which fsyncs every file);
* ``Checkpointer.save`` with ``format = "dcp"`` (the default ``verify="hash"``
  and ``verify="none"``): the same DCP files, plus each rank's digests, its
  rank file, the manifest and the commit across ranks;
* ``dcp.async_save`` with its defaults (``get_state_dict`` and DCP's staging
  copy to CPU memory before it returns);
* ``Checkpointer(async_save=True).save`` (``get_state_dict``, the copy of
  what is not left to the late copy into the store's reused buffers, one
  collective; the writer copies the parameters and AdamW's moments while
  the next step runs forward and backward, and holds that step's
  ``optimizer.step()`` until it is done: :mod:`saverules.store.staging`).

Every save is followed by one training step (forward, backward,
``optimizer.step()``) before the write is awaited.  The **stall** is all the
time the training thread is held by the save: until ``save`` returns, plus
the time from calling ``optimizer.step()`` to the moment a step pre-hook
registered after the store's own runs (which is when the store's hook lets
the step go).  The same probe runs for every variant, so the step's wait is
counted for DCP too (where it is nil).  The **step overhead** is the time of
save plus that training step, minus a training step without a save in the
same round: what a save costs the loop including the writer thread's
competition for the cores.  Every timing is the slowest rank's.  Throughput
is the bytes on disk over the time until the checkpoint is complete on every
rank.

Run by ``benchmarks/bench_save.py``: :func:`run` starts the 2 ranks with
``torch.distributed.run`` and collects the rows rank 0 writes.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import Row, held_training_step, median

NAME = "save"
ROOT = Path(__file__).resolve().parent.parent
STALL_GOAL = 0.25  # saverules' async stall / dcp.async_save's, at most
LABEL = "sharded, 2 ranks, ~200 MB (small, 5 layers, FSDP2 + AdamW)"
QUICK_LABEL = "sharded, 2 ranks (tiny, FSDP2 + AdamW)"

POLICY = """
version = 1
final = false
[[rules]]
kind = "every_steps"
every = 1000000000
[storage]
dir = "checkpoints"
format = "dcp"
"""


def run(quick: bool = False) -> list:
    with tempfile.TemporaryDirectory(prefix="saverules-bench-sharded-", dir=os.environ.get("BENCH_TMPDIR")) as tmp:
        out = Path(tmp) / "rows.json"
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   OMP_NUM_THREADS="1")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "benchmarks.bench_save_sharded", tmp, "quick" if quick else "full"]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"the sharded save benchmark failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        return [Row(**row) for row in json.loads(out.read_text())]


# --------------------------------------------------------------------------
# One rank (under torch.distributed.run)
# --------------------------------------------------------------------------

def _state(quick: bool):
    import torch
    from torch.distributed.fsdp import fully_shard

    from saverules.minimind.model import MiniMindLM, config_for

    torch.manual_seed(0)
    model = MiniMindLM(config_for("tiny" if quick else "small", num_hidden_layers=None if quick else 5))
    for block in model.layers:
        fully_shard(block)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # creates exp_avg / exp_avg_sq
    opt.zero_grad(set_to_none=True)
    return model, opt


def _slowest(seconds: float) -> float:
    import torch
    import torch.distributed as dist

    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _worker(tmp: str, mode: str) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    import saverules
    from saverules import Progress
    from saverules.torch import Checkpointer

    quick = mode == "quick"
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    base = Path(tmp)
    model, opt = _state(quick)
    state = {"model": model, "optimizer": opt, "step": 0}
    policy = saverules.loads(POLICY)
    ckpts = {
        "sync": Checkpointer(policy, base / "sr-sync", verify="hash"),
        "sync_noverify": Checkpointer(policy, base / "sr-none", verify="none"),
        "async": Checkpointer(policy, base / "sr-async", async_save=True, verify="hash"),
    }
    step = [0]
    dcp_group = dist.new_group(backend="gloo")
    train_step = held_training_step(model, opt, tokens=32 if quick else 64)  # returns how long the step was held

    def plain_step():
        dist.barrier()
        t0 = time.perf_counter()
        train_step()
        t1 = time.perf_counter()
        return t1 - t0, t1 - t0, None

    def dcp_sync():
        target = base / f"dcp-{step[0]}"
        dist.barrier()
        t0 = time.perf_counter()
        msd, osd = get_state_dict(model, opt)
        dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=str(target))
        t1 = time.perf_counter()
        return t1 - t0, t1 - t0, target

    def dcp_async():
        target = base / f"dcp-{step[0]}"
        dist.barrier()
        t0 = time.perf_counter()
        msd, osd = get_state_dict(model, opt)
        # A group of its own: its background collectives must not meet the training step's on the default group.
        fut = dcp.async_save({"model": msd, "optimizer": osd}, checkpoint_id=str(target), process_group=dcp_group)
        t1 = time.perf_counter()
        held = train_step()
        t2 = time.perf_counter()
        fut.result()
        t3 = time.perf_counter()
        return (t1 - t0) + held, t3 - t0, target, t2 - t0

    def ours(name):
        def measure():
            ck = ckpts[name]
            ck.wait()
            dist.barrier()
            t0 = time.perf_counter()
            ck.save(Progress(step[0], total_steps=10**9), state, reason="benchmark")
            t1 = time.perf_counter()
            if not ck.async_save:
                return t1 - t0, t1 - t0, ck.dir / policy.storage.render_name(step=step[0])
            held = train_step()
            t2 = time.perf_counter()
            ck.wait()
            t3 = time.perf_counter()
            return (t1 - t0) + held, t3 - t0, ck.dir / policy.storage.render_name(step=step[0]), t2 - t0
        return measure

    from saverules.store.sharded import state as dcp_state
    from saverules.store.snapshot import Snapshot

    pool = [{}]

    def copy_only():
        """The floor of any snapshot: copying this rank's shards into buffers already in memory."""
        _, tensors = dcp_state.get_state(state)
        dist.barrier()
        t0 = time.perf_counter()
        snap = Snapshot(pool[0])
        dcp_state.stage(tensors, snap.tensor)
        snap.finish()
        t1 = time.perf_counter()
        pool[0] = snap.release()
        return t1 - t0, t1 - t0, None

    variants = {"dcp_sync": dcp_sync, "dcp_async": dcp_async, "copy": copy_only, "plain_step": plain_step,
                **{n: ours(n) for n in ckpts}}
    rounds = 1 if quick else 5
    res = {k: [] for k in variants}
    names = list(variants)
    for r in range(rounds + 1):  # round 0 warms up (allocations, snapshot buffers, thread pools, page cache)
        k = r % len(names)
        for name in names[k:] + names[:k]:
            step[0] += 1
            got = variants[name]()
            stall, total, target = got[:3]
            stall, total = _slowest(stall), _slowest(total)
            with_step = _slowest(got[3]) if len(got) > 3 else None
            dist.barrier()
            size = _bytes(target) if rank == 0 and target is not None else 0
            if rank == 0 and target is not None:
                shutil.rmtree(target)  # outside the timing: keep the disk use flat
            dist.barrier()
            if r > 0:
                res[name].append((stall, total, size, with_step))
    for ck in ckpts.values():
        ck.close()

    if rank == 0:
        def med(name, i):
            return median([x[i] for x in res[name]])

        def tp(name):
            return med(name, 2) / 1e6 / med(name, 1)

        label = QUICK_LABEL if quick else LABEL
        dcp_tp, dcp_stall = tp("dcp_sync"), med("dcp_async", 0)
        ratio = med("async", 0) / dcp_stall
        plain = med("plain_step", 0)

        def overhead(name):
            return med(name, 3) - plain
        rows = [
            Row(NAME, f"{label}: checkpoint size (dcp.save)", med("dcp_sync", 2) / 1e6, "MB"),
            Row(NAME, f"{label}: checkpoint size (saverules)", med("sync", 2) / 1e6, "MB",
                note="the same DCP files, plus one rank file per rank and the manifest"),
            Row(NAME, f"{label}: dcp.save throughput", dcp_tp, "MB/s",
                samples=[x[2] / 1e6 / x[1] for x in res["dcp_sync"]]),
            Row(NAME, f"{label}: sync throughput (verify=hash)", tp("sync"), "MB/s", ratio=tp("sync") / dcp_tp,
                vs="dcp.save", samples=[x[2] / 1e6 / x[1] for x in res["sync"]],
                note="digests while writing, re-reads every file, manifest, commit across ranks"),
            Row(NAME, f"{label}: sync throughput (verify=none)", tp("sync_noverify"), "MB/s",
                ratio=tp("sync_noverify") / dcp_tp, vs="dcp.save",
                samples=[x[2] / 1e6 / x[1] for x in res["sync_noverify"]]),
            Row(NAME, f"{label}: dcp.async_save stall", dcp_stall, "s",
                samples=[x[0] for x in res["dcp_async"]], note="get_state_dict + DCP's default staging"),
            Row(NAME, f"{label}: async save stall", med("async", 0), "s", ratio=ratio, vs="dcp.async_save stall",
                goal=f"<= {STALL_GOAL:.0%} of dcp.async_save", met=ratio <= STALL_GOAL,
                samples=[x[0] for x in res["async"]],
                note="until save returns + the next optimizer.step()'s wait for the writer's copy"),
            Row(NAME, f"{label}: the whole copy in the training thread", med("copy", 0), "s",
                ratio=med("copy", 0) / dcp_stall, vs="dcp.async_save stall", samples=[x[0] for x in res["copy"]],
                note="this rank's shards copied into reused buffers: the stall if nothing were left to the late copy"),
            Row(NAME, f"{label}: a training step", plain, "s", samples=[x[0] for x in res["plain_step"]],
                note="forward, backward, optimizer.step(); no save"),
            Row(NAME, f"{label}: step overhead of dcp.async_save", overhead("dcp_async"), "s",
                ratio=overhead("dcp_async") / plain, vs="a training step",
                note="save + one step, minus a step without a save"),
            Row(NAME, f"{label}: step overhead of the async save", overhead("async"), "s",
                ratio=overhead("async") / overhead("dcp_async"), vs="dcp.async_save's step overhead",
                note="save + one step, minus a step without a save (the writer thread shares the 2 cores)"),
            Row(NAME, f"{label}: async throughput (verify=hash)", tp("async"), "MB/s", ratio=tp("async") / dcp_tp,
                vs="dcp.save", samples=[x[2] / 1e6 / x[1] for x in res["async"]],
                note="until committed, with a training step running meanwhile"),
            Row(NAME, f"{label}: dcp.async_save throughput", tp("dcp_async"), "MB/s",
                ratio=tp("dcp_async") / dcp_tp, vs="dcp.save",
                samples=[x[2] / 1e6 / x[1] for x in res["dcp_async"]],
                note="until written, with a training step running meanwhile"),
        ]
        (base / "rows.json").write_text(json.dumps([r.as_dict() for r in rows]))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
