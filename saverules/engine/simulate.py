"""Simulate a policy over a run shape, before the run.

The simulator drives the real :class:`~saverules.engine.decider.Decider`, but only at
the steps where something can happen: the next step at which any rule may
fire, with the run's clock and epoch ends known in advance, and the last step.
The steps skipped over are ones at which a per-step run decides quietly, so
the decider is told they passed before the next decision, which then sees
exactly what it would see in a per-step run.  A 10^9-step run
costs about as many decisions as it has saves.  With a ``metrics``
callable every step is visited, since any step may report a metric.

A simulation lists at most ``max_saves`` saves (:data:`~saverules.engine.limits.SAVE_LIMIT`
by default).  A run with more stops there: :attr:`Simulation.complete` is
false, the listed saves, what is kept and the largest gap describe steps
1..:attr:`Simulation.listed_to`, and :attr:`Simulation.save_count` is the
number of saves in the whole run, counted by arithmetic
(:mod:`saverules.engine.count`) where the policy allows it and ``None`` where it does
not.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from .cost import check_cost
from .count import plan_rest
from .decider import Decider
from .limits import MAX_STEPS, SAVE_LIMIT, steps_text
from .progress import Checkpoint, Progress
from .quantities import format_seconds
from .retention import explain_retention

MetricsFn = Callable[[int], Mapping[str, float] | None]


@dataclass
class Simulation:
    """What a policy does over one run shape."""

    total_steps: int
    steps_per_epoch: int | None
    step_seconds: float | None
    saves: list[tuple[int, tuple[str, ...]]]
    kept: list[int]
    max_gap_steps: int
    max_gap_seconds: float | None
    peak_kept: int
    fired: dict[str, int] = field(default_factory=dict)
    #: The most checkpoints on disk at once: the store writes each checkpoint before retention prunes, so
    #: this counts the one being written with those kept before it (``peak_kept`` + 1 once retention prunes).
    peak_on_disk: int = 0
    #: False when the run has more saves than were listed (see the module's docs).
    complete: bool = True
    #: The last step the listed saves, ``kept``, ``peak_kept`` and the gaps cover.
    listed_to: int = 0
    #: Saves in the whole run: ``len(saves)`` when complete, else counted, or None if unknown.
    save_count: int | None = None
    #: Saves per reason in the whole run (``fired`` when complete; counted, or None if unknown).
    fired_total: dict[str, int] | None = None
    #: When incomplete and counted: the saves at the very end of the run, simulated after the count.
    last_saves: list[tuple[int, tuple[str, ...]]] = field(default_factory=list)
    #: When incomplete and counted: the step of the run's last save (None: no save at all).
    last_saved: int | None = None

    def __post_init__(self):
        if self.complete:
            self.listed_to = self.listed_to or self.total_steps
            if self.save_count is None:
                self.save_count = len(self.saves)
            if self.fired_total is None:
                self.fired_total = dict(self.fired)

    @property
    def saved_steps(self) -> list[int]:
        return [step for step, _ in self.saves]

    def time_of(self, step: int) -> float | None:
        return None if self.step_seconds is None else step * self.step_seconds

    @property
    def unsaved_tail(self) -> int | None:
        """Trained steps after the last save: work that exists in no checkpoint (None when
        the listing stops before the end of the run)."""
        if self.complete:
            return self.total_steps - (self.saves[-1][0] if self.saves else 0)
        if self.save_count is None:
            return None
        return self.total_steps - (self.last_saved or 0)

    def summary(self) -> str:
        gap = f"{self.max_gap_steps} step{'' if self.max_gap_steps == 1 else 's'}" + (
            f" ({format_seconds(self.max_gap_seconds)})" if self.max_gap_seconds is not None else ""
        )
        if not self.complete:
            count = "an unknown number of" if self.save_count is None else f"{self.save_count:,}"
            return (f"{count} saves (the first {len(self.saves):,} listed, to step {self.listed_to:,}); "
                    f"to there {len(self.kept)} kept, largest gap {gap}")
        return f"{len(self.saves)} saves, {len(self.kept)} kept, largest gap {gap}"


def progress_at(step: int, total: int, steps_per_epoch: int | None, step_seconds: float | None, metrics=None):
    """The Progress a loop of this shape reports after optimizer step ``step``."""
    if steps_per_epoch:
        # as in the reference loop: an epoch ends at a multiple of steps_per_epoch
        # only; a run that stops mid-epoch does not end one at its last step
        epoch = (step - 1) // steps_per_epoch
        epoch_end = step % steps_per_epoch == 0
    else:
        epoch, epoch_end = 0, False  # no epoch length, no simulated epoch ends
    return Progress(
        step=step,
        total_steps=total,
        epoch=epoch,
        epoch_end=epoch_end,
        is_last=True if step == total else None,
        time=None if step_seconds is None else step * step_seconds,
        metrics=metrics,
        signal=False,
    )


def _prune(retention, kept: list[Checkpoint], incremental: bool) -> None:
    """Apply retention to ``kept`` in place after a save, as the checkpoint store does.

    Without a ranking by metric, a checkpoint's keep mask depends only on itself
    (final, keep_every) and on its place among the newest ``keep_last``.  A
    checkpoint older than the newest ``keep_last + 1`` has already been judged
    outside that window and survived for reasons that cannot change, so only
    the window needs judging again: the simulation stays linear in the saves.
    """
    start = max(0, len(kept) - retention.keep_last - 1) if incremental else 0
    window = kept[start:]
    mask = explain_retention(retention, window)
    kept[start:] = [c for c, why in zip(window, mask) if why]


class _Shape:
    """What a simulated run looks like in advance, for rules that watch the clock or epochs."""

    def __init__(self, total_steps, steps_per_epoch, step_seconds, save_seconds=None):
        self.total_steps, self.steps_per_epoch, self.step_seconds = total_steps, steps_per_epoch, step_seconds
        self.save_seconds = save_seconds  # what every save costs; None: adaptive rules are not simulated


def simulate(policy, total_steps, steps_per_epoch=None, step_seconds=None, metrics: MetricsFn | None = None,
             max_saves: int | None = SAVE_LIMIT, *, save_seconds=None, write_seconds=None):
    for name, value in (("total_steps", total_steps), ("steps_per_epoch", steps_per_epoch)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if value is not None and value > MAX_STEPS:
            raise ValueError(f"{name} must be at most {steps_text(MAX_STEPS)}, got {value:,}")
    if max_saves is not None and (isinstance(max_saves, bool) or not isinstance(max_saves, int) or max_saves < 1):
        raise ValueError(f"max_saves must be a positive integer or None, got {max_saves!r}")
    if total_steps is None:
        raise ValueError("total_steps is required to simulate a run")
    if step_seconds is not None and not (isinstance(step_seconds, (int, float)) and 0 < step_seconds < math.inf):
        raise ValueError(f"step_seconds must be a positive number, got {step_seconds!r}")

    cost = None
    if save_seconds is not None or write_seconds is not None:
        if save_seconds is None:
            raise ValueError("write_seconds needs save_seconds: give the stall of a save too")
        cost = check_cost(save_seconds, write_seconds)  # reported to the decider after every save

    decider = Decider(policy, total_steps)  # the top-level (local) tier; simulate_tiers adds [durable]
    decider._simulate(_Shape(total_steps, steps_per_epoch, step_seconds, None if cost is None else cost[0]))
    saves: list[tuple[int, tuple[str, ...]]] = []
    fired: dict[str, int] = {}
    kept: list[Checkpoint] = []
    peak = 0
    on_disk = 0
    step = 0
    overflow = False
    while step < total_steps:
        if metrics is not None:
            nxt = step + 1
        else:
            # the next step at which any rule can fire, the clock and epoch ends
            # included; the first decision is always made, as it starts the clock
            nxt = max(min(decider._next_fire(), total_steps), step + 1) if step else 1
            # Nothing fires at the steps skipped over; a per-step run decides each
            # of them quietly, so the decision at `nxt` crosses from nxt - 1.
            decider._skip_to(nxt - 1)
        step = nxt
        reported = metrics(step) if metrics is not None else None
        decision = decider(progress_at(step, total_steps, steps_per_epoch, step_seconds, reported))
        if not decision.save:
            continue
        if max_saves is not None and len(saves) >= max_saves:
            overflow = True  # one save more than are listed: the rest is counted below
            break
        if cost is not None:
            decider.note_cost(*cost)
        saves.append((step, decision.reasons))
        for reason in decision.reasons:
            fired[reason] = fired.get(reason, 0) + 1
        kept.append(
            Checkpoint(step, None if step_seconds is None else step * step_seconds, reported, "final" in decision.reasons)
        )
        on_disk = max(on_disk, len(kept))  # written and committed before retention prunes
        if policy.retention is not None:  # no [retention] table keeps everything
            _prune(policy.retention, kept, incremental=policy.retention.keep_best is None or metrics is None)
        peak = max(peak, len(kept))

    complete = not overflow
    listed_to = step - 1 if overflow else total_steps  # every save up to here is listed
    bounds = [0] + [s for s, _ in saves]
    if bounds[-1] != listed_to:
        bounds.append(listed_to)
    max_gap = max(b - a for a, b in zip(bounds, bounds[1:]))
    save_count = fired_total = None
    last_saves: list[tuple[int, tuple[str, ...]]] = []
    last_saved = None
    if not complete and metrics is None:
        counted = _count_rest(policy, decider._compiled, saves, fired, listed_to, total_steps, steps_per_epoch,
                              step_seconds, max_saves, cost)
        if counted is not None:
            save_count, fired_total, last_saves, last_saved = counted
    return Simulation(
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
        step_seconds=step_seconds,
        saves=saves,
        kept=[c.step for c in kept],
        max_gap_steps=max_gap,
        max_gap_seconds=None if step_seconds is None else max_gap * step_seconds,
        peak_kept=peak,
        peak_on_disk=on_disk,
        fired=fired,
        complete=complete,
        listed_to=listed_to,
        save_count=len(saves) if complete else save_count,
        fired_total=dict(fired) if complete else fired_total,
        last_saves=last_saves,
        last_saved=None if complete else last_saved,
    )


def _count_rest(policy, compiled, saves, fired, listed_to, total_steps, steps_per_epoch, step_seconds, max_saves,
                cost=None):
    """(saves in the run, saves per reason, the last saves, the last saved step) once the
    listing stopped at ``listed_to``: counted by arithmetic as far as the rules allow, then
    simulated to the end; None if that is not possible within the limits."""
    rest = plan_rest(compiled, total_steps, steps_per_epoch, step_seconds, listed_to,
                     saves[-1][0] if saves else None)
    if rest is None:
        return None
    count = len(saves) + rest.count
    by_reason = dict(fired)
    for reason, n in rest.by_reason.items():
        by_reason[reason] = by_reason.get(reason, 0) + n
    last_saves = []
    if rest.upto < total_steps:
        # the end of the run, where rules that depend on the last save may fire: simulate it
        # from the counted stretch's end, as a per-step run would stand there, with a fresh
        # decider (no rule has seen the steps beyond listed_to)
        decider = Decider(policy, total_steps)  # the top-level (local) tier; simulate_tiers adds [durable]
        # (an adaptive rule is never counted, see saverules.engine.count, so none is in play here;
        # the shape still says whether a save cost was given, as the listed run's did)
        decider._sim = _Shape(total_steps, steps_per_epoch, step_seconds, None if cost is None else cost[0])
        decider._prev = rest.upto
        if step_seconds is not None:
            decider._last_save_time = step_seconds  # the clock starts at the first decision
        if rest.last_save is not None:
            decider._last_save_step = rest.last_save
            if step_seconds is not None:
                decider._last_save_time = rest.last_save * step_seconds
        decider._refresh()
        step = rest.upto
        while step < total_steps:
            if max_saves is not None and len(last_saves) >= max_saves:
                return None
            step = max(min(decider._next_fire(), total_steps), step + 1)
            decider._skip_to(step - 1)
            decision = decider(progress_at(step, total_steps, steps_per_epoch, step_seconds))
            if decision.save:
                last_saves.append((step, decision.reasons))
                for reason in decision.reasons:
                    by_reason[reason] = by_reason.get(reason, 0) + 1
        count += len(last_saves)
    last_saved = last_saves[-1][0] if last_saves else rest.last_save
    return count, by_reason, last_saves, last_saved
