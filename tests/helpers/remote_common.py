"""Shared helpers of the durable tier's tests (tests/store/test_remote_*.py).  Test fixtures, not part of saverules."""
from __future__ import annotations

from pathlib import Path

import torch
from store_common import policy

from saverules import Progress
from saverules.torch import Checkpointer


def local_checkpoints(root: Path, steps=(1, 2, 3), size: int = 50_000) -> list[Path]:
    """Committed local checkpoints at ``steps`` (format tensors) under ``root``."""
    torch.manual_seed(0)
    state = {"w": torch.randn(size), "n": 0}
    pol = policy('version = 1\nfinal = false\n[[rules]]\nkind = "every_steps"\nevery = 1\n', fmt="tensors")
    with Checkpointer(pol, dir=root, total_steps=max(steps)) as ckpt:
        for s in steps:
            state["n"] = s
            state["w"].add_(1.0)
            ckpt.save(Progress(s, total_steps=max(steps)), state)
        return [Path(i.path) for i in ckpt.list()]


def same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names
    )
