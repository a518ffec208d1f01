"""Shared helpers of the two-tier Checkpointer tests (tests/store/test_tier_*.py).  Test fixtures, not part of saverules."""
from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import torch

import saverules
from saverules import Progress
from saverules.torch import Checkpointer


def open_checkpointer(policy: saverules.Policy, dir: Path, total_steps: int | None = None,
                      **kwargs: Any) -> Checkpointer:
    return Checkpointer(policy, dir=dir, total_steps=total_steps, **kwargs)


def memory_url() -> str:
    return f"memory://tiers-{uuid.uuid4().hex[:10]}/run"


def tier_policy(url: str | None = None, local_every: int = 1, durable_every: int = 4, keep_local: int | None = 2,
                keep_durable: int | None = 2, extra: str = "", durable_extra: str = "", fmt: str = "tensors",
                local_final: bool = True) -> saverules.Policy:
    """A two-tier policy: ``every_steps`` in each tier, ``keep_last`` in each (None: no retention)."""
    text = "version = 1\n"
    if not local_final:
        text += "final = false\n"
    text += f'[[rules]]\nkind = "every_steps"\nevery = {local_every}\n{extra}'
    if keep_local is not None:
        text += f"[retention]\nkeep_last = {keep_local}\n"
    text += f'[storage]\nformat = "{fmt}"\n[durable]\n'
    if url is not None:
        text += f'dir = "{url}"\n'
    text += f'[[durable.rules]]\nkind = "every_steps"\nevery = {durable_every}\n{durable_extra}'
    if keep_durable is not None:
        text += f"[durable.retention]\nkeep_last = {keep_durable}\n"
    return saverules.loads(text)


def run(ck: Checkpointer, steps: range, total: int, size: int = 64, uploads_keep_up: bool = False) -> dict:
    """Train ``steps`` (a state whose tensor is the step), deciding through ``ck`` each step; the last state.

    ``uploads_keep_up``: after each step, wait until the uploads are done (as simulate_tiers assumes: no
    promotion is ever replaced in the queue), so that each tier's saves are exactly the simulated ones.
    """
    state = {"w": torch.zeros(size), "n": 0}
    for s in steps:
        state["w"].fill_(float(s))
        state["n"] = s
        ck.step(Progress(s, total_steps=total), state)
        promoter = ck._committer.promoter
        if uploads_keep_up and promoter is not None:
            ck.wait()  # an async save's local commit first: it enqueues the promotion
            assert promoter.drain(120, bar=False), "an upload did not finish in 120 s"
    return state


def local_steps(root: Path) -> list[int]:
    return sorted(int(p.name.split("-")[-1]) for p in root.iterdir() if p.name.startswith("step-"))


def durable_steps(ck: Checkpointer) -> list[int]:
    assert ck.durable is not None
    return sorted(int(n.split("-")[-1]) for n in ck.durable.names())
