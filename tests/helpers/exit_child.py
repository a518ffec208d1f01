"""A rank that saves a sharded checkpoint and leaves without closing anything (run under torchrun).

    torchrun --nproc_per_node 2 tests/helpers/exit_child.py OUT [--late SECONDS]

Rank 0 saves asynchronously and returns from its script at once; with
``--late``, rank 1 joins that save only SECONDS later, so rank 0's writer
thread is inside the save's collectives while rank 0's interpreter exits.
An ``atexit`` handler registered before saverules is imported (so it runs after saverules' own)
writes OUT/exit-rank{R}.json: the process groups and gloo threads still alive
when the interpreter is about to finalize.
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import time


def report(out: str, rank: int) -> None:
    import threading

    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _world

    threads: dict[str, int] = {}
    for t in threading.enumerate():
        threads[f"python: {t.name}"] = threads.get(f"python: {t.name}", 0) + 1
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                name = f.read().strip()
        except OSError:
            continue
        threads[name] = threads.get(name, 0) + 1
    groups = len(_world.pg_map) if dist.is_initialized() else 0
    with open(os.path.join(out, f"exit-rank{rank}.json"), "w") as f:
        json.dump({"groups": groups, "threads": threads}, f)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--late", type=float, default=0.0)
    a = ap.parse_args()
    # registered before saverules is imported (and registers its own handlers): atexit runs it after them
    atexit.register(report, a.out, int(os.environ["RANK"]))
    import torch
    import torch.distributed as dist

    import saverules
    from saverules.torch import Checkpointer

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64)
    policy = saverules.loads('version = 1\nfinal = false\n[[rules]]\nkind = "every_steps"\nevery = 1\n'
                             '[storage]\nformat = "dcp"\n')
    ckpt = Checkpointer(policy, dir=os.path.join(a.out, "store"), async_save=True)
    if rank == 1:
        time.sleep(a.late)
    assert ckpt.step(saverules.Progress(1), {"model": model})
    print(f"rank {rank} leaves without closing", flush=True)


if __name__ == "__main__":
    main()
