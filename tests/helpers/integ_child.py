"""A training run in its own process, for the kill / SIGTERM / DDP tests of the trainer integrations.

    python tests/helpers/integ_child.py {hf,lightning} OUT POLICY [--hold-at K] [--release FILE]
                                [--resume] [--ddp] [--max-steps N]

``--hold-at K`` stops at the start of step K, writes OUT/held, and waits: for
ever (the test SIGKILLs it), or until the file given by ``--release`` exists
(the test sends a signal first).  At the end it writes OUT/result-rank{R}.json
with the steps this process saved and the collectives its decider issued.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def hold(out: str, release) -> None:
    with open(os.path.join(out, "held"), "w") as f:
        f.write(str(os.getpid()))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if release and os.path.exists(release):
            return
        time.sleep(0.01)
    raise SystemExit("integ_child: held for 120 s and nobody came")


def result(out: str, rank: int, cb, extra: dict) -> None:
    decider = cb._decider
    data = {"saved": cb.saved_steps, "removed": cb.removed,
            "collectives": getattr(decider, "collectives", None), **extra}
    with open(os.path.join(out, f"result-rank{rank}.json"), "w") as f:
        json.dump(data, f)


def run_hf(a) -> None:
    from hf_common import make_trainer
    from transformers import TrainerCallback

    from saverules.transformers import SaverulesCallback, last_good_checkpoint

    class Hold(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if a.hold_at and state.global_step + 1 == a.hold_at and args.process_index == 0:
                hold(a.out, a.release)

    cb = SaverulesCallback(a.policy)
    trainer = make_trainer(a.out, [cb, Hold()], max_steps=a.max_steps)
    resume = last_good_checkpoint(a.out) if a.resume else None
    trainer.train(resume_from_checkpoint=resume)
    result(a.out, trainer.args.process_index, cb, {"global_step": trainer.state.global_step, "resumed": resume})


def run_lightning(a) -> None:
    import lightning.pytorch as L
    from lightning_common import fit

    from saverules.lightning import SaverulesCheckpoint

    class Hold(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if a.hold_at and trainer.global_step + 1 == a.hold_at and trainer.is_global_zero:
                hold(a.out, a.release)

    cb = SaverulesCheckpoint(a.policy, dirpath=os.path.join(a.out, "ckpts"))
    resume = SaverulesCheckpoint.last_good(os.path.join(a.out, "ckpts")) if a.resume else None
    kw = dict(strategy="ddp", devices=2) if a.ddp else {}
    try:
        trainer, _ = fit(a.out, [cb, Hold()], ckpt_path=resume, max_steps=a.max_steps, **kw)
    finally:
        rank = int(os.environ.get("LOCAL_RANK", "0"))
        result(a.out, rank, cb, {"resumed": resume})


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("framework", choices=["hf", "lightning"])
    p.add_argument("out")
    p.add_argument("policy")
    p.add_argument("--hold-at", type=int, default=0)
    p.add_argument("--release")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--ddp", action="store_true")
    p.add_argument("--max-steps", type=int, default=130)
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    (run_hf if a.framework == "hf" else run_lightning)(a)
    import torch.distributed as dist

    # The job's default group belongs to the script: destroyed before the interpreter finalizes, so that no
    # native thread of it is alive then (docs/distributed.md, "Ending the job"; issue 16, item 14).
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
