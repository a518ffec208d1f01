"""improved(top=k) with keep_best n=k against a real lightning Trainer with
ModelCheckpoint(save_top_k=k): the same checkpoints are written and kept, plus the final step."""
from __future__ import annotations

import logging
import warnings

import lightning.pytorch as pl  # noqa: E402
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

import saverules


class Scripted(pl.LightningModule):
    """A tiny model whose validation reports a scripted value at each epoch."""

    def __init__(self, values):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.values = values

    def training_step(self, batch, _):
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch, _):
        self.log("val_loss", float(self.values[self.current_epoch]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def _loader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(1, 2)), batch_size=1)

    train_dataloader = val_dataloader = _loader


class Observed(ModelCheckpoint):
    """ModelCheckpoint, unchanged, telling which epochs it wrote."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.written = []

    def _save_checkpoint(self, trainer, filepath):
        self.written.append(trainer.current_epoch)
        super()._save_checkpoint(trainer, filepath)


def _lightning(values, k, mode, tmp_path):
    callback = Observed(dirpath=tmp_path, monitor="val_loss", mode=mode, save_top_k=k, filename="{epoch}")
    trainer = pl.Trainer(max_epochs=len(values), limit_train_batches=1, limit_val_batches=1, accelerator="cpu",
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, callbacks=[callback])
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Scripted(values))
    kept = sorted(int(p.stem.split("=")[1]) for p in tmp_path.glob("epoch=*.ckpt"))
    return callback.written, kept


@pytest.mark.parametrize("values, k, mode", [
    ([5.0, 4.0, 4.5, 4.5, 3.0, 6.0, 3.5, 2.5, 7.0], 2, "min"),   # a tie with the k-th best is not written
    ([0.25, 0.5, 0.125, 0.75, 0.5, 0.875, 0.375, 1.0, 0.0625, 0.625], 3, "max"),
])
def test_top_k_writes_and_keeps_what_lightning_does(values, k, mode, tmp_path):
    written, kept = _lightning(values, k, mode, tmp_path)
    # one optimizer step per epoch; epoch e's evaluation is reported at step e + 1
    policy = saverules.loads(f'''
version = 1
[[rules]]
kind = "improved"
metric = "val_loss"
mode = "{mode}"
top = {k}
[retention]
keep_best = {{ metric = "val_loss", mode = "{mode}", n = {k} }}
''')
    total = len(values)
    sim = policy.simulate(total, 1, None, lambda step: {"val_loss": values[step - 1]})
    final = [total] if total - 1 not in written else []  # the final guarantee adds the last step
    assert sim.saved_steps == [e + 1 for e in written] + final
    assert sim.kept == [e + 1 for e in kept] + final
    assert len(written) < total  # lightning skipped some evaluations, and so did the rule
