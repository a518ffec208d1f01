"""Parity of converted policies with REAL trainer runs on CPU, read from the files they wrote.

For each setting: the trainer's own checkpoints on disk (every one it wrote, and the ones
left at the end) equal the converter's model of that trainer, and the converted
policy's simulation saves the same steps plus the final step where the trainer drops it.
"""
from __future__ import annotations

import os
import re

import pytest
from convert_common import converted

from saverules.importers import hf, lightning


def _check(policy, model_saved, model_kept, disk_saved, disk_kept, total, spe=None):
    assert model_saved == disk_saved  # the model of the trainer is what the trainer did
    assert model_kept == disk_kept
    sim = policy.simulate(total, spe)
    assert sim.saved_steps == sorted(set(disk_saved) | {total})  # what it saved, plus the final step


@pytest.mark.slow
@pytest.mark.parametrize("settings,total,spe", [
    ({"save_strategy": "steps", "save_steps": 12, "save_total_limit": 2}, 50, None),
    ({"save_strategy": "steps", "save_steps": 0.07}, 100, None),  # a share: ceil(100 * 0.07) is 8 in floating point
    ({"save_strategy": "epoch", "save_total_limit": 3}, 30, 8),   # 64 points in batches of 8; stops mid-epoch 4
])
def test_hf_trainer_parity(tmp_path, settings, total, spe):
    from hf_common import make_trainer
    from transformers import TrainerCallback

    out = tmp_path / "out"
    seen: list[list[int]] = []

    class Listing(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):  # called after the save and its rotation
            seen.append(sorted(int(n.split("-")[1]) for n in os.listdir(out) if n.startswith("checkpoint-")))

    trainer = make_trainer(out, [Listing()], max_steps=total, **settings)
    trainer.train()
    disk_saved = sorted({s for listing in seen for s in listing})
    disk_kept = seen[-1]
    bin_path = out / f"checkpoint-{disk_kept[-1]}" / "training_args.bin"
    json_path = tmp_path / "args.json"
    json_path.write_text(trainer.args.to_json_string())
    shape = ["--steps-per-epoch", str(spe)] if spe else []
    for source in (bin_path, json_path):
        policy = converted(tmp_path, "--from-hf", str(source), *shape)
        assert policy.run.total_steps == total
        draft = hf.convert(hf.read(str(source)), source.name)
        model = draft.trainer(total, spe)
        _check(policy, list(model.saved), list(model.kept), disk_saved, disk_kept, total, spe)
        assert policy.simulate(total, spe).kept == disk_kept  # the Trainer already keeps its last step


_STEP = re.compile(r"step=(\d+)\.ckpt$")


@pytest.mark.slow
@pytest.mark.parametrize("kwargs,total,steps_per_epoch", [
    ({"every_n_train_steps": 40, "save_last": True}, 130, 5),     # the final step is dropped
    ({"every_n_train_steps": 25, "save_top_k": -1}, 130, 5),
    ({"every_n_epochs": 2, "save_top_k": -1}, 37, 5),             # the run stops mid-epoch 8
])
def test_lightning_parity(tmp_path, kwargs, total, steps_per_epoch):
    import lightning.pytorch as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning_common import fit

    root = tmp_path / "run"
    ckpt_dir = root / "ckpt"
    seen: list[dict[str, int]] = []

    def listing() -> dict[str, int]:
        found = {}
        for name in os.listdir(ckpt_dir) if ckpt_dir.exists() else ():
            match = _STEP.search(name)
            if match:
                found[name] = int(match.group(1))
            elif name == "last.ckpt":
                found[name] = torch.load(ckpt_dir / name, map_location="cpu", weights_only=False)["global_step"]
        return found

    class Listing(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(listing())

    fit(root, [Listing(), ModelCheckpoint(dirpath=str(ckpt_dir), **kwargs)], n=16 * steps_per_epoch,
        max_steps=total)
    seen.append(listing())
    disk_saved = sorted({s for found in seen for s in found.values()})
    disk_kept = sorted(set(seen[-1].values()))
    call = "ModelCheckpoint(" + ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) + ")"
    policy = converted(tmp_path, "--from-lightning", call, "--total-steps", str(total),
                       "--steps-per-epoch", str(steps_per_epoch))
    model = lightning.convert(lightning.parse(call), "test").trainer(total, steps_per_epoch)
    _check(policy, list(model.saved), list(model.kept), disk_saved, disk_kept, total, steps_per_epoch)
    if kwargs.get("save_last"):
        assert total not in disk_saved  # ModelCheckpoint never saved the last step; the policy does
