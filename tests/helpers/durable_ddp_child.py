"""A rank of tests/store/test_durable_ddp.py: DDP (not sharded) with a durable tier, run under torchrun.

    torchrun --nproc_per_node 2 tests/helpers/durable_ddp_child.py ACTION LOCAL_DIR URL OUT

``train``: every rank makes a Checkpointer (format "pt": rank 0 writes) with
``durable=URL`` and takes 4 steps; the durable tier saves steps 2 and 4.
``resume``: every rank makes one on LOCAL_DIR (a new node: empty) and
resumes.  Each rank writes ``OUT/<action>-rank<R>.json``: the step resumed,
the tier it came from, and the state it holds.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import saverules
from saverules import Progress
from saverules.torch import Checkpointer

POLICY = """
version = 1
final = false
[[rules]]
kind = "every_steps"
every = 1
[durable]
final = false
[[durable.rules]]
kind = "every_steps"
every = 2
"""


def main() -> None:
    action, local, url, out = sys.argv[1], Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    policy = saverules.loads(POLICY)
    state = {"w": torch.zeros(4), "n": 0}
    report: dict = {"rank": rank}
    with Checkpointer(policy, dir=local, durable=url, sync={"sync_seconds": 1e9}) as ckpt:
        if action == "train":
            for step in range(1, 5):
                state["w"] += step
                state["n"] = step
                ckpt.step(Progress(step, total_steps=4, time=float(step)), state)
            ckpt.close(timeout=120)
        else:
            found = ckpt.load_latest(state, if_none_valid="start_fresh")
            report["step"] = None if found is None else found.step
            report["resumed_from"] = ckpt.resumed_from
    report["w"] = state["w"].tolist()
    report["n"] = state["n"]
    (out / f"{action}-rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
