"""Shared helpers for the checkpoint-store tests (tests/store/test_store*.py).

Test fixtures, not part of saverules.
"""
from __future__ import annotations

import os
import random
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from strategies import to_toml

import saverules

REPO = Path(__file__).resolve().parents[2]


def policy_toml(
    every: int | None = 2,
    *,
    every_time: str | None = None,
    rules: Sequence[Mapping[str, Any]] = (),
    final: bool | None = None,
    total_steps: int | None = None,
    keep_last: int | None = None,
    keep_every: int | None = None,
    keep_best: str | Mapping[str, Any] | None = None,
    fmt: str | None = None,
    dir: str | None = None,
    name: str | None = None,
) -> str:
    """The TOML text of a test policy, built from its parts (the one builder instead of copied snippets).

    ``every``: one ``every_steps`` rule (None: none); ``every_time``: one ``every_time`` rule after it;
    ``rules``: further ``[[rules]]`` tables, in order. ``total_steps`` goes to ``[run]``; ``keep_last``,
    ``keep_every`` and ``keep_best`` (a metric name, or the whole table) to ``[retention]``; ``fmt``,
    ``dir`` and ``name`` to ``[storage]``. Tables come in that order, so ``[retention]`` (or
    ``[storage]``) is last when present. Parts left at None are left out (the policy's defaults).
    """
    doc: dict[str, Any] = {"version": 1}
    if final is not None:
        doc["final"] = final
    listed: list[Mapping[str, Any]] = []
    if every is not None:
        listed.append({"kind": "every_steps", "every": every})
    if every_time is not None:
        listed.append({"kind": "every_time", "every": every_time})
    listed += rules
    if listed:
        doc["rules"] = [dict(r) for r in listed]
    if total_steps is not None:
        doc["run"] = {"total_steps": total_steps}
    retention: dict[str, Any] = {}
    if keep_last is not None:
        retention["keep_last"] = keep_last
    if keep_every is not None:
        retention["keep_every"] = keep_every
    if keep_best is not None:
        retention["keep_best"] = {"metric": keep_best} if isinstance(keep_best, str) else dict(keep_best)
    if retention:
        doc["retention"] = retention
    storage = {k: v for k, v in (("format", fmt), ("dir", dir), ("name", name)) if v is not None}
    if storage:
        doc["storage"] = storage
    return to_toml(doc)


#: Save every 2 steps (and the final step); keep everything.
EVERY_2 = policy_toml(2)

#: Save every step, no final save; keep the last 2.
EVERY_1_KEEP_2 = policy_toml(1, final=False, keep_last=2)


def policy(text: str | None = None, fmt: str = "torch", extra: str = "", **parts: Any) -> saverules.Policy:
    """A policy whose [storage].format is ``fmt`` (the store's tests name it).

    Either from ``text`` + ``extra``, or (``text`` left out) from :func:`policy_toml`'s ``parts``:
    ``policy()`` is :data:`EVERY_2`; ``policy(every=1, keep_last=3)`` saves every step and keeps 3.
    """
    if text is None:
        return saverules.loads(policy_toml(**parts, fmt=fmt) + extra)
    if parts:
        raise TypeError(f"policy(): give the TOML text or policy_toml's keywords, not both (got {sorted(parts)})")
    doc = text + extra
    if "[storage]\n" in doc:
        return saverules.loads(doc.replace("[storage]\n", f'[storage]\nformat = "{fmt}"\n', 1))
    return saverules.loads(doc + f'\n[storage]\nformat = "{fmt}"\n')


def small_state(value: float = 1.0) -> dict:
    """A small state to save: a module, plain values and a tensor, all scaled by ``value``."""
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.fill_(value)
        model.bias.fill_(-value)
    return {"model": model, "epoch": 0, "position": 7, "note": "hi", "tensor": torch.arange(4.0) * value}


def seed_all(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


#: The folder of the store's removal log (saverules.store.removed): part of a store whose retention deleted anything.
REMOVED_FOLDER = ".saverules"


def hidden_entries(root) -> list:
    """Hidden entries of a store other than its lock file and removal log: what a write in progress (or killed)
    leaves."""
    return sorted(p.name for p in Path(root).iterdir()
                  if p.name.startswith(".") and p.name not in (LOCK_FILE, REMOVED_FOLDER))
