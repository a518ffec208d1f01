"""A tiny Lightning run on CPU, shared by the tests and their child processes."""
from __future__ import annotations

import torch
from torch import nn


def module_class():
    import lightning.pytorch as L

    class TinyRegressor(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(8, 1)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.mse_loss(self.linear(x).squeeze(-1), y)
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", nn.functional.mse_loss(self.linear(x).squeeze(-1), y), sync_dist=True)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    return TinyRegressor


def loader(n=16, batch=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = x @ torch.arange(1.0, 9.0) / 8 + 0.1 * torch.randn(n, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch, shuffle=False)


def make_trainer(root, callbacks=(), **kw):
    import lightning.pytorch as L

    settings = dict(
        max_steps=130, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, deterministic=True, default_root_dir=str(root), num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    settings.update(kw)
    return L.Trainer(callbacks=list(callbacks), **settings)


def fit(root, callbacks=(), ckpt_path=None, val=False, n=16, batch=16, **kw):
    """One batch per epoch by default: a resumed fit then restarts exactly at an epoch boundary."""
    import lightning.pytorch as L

    L.seed_everything(0, workers=True, verbose=False)
    model = module_class()()
    if val:
        kw.setdefault("limit_val_batches", 1)
    trainer = make_trainer(root, callbacks, **kw)
    trainer.fit(model, loader(n, batch), loader(16, 16, seed=1) if val else None, ckpt_path=ckpt_path)
    return trainer, model
