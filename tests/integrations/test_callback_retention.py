"""The trainer callbacks keep what the store keeps: verified checkpoints only, and the finals of shorter runs go."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from hf_common import make_trainer
from lightning_common import fit

import saverules
from saverules.lightning import SaverulesCheckpoint
from saverules.transformers import SaverulesCallback, last_good_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:DeprecationWarning")

EVERY_40_KEEP_2 = 'version = 1\n[[rules]]\nkind = "every_steps"\nevery = 40\n[retention]\nkeep_last = 2\n'


def flip_a_byte(path: Path) -> None:
    """Damage a file without changing its size."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def hf_dirs(out) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in Path(out).iterdir() if p.name.startswith("checkpoint-"))


def ckpt_files(d) -> list[int]:
    return sorted(int(p.stem.split("-")[1]) for p in Path(d).glob("step-*.ckpt"))


def test_hf_retention_never_deletes_a_good_checkpoint_for_a_damaged_one(tmp_path):
    from transformers import TrainerCallback

    class Damage(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 100:
                flip_a_byte(tmp_path / "checkpoint-80" / "model.safetensors")

    cb = SaverulesCallback(saverules.loads(EVERY_40_KEEP_2))
    trainer = make_trainer(tmp_path, [cb, Damage()], max_steps=130)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    # 40 stays in place of the damaged 80 until two good ones are newer; 80 is left for the user
    assert hf_dirs(tmp_path) == [80, 120, 130]
    assert cb.removed == ["checkpoint-40"]
    said = [str(w.message) for w in caught if "failed verification" in str(w.message)]
    assert len(said) == 1 and "checkpoint-80" in said[0] and "model.safetensors" in said[0]


def test_lightning_retention_never_deletes_a_good_checkpoint_for_a_damaged_one(tmp_path):
    import lightning.pytorch as L

    d = tmp_path / "ckpts"

    class Damage(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 100:
                flip_a_byte(d / "step-00000080.ckpt")

    cb = SaverulesCheckpoint(saverules.loads(EVERY_40_KEEP_2), dirpath=d)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(tmp_path, [cb, Damage()], max_steps=130)
    assert ckpt_files(d) == [80, 120, 130]
    said = [str(w.message) for w in caught if "failed verification" in str(w.message)]
    assert len(said) == 1 and "step-00000080" in said[0]


def test_hf_extended_runs_keep_only_the_current_runs_final(tmp_path):
    policy = saverules.loads(EVERY_40_KEEP_2)
    make_trainer(tmp_path, [SaverulesCallback(policy)], max_steps=130).train()
    assert hf_dirs(tmp_path) == [120, 130]
    for total, kept in ((210, [200, 210]), (290, [280, 290]), (370, [360, 370])):
        trainer = make_trainer(tmp_path, [SaverulesCallback(policy)], max_steps=total)
        trainer.train(resume_from_checkpoint=last_good_checkpoint(tmp_path))
        assert hf_dirs(tmp_path) == kept, total


def test_lightning_extended_runs_keep_only_the_current_runs_final(tmp_path):
    policy = saverules.loads(EVERY_40_KEEP_2)
    d = tmp_path / "ckpts"
    fit(tmp_path, [SaverulesCheckpoint(policy, dirpath=d)], max_steps=130)
    assert ckpt_files(d) == [120, 130]
    for total, kept in ((210, [200, 210]), (290, [280, 290]), (370, [360, 370])):
        fit(tmp_path, [SaverulesCheckpoint(policy, dirpath=d)], max_steps=total,
            ckpt_path=SaverulesCheckpoint.last_good(d))
        assert ckpt_files(d) == kept, total


def test_lightning_ranks_a_checkpoint_only_by_metrics_measured_on_its_own_weights(tmp_path):
    from saverules.integrations import manifest as fm

    text = EVERY_40_KEEP_2.replace("every = 40", "every = 10").replace(
        "keep_last = 2", 'keep_last = 1\n[retention.keep_best]\nmetric = "val_loss"\nmode = "min"')
    d = tmp_path / "ckpts"
    cb = SaverulesCheckpoint(saverules.loads(text), dirpath=d)
    # one batch per epoch: validation at steps 7, 14, 21, ..., saves at 10, 20, ..., 70 (both), 80
    fit(tmp_path, [cb], val=True, max_steps=80, check_val_every_n_epoch=7)
    assert cb.saved_steps == [10, 20, 30, 40, 50, 60, 70, 80]
    metrics = {i.step: i.metrics or {} for i in fm.list_checkpoints(d)}
    assert "val_loss" in metrics[70]  # validated at its own step
    assert all("val_loss" not in metrics[s] for s in metrics if s != 70), metrics
    # keep_best can only keep a checkpoint that was validated: 70, with the newest (80)
    assert ckpt_files(d) == [70, 80]
