"""A tiny Hugging Face Trainer run on CPU, shared by the tests and their child processes."""
from __future__ import annotations

import os

import torch
from torch import nn

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")


class TinyRegressor(nn.Module):
    """y = w.x + b on 8 features: enough to train, fast to save."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 1)

    def forward(self, x, labels=None):
        out = self.linear(x).squeeze(-1)
        loss = nn.functional.mse_loss(out, labels) if labels is not None else None
        return {"loss": loss, "logits": out}


class Points(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 8, generator=g)
        self.y = self.x @ torch.arange(1.0, 9.0) / 8 + 0.1 * torch.randn(n, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def make_trainer(out, callbacks=(), *, max_steps=130, n=64, batch=8, eval_steps=None, **args):
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    settings = dict(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=batch, learning_rate=0.01,
        save_strategy="no", report_to=[], logging_strategy="no", disable_tqdm=True, use_cpu=True,
        dataloader_num_workers=0, seed=0, data_seed=0, full_determinism=False,
    )
    if eval_steps is not None:
        settings.update(eval_strategy="steps", eval_steps=eval_steps, per_device_eval_batch_size=32)
    settings.update(args)
    return Trainer(
        model=TinyRegressor(), args=TrainingArguments(**settings), train_dataset=Points(n),
        eval_dataset=Points(32, seed=1) if eval_steps is not None else None, callbacks=list(callbacks),
    )


def weights(path):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model.safetensors"))
