"""A trainer run with an adaptive policy and a save whose cost really changes, for tests/integrations.

    python tests/helpers/adaptive_callback_child.py {hf,lightning} OUT POLICY [--ddp] [--resume]
        [--kill-after-saves K] [--max-steps N] [--sleeps 0.1,0.1,0.5] [--step-sleep S] [--sync-seconds S]

The model's ``state_dict`` (HF: what ``save_pretrained`` writes; Lightning: what
``save_checkpoint`` dumps) sleeps ``sleeps[i]`` seconds at the i-th save of the run
(the last value for every later save), on rank 0 only: the other ranks wait for it in
the save's own collectives, as they wait for a real writer.  Each training step sleeps
``--step-sleep`` so that steps have a steady length.

``--kill-after-saves K``: once the K-th save of this process has ended (after the
callback's ``on_save`` / save), every rank waits for the others and SIGKILLs itself.
At the end each rank writes OUT/result-rank{R}.json: its saved steps, its decider's
costs and the collectives the decider issued.  HF under torchrun: ``--ddp`` is implied
by the launcher; Lightning: ``--ddp`` runs strategy="ddp" on two CPU processes.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


class SlowSave:
    """Counts saves; sleeps the i-th save's time on rank 0."""

    def __init__(self, sleeps: list[float]):
        self.sleeps = sleeps
        self.saves = 0

    def sleep(self, rank: int) -> None:
        seconds = self.sleeps[min(self.saves, len(self.sleeps) - 1)]
        self.saves += 1
        if rank == 0:
            time.sleep(seconds)


def die(ddp: bool) -> None:
    if ddp:
        import torch.distributed as dist

        dist.barrier()  # every rank has finished the save before any dies
    os.kill(os.getpid(), signal.SIGKILL)


def result(out: str, rank: int, cb, extra: dict) -> None:
    decider = cb._decider
    data = {"saved": cb.saved_steps, "save_costs": [list(c) for c in cb.save_costs],
            "decider_costs": None if decider is None else decider.state_dict().get("costs"),
            "collectives": getattr(decider, "collectives", None), "syncs": getattr(decider, "syncs", None), **extra}
    with open(os.path.join(out, f"result-rank{rank}.json"), "w") as f:
        json.dump(data, f)


def run_hf(a) -> None:
    import torch
    from hf_common import Points, TinyRegressor
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from saverules.transformers import SaverulesCallback, last_good_checkpoint

    slow = SlowSave(a.sleeps)
    rank = int(os.environ.get("RANK", "0"))

    class Slow(TinyRegressor):
        def state_dict(self, *args, **kwargs):
            slow.sleep(rank)
            return super().state_dict(*args, **kwargs)

    class Steps(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            time.sleep(a.step_sleep)

        def on_save(self, args, state, control, **kw):
            if a.kill_after_saves and len(cb.saved_steps) == a.kill_after_saves:
                die(args.world_size > 1)

    cb = SaverulesCallback(a.policy, sync_seconds=a.sync_seconds)
    torch.manual_seed(0)
    args = TrainingArguments(
        output_dir=a.out, max_steps=a.max_steps, per_device_train_batch_size=8, learning_rate=0.01,
        save_strategy="no", report_to=[], logging_strategy="no", disable_tqdm=True, use_cpu=True,
        dataloader_num_workers=0, seed=0, data_seed=0)
    trainer = Trainer(model=Slow(), args=args, train_dataset=Points(64), callbacks=[cb, Steps()])
    resume = last_good_checkpoint(a.out) if a.resume else None
    trainer.train(resume_from_checkpoint=resume)
    result(a.out, trainer.args.process_index, cb, {"resumed": resume})


def run_lightning(a) -> None:
    import lightning.pytorch as L
    from lightning_common import loader, make_trainer, module_class

    from saverules.lightning import SaverulesCheckpoint

    slow = SlowSave(a.sleeps)

    class Slow(module_class()):  # type: ignore[misc]
        def on_save_checkpoint(self, checkpoint):
            slow.sleep(self.global_rank)

        def training_step(self, batch, batch_idx):
            time.sleep(a.step_sleep)
            return super().training_step(batch, batch_idx)

    class Kill(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if a.kill_after_saves and len(cb.saved_steps) == a.kill_after_saves:
                die(trainer.world_size > 1)

    cb = SaverulesCheckpoint(a.policy, dirpath=os.path.join(a.out, "ckpts"), sync_seconds=a.sync_seconds)
    resume = SaverulesCheckpoint.last_good(os.path.join(a.out, "ckpts")) if a.resume else None
    kw = dict(strategy="ddp", devices=2) if a.ddp else {}
    L.seed_everything(0, workers=True, verbose=False)
    trainer = make_trainer(a.out, [cb, Kill()], max_steps=a.max_steps, **kw)
    trainer.fit(Slow(), loader(16, 16), ckpt_path=resume)
    result(a.out, trainer.global_rank, cb, {"resumed": resume})


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("framework", choices=["hf", "lightning"])
    p.add_argument("out")
    p.add_argument("policy")
    p.add_argument("--ddp", action="store_true")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--kill-after-saves", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=60)
    p.add_argument("--sleeps", type=lambda s: [float(x) for x in s.split(",")], default=[0.1, 0.1, 0.5])
    p.add_argument("--step-sleep", type=float, default=0.02)
    p.add_argument("--sync-seconds", type=float, default=0.2)
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    (run_hf if a.framework == "hf" else run_lightning)(a)


if __name__ == "__main__":
    main()
