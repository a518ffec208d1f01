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

:class:`TieredDecider` is the runtime's decider of both tiers: what
``Policy.compile()`` returns for a policy with ``[durable]``.  It decides as
:func:`simulate_tiers` simulates, and drops in wherever a
:class:`~saverules.engine.decider.Decider` goes.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any, Generic, TypeVar

from .decider import Decider, Resumed
from .limits import SAVE_LIMIT
from .policy import Policy
from .progress import Checkpoint, Decision, Progress
from .simulate import Simulation

#: The tiers a save can reach, in the order a Decision names them.
TIERS = ("local", "durable")


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


# -- the runtime: both tiers' decisions ---------------------------------------------------


def is_tiered_state(state: object) -> bool:
    """Whether ``state`` is a :class:`TieredDecider`'s ``state_dict()`` (one state per tier)."""
    return isinstance(state, Mapping) and "local" in state and "durable" in state and "version" not in state


def _tiers_argument(tiers: str | Iterable[str]) -> tuple[str, ...]:
    names = (tiers,) if isinstance(tiers, str) else tuple(tiers)
    for name in names:
        if name not in TIERS:
            raise ValueError(f"tiers must name 'local' and/or 'durable', got {name!r} in tiers={tiers!r}")
    return names


class TieredDecider:
    """The save decisions of a policy with two tiers: one :class:`~saverules.engine.decider.Decider` per tier.

    The local tier's decider runs :func:`local_policy` (the top-level rules),
    the durable tier's :func:`durable_policy` (``[durable]``).  Both are asked
    at every decision, each counts from its own saves (a promotion does not
    reset the local tier's time rules), and the :class:`~saverules.engine.progress.Decision`
    names the rules of each: ``reasons`` the local tier's, ``durable`` the
    durable tier's; it saves when either fired.  This is what
    :func:`simulate_tiers` simulates.

    It has the Decider's interface, so that the store, the trainer callbacks
    and :class:`saverules.distributed.SyncedDecider` take it as they take a
    Decider.  A save's cost (:meth:`note_cost`) is the local tier's; an
    upload's wall time goes to the durable tier's decider through
    :meth:`note_upload_cost`.
    """

    def __init__(self, policy: Policy, total_steps: int | None = None) -> None:
        durable = durable_policy(policy)
        if durable is None:
            raise ValueError(
                f"policy {policy.source} has no [durable] table, so it has one tier: compile it with "
                "Policy.compile() (a Decider), or add a [durable] table"
            )
        self.policy = policy
        self.local: Decider = Decider(local_policy(policy), total_steps)
        self.durable: Decider = Decider(durable, total_steps, where=("durable",))
        local_cls, durable_cls = type(self.local), type(self.durable)
        self.reacts_to: frozenset[str] = local_cls.reacts_to | durable_cls.reacts_to
        self.watches_last = local_cls.watches_last or durable_cls.watches_last
        self.watches_signals = local_cls.watches_signals or durable_cls.watches_signals
        self.watches_epochs = local_cls.watches_epochs or durable_cls.watches_epochs
        self.watches_time = local_cls.watches_time or durable_cls.watches_time
        self.watches_metrics = local_cls.watches_metrics or durable_cls.watches_metrics

    # -- deciding ---------------------------------------------------------------------------
    def __call__(self, progress: Progress) -> Decision:
        local = self.local(progress)
        durable = self.durable(progress)
        if not durable.save:
            return local
        return Decision(True, local.reasons, durable.reasons)

    @property
    def total_steps(self) -> int | None:
        return self.local.total_steps

    @property
    def next_step(self) -> int:
        """No rule of either tier can fire before this step while the run is quiet."""
        return min(self.local.next_step, self.durable.next_step)

    @property
    def next_time(self) -> float:
        """No clock rule of either tier can fire while Progress.time is below this."""
        return min(self.local.next_time, self.durable.next_time)

    def note_save(self, step: int, time: float | None = None,
                  tiers: str | Iterable[str] = TIERS) -> None:
        """Record a save made outside the decisions (a forced save) in the ``tiers`` it reached."""
        for name in _tiers_argument(tiers):
            (self.local if name == "local" else self.durable).note_save(step, time)

    def note_cost(self, stall_seconds: float, write_seconds: float | None = None) -> None:
        """The latest local save's cost (see :meth:`Decider.note_cost`): the local tier's."""
        self.local.note_cost(stall_seconds, write_seconds)

    def note_upload_cost(self, seconds: float) -> None:
        """The latest upload's wall time: the durable tier's save cost, as both its stall and its write
        (an ``adaptive`` rule of ``[durable]`` plans its interval from it)."""
        self.durable.note_cost(seconds, seconds)

    @property
    def save_cost(self) -> tuple[float, float] | None:
        """The local tier's estimated (stall, write) seconds of a save, or None before any report."""
        return self.local.save_cost

    @property
    def upload_cost(self) -> tuple[float, float] | None:
        """The durable tier's estimate from the uploads' wall times, or None before any report."""
        return self.durable.save_cost

    # -- resume ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Both tiers' states: ``{"local": ..., "durable": ..., "policy": digest}``."""
        return {"local": self.local.state_dict(), "durable": self.durable.state_dict(), "policy": self.policy.digest}

    def fresh_state(self, step: int, time: float | None = None) -> dict[str, Any]:
        """The state of both tiers' deciders that have just saved ``step`` and hold no rule state."""
        return {"local": self.local.fresh_state(step, time), "durable": self.durable.fresh_state(step, time),
                "policy": self.policy.digest}

    def load_state_dict(self, state: Mapping[str, Any]) -> TierResumed:
        """Continue from ``state``: a two-tier state, or a one-tier one (a policy that had no ``[durable]``).

        A one-tier state continues the local tier, and the durable tier's rules
        start fresh from the saved step; what is returned says which, and its
        :meth:`TierResumed.message` is the warning to show.
        """
        if is_tiered_state(state):
            local, durable = state["local"], state["durable"]
            if not isinstance(local, dict) or not isinstance(durable, dict):
                raise ValueError("a two-tier decider state holds a table for each tier ('local' and 'durable')")
            return TierResumed(self.local.load_state_dict(local), self.durable.load_state_dict(durable))
        if not isinstance(state, dict):
            raise ValueError(f"decider state must be a table, got {type(state).__name__}")
        resumed = self.local.load_state_dict(state)
        step = int(state["prev_step"])
        time = state.get("last_save_time")
        self.durable.load_state_dict(self.durable.fresh_state(step, None if time is None else float(time)))
        return TierResumed(resumed, None)

    def __repr__(self) -> str:
        return f"TieredDecider(policy={self.policy.source!r}, total_steps={self.total_steps})"


@dataclasses.dataclass(frozen=True)
class TierResumed:
    """What :meth:`TieredDecider.load_state_dict` did: each tier's :class:`~saverules.engine.decider.Resumed`,
    ``durable`` None when the state had one tier (the policy gained ``[durable]``: its rules start fresh)."""

    local: Resumed
    durable: Resumed | None

    @property
    def policy_changed(self) -> bool:
        return self.durable is None or self.local.policy_changed or self.durable.policy_changed

    def message(self, where: str, step: int) -> str | None:
        """The one warning to show the user, or None when neither tier's policy changed."""
        if self.durable is None:
            return (
                f"saverules: {where} (step {step}) was written under a policy without a durable tier, and this "
                f"policy has one ([durable]): the durable tier's rules start fresh from step {step}; the local "
                f"tier: {self.local.rules_text(step)}"
            )
        if not self.policy_changed:
            return None
        return (
            f"saverules: {where} (step {step}) was written under a different policy. The local tier: "
            f"{self.local.rules_text(step)}. The durable tier: {self.durable.rules_text(step)}"
        )


# -- what the runtime keeps between the tiers (pure: the store runs these under its locks) ---------------

T = TypeVar("T", bound=Hashable)


def is_signal_reason(reason: str) -> bool:
    """Whether a save reason is a top-level ``on_signal`` rule's (a preemption save)."""
    return reason == "on_signal" or reason.startswith("on_signal(")


def promoted(decision: Decision) -> tuple[str, ...]:
    """Why a save goes to the durable tier: the durable tier's rules that fired; when none did, the local
    tier's ``on_signal`` rules (a preemption save is promoted at once: the job is about to end, and the
    durable decider is then told of the save); () when it is not promoted."""
    if decision.durable:
        return tuple(decision.durable)
    return tuple(r for r in decision.reasons if is_signal_reason(r))


def must_reach_durable(reasons: Sequence[str]) -> bool:
    """Whether a promotion for these :func:`promoted` reasons is never replaced in the queue: the
    durable tier's ``final``, or a signal save."""
    return "final" in reasons or any(is_signal_reason(r) for r in reasons)


class PromotionQueue(Generic[T]):
    """Which promotions wait and which one uploads, for one durable tier.

    At most one upload runs.  The promotions that wait are every pinned one
    (:func:`must_reach_durable`: a final or signal save, never replaced), in order, and at most one
    other after them: a newer promotion replaces a waiting unpinned one, and
    waits behind the pinned ones.  Items are the local checkpoints' names (or
    anything hashable); the same item is never pending twice.
    """

    def __init__(self) -> None:
        self._running: T | None = None
        self._waiting: list[tuple[T, bool]] = []

    def offer(self, item: T, pinned: bool = False) -> T | None:
        """Queue ``item``; returns the waiting promotion it replaced (no longer pending), or None.

        An item already pending is left where it is (pinned, if either offer is).
        """
        if item == self._running:
            return None
        for i, (queued, was_pinned) in enumerate(self._waiting):
            if queued == item:
                self._waiting[i] = (queued, was_pinned or pinned)
                return None
        replaced = None
        if self._waiting and not self._waiting[-1][1]:
            replaced = self._waiting.pop()[0]
        self._waiting.append((item, pinned))
        return replaced

    def start(self) -> T | None:
        """The next promotion to upload, now running; None while one runs or when none waits."""
        if self._running is not None or not self._waiting:
            return None
        self._running = self._waiting.pop(0)[0]
        return self._running

    def finish(self) -> T:
        """The running upload is over (committed, or failed for good): its item, no longer pending."""
        if self._running is None:
            raise RuntimeError("PromotionQueue.finish() with no upload running")
        item, self._running = self._running, None
        return item

    @property
    def running(self) -> T | None:
        return self._running

    @property
    def waiting(self) -> tuple[T, ...]:
        """The promotions that wait, in the order they will upload."""
        return tuple(item for item, _ in self._waiting)

    def pinned_waiting(self) -> tuple[T, ...]:
        """The waiting promotions that nothing replaces."""
        return tuple(item for item, pinned in self._waiting if pinned)

    def pending(self) -> frozenset[T]:
        """Every promotion waiting or running: their local checkpoints are protected."""
        running = () if self._running is None else (self._running,)
        return frozenset((*running, *self.waiting))

    def __len__(self) -> int:
        return len(self._waiting) + (self._running is not None)


class Protected(Generic[T]):
    """The checkpoints of one tier that its retention never deletes, whatever the policy says.

    * the newest committed checkpoint of the tier;
    * the checkpoint a resume came from, until a newer one is committed in the tier;
    * what is held: for the local tier, each checkpoint whose promotion is
      queued or uploading (held when offered, released when its upload is over
      or a newer promotion replaced it).
    """

    def __init__(self, newest: T | None = None, resumed_from: T | None = None) -> None:
        self.newest: T | None = newest
        self.resumed_from: T | None = resumed_from
        self._held: dict[T, int] = {}

    def committed(self, item: T) -> None:
        """``item`` was committed in this tier: the newest now; a resume's checkpoint is no longer held
        (unless ``item`` is that checkpoint, committed again: a download into the local tier)."""
        self.newest = item
        if item != self.resumed_from:
            self.resumed_from = None

    def hold(self, item: T) -> None:
        self._held[item] = self._held.get(item, 0) + 1

    def release(self, item: T) -> None:
        count = self._held.get(item, 0)
        if count <= 1:
            self._held.pop(item, None)
        else:
            self._held[item] = count - 1

    def names(self) -> frozenset[T]:
        extra = tuple(x for x in (self.newest, self.resumed_from) if x is not None)
        return frozenset((*self._held, *extra))

    def __contains__(self, item: object) -> bool:
        return item in self._held or (item is not None and item in (self.newest, self.resumed_from))

    def keep(self, items: Sequence[T], mask: Sequence[bool]) -> list[bool]:
        """A retention mask over ``items`` (True = keep) with every protected item kept."""
        if len(items) != len(mask):
            raise ValueError(f"keep() got {len(mask)} answers for {len(items)} checkpoints")
        return [bool(k) or item in self for item, k in zip(items, mask)]
