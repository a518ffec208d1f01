"""Making every data-parallel rank take the same save decision.

Under DDP every rank runs the same loop and calls the decider at the same
steps, but each rank has its own clock, may receive a preemption signal that
the others did not, and may compute slightly different metrics.  If the ranks
disagree about whether a step is saved, some of them enter a save (and the
collectives a sharded save runs) while others train on: the job hangs.

:class:`SyncedDecider` wraps a compiled decider so that the ranks agree while
communicating rarely:

* A policy whose rules look only at ``step``, ``epoch``, ``epoch_end`` and
  ``is_last`` decides the same thing on every rank by construction; the
  wrapper passes calls straight through and issues no collective at all.
* A policy with time, signal or metric rules is synchronised at *sync steps*
  that every rank can compute locally.  Between sync steps the inner decider
  sees only the deterministic fields, plus the clock reading that rank 0 sent
  at the last sync (the same number on every rank), no signal and no metrics.
  At a sync step one small ``all_reduce`` carries rank 0's clock, the signals
  that reached *any* rank since the last sync, and the step of the next sync,
  which rank 0 picks from its measured step rate so that syncs happen about
  once per ``sync_seconds`` of training.
* A step where the loop reports metrics is a sync step when the policy
  watches metrics (rank 0's metrics are sent along); the last step of the run
  is always a sync step, so no signal is lost at the end.
* A save's measured cost (:meth:`SyncedDecider.note_cost`, for the
  ``adaptive`` rule) rides in the same ``all_reduce``: rank 0's reports since
  the last sync reach every rank's decider at the next sync step, before it
  decides, so every rank plans the same interval without a collective of its
  own.
* :func:`sync_schedule` gives the sync steps (and so the number of
  collectives) for a steady step time without running anything, and
  :attr:`SyncedDecider.collectives` counts the calls actually issued.

See docs/distributed.md for the protocol, the lateness bound and measured
collective counts.

torch is imported lazily, inside the functions that talk to the process
group, so that ``import saverules`` never imports torch.
"""
from __future__ import annotations

import math
import signal as _signal
import time as _time
from collections.abc import Mapping
from typing import Any

from .engine.cost import COST_WINDOW, Cost, check_cost
from .engine.progress import Decision, Progress

__all__ = ["SyncedDecider", "PolicyMismatchError", "agree_on_policy", "sync_schedule", "signal_code", "signal_from_code", "dist_info"]

# Layout of the float64 vector reduced (with MAX) at each sync step.
_TIME = 0          # rank 0's clock; -inf elsewhere
_HAS_TIME = 1      # 1.0 if rank 0 had a clock reading
_NEXT = 2          # next sync step chosen by rank 0; -inf elsewhere
_INTERVAL = 3      # the interval (steps) rank 0 chose
_UNUSED = 4        # reserved (always -inf)
_ANY_UNNAMED = 5   # 1.0 if some rank saw an unnamed signal (signal=True)
_SIG_BASE = 6      # one slot per signal number 1..64: 1.0 if some rank saw it
_NSIG = 64
_COST_COUNT = _SIG_BASE + _NSIG  # how many save costs rank 0 reported since the last sync (at most COST_WINDOW)
_COST_BASE = _COST_COUNT + 1     # then (stall, write) seconds of each, oldest first; -inf elsewhere
_LEN = _COST_BASE + 2 * COST_WINDOW

_NEG = float("-inf")

# When several different signals are agreed at one sync, the one the inner
# decider sees: a stop request first, then the lowest signal number.
_FIRST = ("SIGTERM", "SIGINT")


def _next_interval(prev: int, steps: int, dt: float, sync_seconds: float, max_interval: int | None) -> int:
    """Steps until the next sync, from ``steps`` run in ``dt`` seconds since the last one.

    The fewest steps that take at least ``sync_seconds`` at the measured rate
    (so syncs are never closer than ``sync_seconds`` once the interval has
    ramped up), at most double the previous interval ``prev``, at least 1,
    at most ``max_interval``.
    """
    if steps <= 0:
        k = prev
    elif dt <= 0:
        k = 2 * prev
    else:
        k = math.ceil(sync_seconds * steps / dt * (1 - 1e-9))  # tolerate rounding
    k = max(1, min(k, 2 * prev))
    if max_interval is not None:
        k = min(k, max_interval)
    return k


def sync_schedule(
    total_steps: int,
    step_seconds: float,
    *,
    sync_seconds: float = 1.0,
    max_interval: int | None = None,
    start_step: int = 0,
) -> list:
    """The sync steps of a run whose steps all take ``step_seconds`` on rank 0.

    This is the schedule :class:`SyncedDecider` follows for a policy with time
    or signal rules (and no metric steps) when rank 0's clock advances
    ``step_seconds`` per step: the first step of the process (``start_step + 1``,
    also the first step after a resume), then intervals of 1, 2, 4, ... steps,
    doubling until they reach the steps per ``sync_seconds``, then steady, and
    the last step.  Each sync is one collective, so ``len(sync_schedule(...))``
    is the collective count; a step-and-epoch-only policy issues none at all.

    >>> sync_schedule(48, 0.125)            # 8 steps a second
    [1, 2, 4, 8, 16, 24, 32, 40, 48]
    >>> len(sync_schedule(1000, 0.01))      # 100 steps a second: 1000 steps, 10 s
    17
    """
    if not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be a positive integer, got {total_steps!r}")
    if not (isinstance(step_seconds, (int, float)) and step_seconds >= 0 and math.isfinite(step_seconds)):
        raise ValueError(f"step_seconds must be a finite number of seconds >= 0, got {step_seconds!r}")
    if not (isinstance(sync_seconds, (int, float)) and sync_seconds > 0 and math.isfinite(sync_seconds)):
        raise ValueError(f"sync_seconds must be a positive number of seconds, got {sync_seconds!r}")
    if not isinstance(start_step, int) or not 0 <= start_step < total_steps:
        raise ValueError(f"start_step must be an integer in [0, total_steps), got {start_step!r}")
    step = start_step + 1
    out = [step]
    if max_interval is not None and (not isinstance(max_interval, int) or max_interval < 1):
        raise ValueError(f"max_interval must be a positive integer or None, got {max_interval!r}")
    k = 1
    last_step = None
    while step < total_steps:
        if last_step is not None:
            k = _next_interval(k, step - last_step, (step - last_step) * step_seconds, sync_seconds, max_interval)
        last_step = step
        step = min(step + k, total_steps)
        out.append(step)
    return out


def signal_code(sig: Any) -> int:
    """Map a Progress.signal value to a small integer.

    0 means no signal, -1 a signal without a known number (``True`` or a name
    that is not a signal of this platform), n > 0 the signal number.
    """
    if sig is False or sig is None or sig == 0:
        return 0
    if sig is True:
        return -1
    if isinstance(sig, int):
        return sig if 0 < sig <= _NSIG else -1
    if isinstance(sig, str):
        name = sig.strip().upper()
        if not name.startswith("SIG"):
            name = "SIG" + name
        try:
            n = int(_signal.Signals[name])
        except KeyError:
            return -1
        return n if 0 < n <= _NSIG else -1
    return -1 if sig else 0


def signal_from_code(code: int) -> Any:
    """Inverse of :func:`signal_code`: False, True, or the signal's name."""
    if code == 0:
        return False
    if code < 0:
        return True
    try:
        return _signal.Signals(code).name
    except ValueError:
        return True


def dist_info(group: Any = None) -> tuple[int, int]:
    """``(rank, world_size)`` in ``group``; ``(0, 1)`` when not distributed."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


class PolicyMismatchError(ValueError):
    """The ranks of one job loaded different policies; raised on every rank."""


def agree_on_policy(policy: Any, group: Any = None) -> None:
    """Check once that every rank holds the same policy (by digest); raise on every rank if not.

    Ranks deciding under different policies would save at different steps (the
    job diverges, or hangs in a collective that only some ranks enter), so the
    job stops here instead, with a message that names each rank's file and
    digest.  One ``all_gather_object`` of a short string; nothing without an
    initialized process group.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    mine = (str(getattr(policy, "digest", "")), str(getattr(policy, "source", None) or "<policy object>"))
    every: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(every, mine, group=group)
    if all(d == every[0][0] for d, _ in every):
        return
    lines = [f"rank {r}: {src} (digest {d[:12]})" for r, (d, src) in enumerate(every)]
    raise PolicyMismatchError(
        "saverules: the ranks of this job loaded different policies, so they would save at different steps "
        "(or hang waiting for each other):\n  " + "\n  ".join(lines) + "\n"
        "Give every rank the same policy file (the same path on a shared filesystem, or identical copies)."
    )


class SyncedDecider:
    """A decider that takes the same decision on every rank of a process group.

    Parameters
    ----------
    decider:
        The compiled decider (``Policy.compile(...)``); every rank wraps its own.
    group:
        The process group; the default group when ``None``.
    sync_seconds:
        Target spacing of sync steps in training time.  Rank 0 measures its
        seconds per step between syncs and schedules the next sync the fewest
        whole steps that take at least this long (after a start-up ramp of
        1, 2, 4, ... steps).  So there is at most one collective per
        ``sync_seconds`` of steady training, and a signal or a due time rule
        is acted on less than ``sync_seconds`` plus one step late.  Default 1.0.
    max_interval:
        Optional cap on the number of steps between two syncs, whatever the
        step rate.
    metrics_synced:
        Set when the loop already reports the same metric values on every
        rank (for example after it all-reduced its eval loss).  Metric steps
        then need no collective.
    sync_signals:
        Agree on signals even when the policy has no signal rule.  A loop
        that acts on a signal itself (stops on SIGTERM) needs every rank to
        see it at the same step, or the ranks that stop leave the others
        waiting in a gradient all-reduce.  With it, a step-only policy syncs
        on the same schedule as a signal policy; without it (the default),
        such a policy issues no collective and :attr:`last_signal` is this
        rank's own signal.
    rank, world_size:
        Override the group's rank and size (tests).
    """

    def __init__(
        self,
        decider: Any,
        group: Any = None,
        *,
        sync_seconds: float = 1.0,
        max_interval: int | None = None,
        metrics_synced: bool = False,
        sync_signals: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        if not (isinstance(sync_seconds, (int, float)) and sync_seconds > 0 and math.isfinite(sync_seconds)):
            raise ValueError(f"sync_seconds must be a positive number of seconds, got {sync_seconds!r}")
        if max_interval is not None and (not isinstance(max_interval, int) or max_interval < 1):
            raise ValueError(f"max_interval must be a positive integer or None, got {max_interval!r}")
        self.inner = decider
        inner_decide = getattr(decider, "decide", None)
        if inner_decide is None:  # a decider of the caller's own, without the fields call

            def inner_decide(*fields: Any) -> Decision:
                return decider(Progress(*fields))

        self._inner_decide = inner_decide
        self.group = group
        self.sync_seconds = float(sync_seconds)
        self.max_interval = max_interval
        self.metrics_synced = bool(metrics_synced)
        if rank is None or world_size is None:
            r, w = dist_info(group)
            rank = r if rank is None else rank
            world_size = w if world_size is None else world_size
        self.rank = int(rank)
        self.world_size = int(world_size)
        policy = getattr(decider, "policy", None)
        if self.world_size > 1 and policy is not None:
            agree_on_policy(policy, group)

        self._watch_time = bool(getattr(decider, "watches_time", True))
        self._watch_signals = bool(getattr(decider, "watches_signals", True))
        self._watch_metrics = bool(getattr(decider, "watches_metrics", True))
        self.sync_signals = bool(sync_signals)
        #: True when the decision needs no communication at all: one process,
        #: or a policy that reads only step, epoch and the end of the run.
        self.deterministic = (
            not (self._watch_time or self._watch_signals or self._watch_metrics or self.sync_signals)
            or self.world_size <= 1
        )

        #: Number of collective calls this wrapper has issued (one per sync
        #: step, two on a metric sync step).  The same on every rank.
        self.collectives = 0
        #: Number of sync steps (a metric sync counts once, though it issues two calls).
        self.syncs = 0
        #: The signal the inner decider saw on the latest call: the same on
        #: every rank (False between sync steps).  When ranks received
        #: different signals since the last sync it is SIGTERM if any rank got
        #: it, else SIGINT, else the lowest signal number.  When the wrapper
        #: is deterministic (no signal rule, no ``sync_signals``) it is this
        #: rank's own signal.
        self.last_signal: Any = False
        #: Every signal agreed on the latest call, as names (``True`` for a
        #: signal without a known number), in the order described for
        #: :attr:`last_signal`; empty between sync steps.  A loop that stops on
        #: SIGTERM checks ``"SIGTERM" in decider.last_signals`` on every rank.
        self.last_signals: tuple = ()

        self._next_sync: int | None = None   # None: the next call syncs
        self._interval = 1                      # steps between the last two syncs
        self._last_sync_step: int | None = None
        self._last_sync_clock: float | None = None  # rank 0's rate clock at the last sync
        self._synced_time: float | None = None      # rank 0's Progress.time at the last sync
        self._pending_signals: set = set()      # local signal codes since the last sync
        self._pending_costs: list[Cost] = []    # rank 0: save costs reported since the last sync, newest last
        self._last_clock_candidate: float | None = None
        self._device = None

    # -- the Decider interface -------------------------------------------------

    @property
    def watches_time(self) -> bool:
        return self._watch_time

    @property
    def watches_signals(self) -> bool:
        return self._watch_signals

    @property
    def watches_metrics(self) -> bool:
        return self._watch_metrics

    def __getattr__(self, name: str) -> Any:
        # Anything else (policy, describe helpers...) comes from the inner decider.
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __call__(self, progress: Progress) -> Decision:
        if self.deterministic:
            self.last_signal = progress.signal
            self.last_signals = (progress.signal,) if progress.signal not in (False, None, 0) else ()
            return self.inner(progress)
        step = progress.step
        if progress.signal is not False and progress.signal is not None:
            code = signal_code(progress.signal)
            if code != 0:
                self._pending_signals.add(code)
        metrics = progress.metrics if self._watch_metrics else None
        is_sync = (
            self._next_sync is None
            or step >= self._next_sync
            or progress.is_last is True
            or (progress.total_steps is not None and step >= progress.total_steps)
            or (metrics is not None and not self.metrics_synced)
        )
        if not is_sync:
            self.last_signal = False
            self.last_signals = ()
            return self.inner(
                Progress(
                    step,
                    progress.total_steps,
                    progress.epoch,
                    progress.epoch_end,
                    progress.is_last,
                    self._synced_time,
                    metrics if self.metrics_synced else None,
                    False,
                )
            )
        time_, sigs, metrics = self._sync(progress, metrics)
        self.last_signals = sigs
        sig = sigs[0] if sigs else False
        self.last_signal = sig
        return self.inner(
            Progress(
                step,
                progress.total_steps,
                progress.epoch,
                progress.epoch_end,
                progress.is_last,
                time_,
                metrics,
                sig,
            )
        )

    def decide(
        self,
        step: int,
        total_steps: int | None = None,
        epoch: int = 0,
        epoch_end: bool = False,
        is_last: bool | None = None,
        time: float | None = None,
        metrics: Mapping[str, float] | None = None,
        signal: Any = False,
    ) -> Decision:
        """``self(Progress(step, total_steps, ...))`` without building a Progress between sync steps.

        The same decision, on every rank, as the call with a Progress (see
        :meth:`saverules.engine.decider.Decider.decide`): a sync step, a signal
        or any value a Progress would convert or refuse takes that call.
        """
        if self.deterministic and signal is False:
            self.last_signal = False
            self.last_signals = ()
            return self._inner_decide(step, total_steps, epoch, epoch_end, is_last, time, metrics, False)
        nxt = self._next_sync
        if (
            not self.deterministic and nxt is not None and type(step) is int and step < nxt
            and (signal is False or signal is None) and metrics is None and is_last is not True
            and (total_steps is None or type(total_steps) is int and step < total_steps)
            and (time is None or type(time) is float and time - time == 0.0)
        ):
            # between sync steps: the inner decider sees rank 0's clock of the last sync, no signal, no metrics
            self.last_signal = False
            self.last_signals = ()
            return self._inner_decide(step, total_steps, epoch, epoch_end, is_last, self._synced_time, None, False)
        return self(Progress(step, total_steps, epoch, epoch_end, is_last, time, metrics, signal))

    def note_save(self, step: int, time: float | None = None) -> None:
        """Tell the decider about a save it did not decide.

        Must be called on every rank at the same step.  The clock recorded is
        rank 0's reading from the last sync (identical on every rank), not this
        rank's ``time``, so that the ranks' time rules stay in agreement.
        """
        if self.deterministic:
            self.inner.note_save(step, time)
        else:
            self.inner.note_save(step, self._synced_time if self._watch_time else None)

    def note_cost(self, stall_seconds: float, write_seconds: float | None = None) -> None:
        """Report what a save cost (see :meth:`saverules.engine.decider.Decider.note_cost`), on any rank.

        Under DDP only the inner deciders' shared inputs may change decisions, so
        a report is not applied at once: rank 0's reports since the last sync
        step ride in the next sync's ``all_reduce`` (no collective of their own)
        and every rank's inner decider takes them at that step, before it
        decides.  Between syncs the inner deciders see the clock of the last
        sync, so no decision in between can depend on a newer cost.

        Rank 0's measurement is the one used: rank 0 writes the checkpoint (or,
        for ``format = "dcp"``, commits it after every rank's write, so its save
        spans the others'), and the other ranks wait for it at their next
        collective anyway.  Other ranks may report too (the trainer callbacks do,
        on every rank): their reports are checked and then left out.  In a
        single process, or for a policy that needs no agreement, the report goes
        straight to the inner decider.
        """
        cost = check_cost(stall_seconds, write_seconds)
        if self.deterministic:
            self.inner.note_cost(*cost)
        elif self.rank == 0:
            # the estimate reads only the newest COST_WINDOW reports: older ones cannot change it
            self._pending_costs = (self._pending_costs + [cost])[-COST_WINDOW:]

    def state_dict(self) -> dict:
        """The inner decider's state, unchanged.

        The inner deciders of all ranks saw identical inputs, so rank 0's state
        is every rank's.  Nothing about the sync schedule needs saving: after
        :meth:`load_state_dict` the next call is a sync step on every rank and
        the interval ramps up again from one step.  Keeping the inner format
        means a checkpoint written under DDP resumes in a single process (and
        the other way round).  The save costs the ranks agreed on are part of
        it (``costs``), so an ``adaptive`` rule resumes with the same interval;
        a cost rank 0 reported after the latest sync is not in it yet.
        """
        return self.inner.state_dict()

    def load_state_dict(self, d: Mapping[str, Any]) -> Any:
        """Restore the inner decider; the next call is a sync step on every rank.

        Returns what the inner decider's ``load_state_dict`` returns (which
        rules kept their state, see :class:`saverules.engine.decider.Resumed`).
        """
        resumed = self.inner.load_state_dict(d)
        self._next_sync = None
        self._interval = 1
        self._last_sync_step = None
        self._last_sync_clock = None
        self._pending_signals = set()
        self._pending_costs = []
        return resumed

    def fresh_state(self, step: int, time: float | None = None) -> dict:
        """The inner decider's state after a save at ``step``, with no rule state."""
        return self.inner.fresh_state(step, time)

    # -- the sync itself ---------------------------------------------------------

    @property
    def next_sync(self) -> int | None:
        """The step of the next scheduled sync (``None``: the next call)."""
        return self._next_sync

    def _choose_interval(self, step: int, clock: float) -> int:
        """Rank 0: steps until the next sync, from the measured step rate.

        The first sync of a process schedules the next one a single step
        later, to measure.  After that the interval is the number of steps
        rank 0 ran per ``sync_seconds`` since the previous sync, at most double
        the previous interval (one fast measurement cannot push the next sync
        far out), at least one step, and at most ``max_interval``.
        """
        if self._last_sync_step is None or self._last_sync_clock is None:
            return 1
        return _next_interval(self._interval, step - self._last_sync_step, clock - self._last_sync_clock,
                              self.sync_seconds, self.max_interval)

    def _sync(self, progress: Progress, metrics: Mapping[str, float] | None):
        step = progress.step
        vec = [_NEG] * _LEN
        for i in range(_SIG_BASE, _SIG_BASE + _NSIG):
            vec[i] = 0.0
        vec[_ANY_UNNAMED] = 0.0
        vec[_HAS_TIME] = 0.0
        for code in self._pending_signals:
            if code > 0:
                vec[_SIG_BASE + code - 1] = 1.0
            else:
                vec[_ANY_UNNAMED] = 1.0
        if self.rank == 0:
            clock = progress.time if progress.time is not None else _time.perf_counter()
            k = self._choose_interval(step, clock)
            self._last_clock_candidate = clock
            if progress.time is not None:
                vec[_TIME] = float(progress.time)
                vec[_HAS_TIME] = 1.0
            vec[_NEXT] = float(step + k)
            vec[_INTERVAL] = float(k)
            costs = self._pending_costs
            vec[_COST_COUNT] = float(len(costs))
            for i, (stall, write) in enumerate(costs):
                vec[_COST_BASE + 2 * i] = stall
                vec[_COST_BASE + 2 * i + 1] = write
        out = self._allreduce_max(vec)
        self._pending_costs = []
        for i in range(int(out[_COST_COUNT]) if out[_COST_COUNT] > 0 else 0):
            # rank 0's reports, the same numbers on every rank, taken before this step's decision
            self.inner.note_cost(out[_COST_BASE + 2 * i], out[_COST_BASE + 2 * i + 1])
        send_metrics = metrics is not None and not self.metrics_synced
        if send_metrics:
            metrics = self._broadcast_object(dict(metrics or {}) if self.rank == 0 else None)
        self.syncs += 1

        time_ = out[_TIME] if out[_HAS_TIME] > 0 else None
        self._synced_time = time_
        self._next_sync = int(out[_NEXT])
        self._interval = int(out[_INTERVAL])
        self._last_sync_step = step
        if self.rank == 0:
            self._last_sync_clock = self._last_clock_candidate

        got = [signal_from_code(i + 1) for i in range(_NSIG) if out[_SIG_BASE + i] > 0]
        named = [n for n in got if n is not True]
        first = [n for n in _FIRST if n in named]
        sigs = first + [n for n in named if n not in first]
        if out[_ANY_UNNAMED] > 0 or len(named) < len(got):
            sigs.append(True)
        self._pending_signals = set()
        return time_, tuple(sigs), metrics

    # The two transport functions; tests may replace them.

    def _tensor_device(self):
        if self._device is None:
            import torch
            import torch.distributed as dist

            backend = dist.get_backend(self.group)
            if str(backend).lower() == "nccl":
                self._device = torch.device("cuda", torch.cuda.current_device())
            else:
                self._device = torch.device("cpu")
        return self._device

    def _allreduce_max(self, vec: list) -> list:
        import torch
        import torch.distributed as dist

        t = torch.tensor(vec, dtype=torch.float64, device=self._tensor_device())
        self.collectives += 1
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return t.cpu().tolist()

    def _broadcast_object(self, obj: Any) -> Any:
        import torch.distributed as dist

        src = 0 if self.group is None else dist.get_global_rank(self.group, 0)
        box = [obj]
        self.collectives += 1
        dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]

    def __repr__(self) -> str:
        return (
            f"SyncedDecider(rank={self.rank}, world_size={self.world_size}, "
            f"sync_seconds={self.sync_seconds}, deterministic={self.deterministic}, "
            f"collectives={self.collectives})"
        )
