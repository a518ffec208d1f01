"""Shared helpers for the checkpoint-store tests (tests/test_store*.py).

Test fixtures, not part of saverules.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

import saverules

REPO = Path(__file__).resolve().parents[2]

EVERY_2 = """
version = 1
[[rules]]
kind = "every_steps"
every = 2
"""

EVERY_1_KEEP_2 = """
version = 1
final = false
[[rules]]
kind = "every_steps"
every = 1
[retention]
keep_last = 2
"""


def policy(text: str = EVERY_2, fmt: str = "torch", extra: str = "") -> saverules.Policy:
    """A policy from ``text`` + ``extra`` whose [storage].format is ``fmt`` (the store's tests name it)."""
    doc = text + extra
    if "[storage]\n" in doc:
        return saverules.loads(doc.replace("[storage]\n", f'[storage]\nformat = "{fmt}"\n', 1))
    return saverules.loads(doc + f'\n[storage]\nformat = "{fmt}"\n')


class TiedNet(torch.nn.Module):
    """A small model with tied input/output weights (like a language model's embedding)."""

    def __init__(self, vocab: int = 11, width: int = 6):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, width)
        self.mid = torch.nn.Linear(width, width)
        self.norm = torch.nn.BatchNorm1d(width)
        self.out = torch.nn.Linear(width, vocab, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, idx):
        h = torch.relu(self.mid(self.emb(idx)))
        return self.out(self.norm(h))


def tensors_equal(a, b) -> bool:
    """Bitwise equality of nested state (tensors compared with torch.equal, dtype included)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a, b)
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(tensors_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(tensors_equal(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def run_ls(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", "saverules.ls", *map(str, args)],
        capture_output=True, text=True, env=env, cwd=str(REPO), timeout=120,
    )


def checkpoint_dirs(root) -> list:
    return sorted(p.name for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith("."))


#: The store's one-writer lock file: part of every store a writer opened, never a leftover.
LOCK_FILE = ".saverules.lock"


def hidden_entries(root) -> list:
    """Hidden entries of a store other than its lock file: what a write in progress (or killed) leaves."""
    return sorted(p.name for p in Path(root).iterdir() if p.name.startswith(".") and p.name != LOCK_FILE)
