"""Two tiers in one policy: the fast (local) tier and the optional durable tier of ``[durable]``.

:func:`durable_policy` is the durable tier seen as a policy of its own (its
rules, its ``final``, its retention), so that it compiles, simulates and
retains exactly as the top level does.  A durable save promotes a local
checkpoint: the local tier saves at every step either tier decides, and each
tier's deciders count from their own saves (a promotion does not reset the
local tier's time rules).

:func:`simulate_tiers` simulates both tiers of a run: each tier's saves, kept
set and largest gap ("a crashed process loses at most X; a lost node loses at
most Y"), and, given how long an upload takes, the upload lag.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

from .limits import SAVE_LIMIT
from .policy import Policy
from .progress import Checkpoint
from .simulate import Simulation


def durable_policy(policy: Policy) -> Policy | None:
    """The durable tier of ``policy`` as a policy of its own; None when it has no ``[durable]`` table."""
    d = policy.durable
    if d is None:
        return None
    return policy.model_copy(update={"final": d.final, "rules": d.rules, "retention": d.retention, "durable": None})


def local_policy(policy: Policy) -> Policy:
    """The fast tier alone: ``policy`` without its ``[durable]`` table."""
    return policy if policy.durable is None else policy.model_copy(update={"durable": None})


def upload_seconds(policy: Policy) -> float | None:
    """Seconds one upload takes per ``[run]``: ``upload_seconds``, or ``checkpoint_size / upload_bandwidth``."""
    run = policy.run
    if run is None:
        return None
    if run.upload_seconds is not None:
        return float(run.upload_seconds)
    if run.checkpoint_size is not None and run.upload_bandwidth is not None:
        return run.checkpoint_size.bytes / run.upload_bandwidth.bytes  # the bandwidth is bytes a second
    return None


def merge_saves(a: Sequence[tuple[int, tuple[str, ...]]],
                b: Sequence[tuple[int, tuple[str, ...]]]) -> list[tuple[int, tuple[str, ...]]]:
    """The saves of either list by step; a step in both names the reasons of both (``a``'s first)."""
    merged: dict[int, tuple[str, ...]] = {}
    for step, reasons in list(a) + list(b):
        merged[step] = merged.get(step, ()) + tuple(r for r in reasons if r not in merged.get(step, ()))
    return sorted(merged.items())


def largest_gap(steps: Sequence[int], total: int) -> int:
    points = [0, *steps, total]
    return max(b - a for a, b in zip(points, points[1:]))


@dataclasses.dataclass(frozen=True)
class TierSimulation:
    """Both tiers of one simulated run.

    ``local`` lists every local save (the local tier's own and each
    promotion); ``durable`` the durable tier's.  ``kept`` of each is that
    tier's retention applied after each of its saves.  ``upload_seconds`` is
    one upload's duration when ``[run]`` says it; ``lag_steps`` then is the
    closest pair of durable saves that come faster than an upload finishes
    (None when none do).
    """

    local: Simulation
    durable: Simulation
    local_saves: list[tuple[int, tuple[str, ...]]]
    local_kept: list[int]
    local_gap_steps: int
    durable_gap_steps: int
    upload_seconds: float | None = None
    lag_steps: tuple[int, int] | None = None

    def gap_seconds(self, steps: int) -> float | None:
        secs = self.local.step_seconds
        return None if secs is None else steps * secs

    @property
    def node_loss_seconds(self) -> float | None:
        """The most training time a lost node loses: the durable gap plus one upload, when both are known."""
        gap = self.gap_seconds(self.durable_gap_steps)
        if gap is None:
            return None
        return gap + (self.upload_seconds or 0.0)


def simulate_tiers(policy: Policy, total_steps: int, steps_per_epoch: int | None = None,
                   step_seconds: float | None = None,
                   metrics: Callable[[int], Mapping[str, float] | None] | None = None,
                   max_saves: int | None = SAVE_LIMIT) -> TierSimulation | None:
    """Simulate both tiers of ``policy``; None when it has no durable tier."""
    durable = durable_policy(policy)
    if durable is None:
        return None
    local = local_policy(policy)
    lsim = local.simulate(total_steps, steps_per_epoch, step_seconds, metrics, max_saves)
    dsim = durable.simulate(total_steps, steps_per_epoch, step_seconds, metrics, max_saves)
    saves = merge_saves(lsim.saves, [(s, ("durable",) + r) for s, r in dsim.saves])
    kept: list[Checkpoint] = []
    for step, reasons in saves:
        p_metrics = metrics(step) if metrics is not None else None
        time = None if step_seconds is None else step * step_seconds
        kept.append(Checkpoint(step, time, p_metrics, step == total_steps and "final" in reasons))
        mask = local.retain(kept)
        kept = [c for c, k in zip(kept, mask) if k]
    up = upload_seconds(policy)
    lag = None
    if up is not None and step_seconds is not None:
        steps = [s for s, _ in dsim.saves]
        close = [(a, b) for a, b in zip(steps, steps[1:]) if (b - a) * step_seconds < up]
        if close:
            lag = min(close, key=lambda ab: ab[1] - ab[0])
    return TierSimulation(
        local=lsim, durable=dsim, local_saves=saves, local_kept=[c.step for c in kept],
        local_gap_steps=largest_gap([s for s, _ in saves], total_steps),
        durable_gap_steps=largest_gap([s for s, _ in dsim.saves], total_steps),
        upload_seconds=up, lag_steps=lag,
    )
