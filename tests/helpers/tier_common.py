"""Shared helpers of the two-tier Checkpointer tests (tests/store/test_tier_*.py).  Test fixtures, not part of saverules.

Until the engine's TieredDecider is merged (issue 18, T4), :func:`open_checkpointer`
gives the Checkpointer a bridge that decides each tier with its own Decider
(compiled from ``local_policy`` and ``durable_policy``), as the contract
describes; once ``Policy.compile`` returns a tiered decider it is used as is.
"""
from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any, NamedTuple

import torch

import saverules
from saverules import Progress
from saverules.engine.tiers import durable_policy, local_policy
from saverules.torch import Checkpointer


class TierDecision(NamedTuple):
    save: bool
    reasons: tuple = ()
    durable: tuple = ()


class TwoDeciders:
    """Each tier's Decider, each counting from its own saves (only until T4's TieredDecider is merged)."""

    def __init__(self, policy: saverules.Policy, total_steps: int | None) -> None:
        dp = durable_policy(policy)
        assert dp is not None
        self.local = local_policy(policy).compile(total_steps)
        self.durable = dp.compile(total_steps)

    def __call__(self, progress: Progress) -> TierDecision:
        a, b = self.local(progress), self.durable(progress)
        return TierDecision(bool(a.save or b.save), tuple(a.reasons), tuple(b.reasons))

    def note_save(self, step: int, time: float | None = None, tiers: tuple = ("local", "durable")) -> None:
        if "local" in tiers:
            self.local.note_save(step, time)
        if "durable" in tiers:
            self.durable.note_save(step, time)

    def note_cost(self, stall: float, total: float | None = None) -> None:
        self.local.note_cost(stall, total)

    def state_dict(self) -> dict:
        return {"local": self.local.state_dict(), "durable": self.durable.state_dict()}

    def load_state_dict(self, state: dict) -> Any:
        if "local" in state and "durable" in state:
            self.durable.load_state_dict(state["durable"])
            return self.local.load_state_dict(state["local"])
        return self.local.load_state_dict(state)

    def fresh_state(self, step: int, time: float | None = None) -> dict:
        return self.local.fresh_state(step, time)

    @property
    def total_steps(self) -> int | None:
        return self.local.total_steps


def tiered_compile() -> bool:
    """Whether the engine compiles a policy with ``[durable]`` into a tiered decider (T4 merged)."""
    pol = saverules.loads('version = 1\n[durable]\ndir = "memory://x"\n[[durable.rules]]\nkind = "every_steps"\n'
                          'every = 1\n')
    return hasattr(pol.compile(1), "note_upload_cost")


def open_checkpointer(policy: saverules.Policy, dir: Path, total_steps: int | None = None,
                      **kwargs: Any) -> Checkpointer:
    ck = Checkpointer(policy, dir=dir, total_steps=total_steps, **kwargs)
    if policy.durable is not None and not tiered_compile():
        ck.decider = TwoDeciders(policy, total_steps)
    return ck


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


def run(ck: Checkpointer, steps: range, total: int, size: int = 64) -> dict:
    """Train ``steps`` (a state whose tensor is the step), deciding through ``ck`` each step; the last state."""
    state = {"w": torch.zeros(size), "n": 0}
    for s in steps:
        state["w"].fill_(float(s))
        state["n"] = s
        ck.step(Progress(s, total_steps=total), state)
    return state


def local_steps(root: Path) -> list[int]:
    return sorted(int(p.name.split("-")[-1]) for p in root.iterdir() if p.name.startswith("step-"))


def durable_steps(ck: Checkpointer) -> list[int]:
    assert ck.durable is not None
    return sorted(int(n.split("-")[-1]) for n in ck.durable.names())
