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

See docs/ddp.md for the protocol and the exact lateness bound.

torch is imported lazily, inside the functions that talk to the process
group, so that ``import saverules`` never imports torch.
"""
from __future__ import annotations

import math
import signal as _signal
import time as _time
from typing import Any, Mapping, Optional

from .progress import Decision, Progress

__all__ = ["SyncedDecider", "signal_code", "signal_from_code", "dist_info"]

# Layout of the float64 vector reduced (with MAX) at each sync step.
_TIME = 0          # rank 0's clock; -inf elsewhere
_HAS_TIME = 1      # 1.0 if rank 0 had a clock reading
_NEXT = 2          # next sync step chosen by rank 0; -inf elsewhere
_INTERVAL = 3      # the interval (steps) rank 0 chose
_R0_SIGNAL = 4     # rank 0's own signal code (0 none, -1 unnamed); -inf elsewhere
_ANY_UNNAMED = 5   # 1.0 if some rank saw an unnamed signal (signal=True)
_SIG_BASE = 6      # one slot per signal number 1..64: 1.0 if some rank saw it
_NSIG = 64
_LEN = _SIG_BASE + _NSIG

_NEG = float("-inf")


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
        seconds per step between syncs and schedules the next sync about this
        far ahead.  Signals and time rules act at most this late (plus one
        step) while the step time is steady.  Default 1.0.
    max_interval:
        Optional cap on the number of steps between two syncs, whatever the
        step rate.
    metrics_synced:
        Set when the loop already reports the same metric values on every
        rank (for example after it all-reduced its eval loss).  Metric steps
        then need no collective.
    rank, world_size:
        Override the group's rank and size (tests).
    """

    def __init__(
        self,
        decider: Any,
        group: Any = None,
        *,
        sync_seconds: float = 1.0,
        max_interval: Optional[int] = None,
        metrics_synced: bool = False,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
    ) -> None:
        if not (isinstance(sync_seconds, (int, float)) and sync_seconds > 0 and math.isfinite(sync_seconds)):
            raise ValueError(f"sync_seconds must be a positive number of seconds, got {sync_seconds!r}")
        if max_interval is not None and (not isinstance(max_interval, int) or max_interval < 1):
            raise ValueError(f"max_interval must be a positive integer or None, got {max_interval!r}")
        self.inner = decider
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

        self._watch_time = bool(getattr(decider, "watches_time", True))
        self._watch_signals = bool(getattr(decider, "watches_signals", True))
        self._watch_metrics = bool(getattr(decider, "watches_metrics", True))
        #: True when the decision needs no communication at all.
        self.deterministic = not (self._watch_time or self._watch_signals or self._watch_metrics) or self.world_size <= 1

        #: Number of collective calls this wrapper has issued.
        self.collectives = 0
        #: Number of sync steps (a metric sync counts once, though it issues two calls).
        self.syncs = 0
        #: The signal the inner decider saw on the latest call: the same on
        #: every rank (False between sync steps).  A loop that must stop on
        #: SIGTERM stops when this says so, so that all ranks stop together.
        #: For a policy without signal rules it is this rank's own signal.
        self.last_signal: Any = False

        self._next_sync: Optional[int] = None   # None: the next call syncs
        self._interval = 1                      # steps between the last two syncs
        self._last_sync_step: Optional[int] = None
        self._last_sync_clock: Optional[float] = None  # rank 0's rate clock at the last sync
        self._synced_time: Optional[float] = None      # rank 0's Progress.time at the last sync
        self._pending_signal = 0                # latched local signal code since the last sync
        self._last_clock_candidate: Optional[float] = None
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
            return self.inner(progress)
        step = progress.step
        if progress.signal is not False and progress.signal is not None:
            code = signal_code(progress.signal)
            if code != 0 and (self._pending_signal == 0 or self._pending_signal == -1):
                self._pending_signal = code
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
        time_, sig, metrics = self._sync(progress, metrics)
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

    def note_save(self, step: int, time: Optional[float] = None) -> None:
        """Tell the decider about a save it did not decide.

        Must be called on every rank at the same step.  The clock recorded is
        rank 0's reading from the last sync (identical on every rank), not this
        rank's ``time``, so that the ranks' time rules stay in agreement.
        """
        if self.deterministic:
            self.inner.note_save(step, time)
        else:
            self.inner.note_save(step, self._synced_time if self._watch_time else None)

    def state_dict(self) -> dict:
        """The inner decider's state, unchanged.

        The inner deciders of all ranks saw identical inputs, so rank 0's state
        is every rank's.  Nothing about the sync schedule needs saving: after
        :meth:`load_state_dict` the next call is a sync step on every rank and
        the interval ramps up again from one step.  Keeping the inner format
        means a checkpoint written under DDP resumes in a single process (and
        the other way round).
        """
        return self.inner.state_dict()

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        """Restore the inner decider; the next call is a sync step on every rank."""
        self.inner.load_state_dict(d)
        self._next_sync = None
        self._interval = 1
        self._last_sync_step = None
        self._last_sync_clock = None
        self._pending_signal = 0

    # -- the sync itself ---------------------------------------------------------

    @property
    def next_sync(self) -> Optional[int]:
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
        prev = self._interval
        steps = step - self._last_sync_step
        dt = clock - self._last_sync_clock
        if steps <= 0:
            k = prev
        elif dt <= 0:
            k = 2 * prev
        else:
            k = int(self.sync_seconds * steps / dt * (1 + 1e-9))  # tolerate rounding
        k = max(1, min(k, 2 * prev))
        if self.max_interval is not None:
            k = min(k, self.max_interval)
        return k

    def _sync(self, progress: Progress, metrics: Optional[Mapping[str, float]]):
        step = progress.step
        vec = [_NEG] * _LEN
        for i in range(_SIG_BASE, _LEN):
            vec[i] = 0.0
        vec[_ANY_UNNAMED] = 0.0
        vec[_HAS_TIME] = 0.0
        code = self._pending_signal
        if code > 0:
            vec[_SIG_BASE + code - 1] = 1.0
        elif code < 0:
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
            vec[_R0_SIGNAL] = float(code)
        out = self._allreduce_max(vec)
        send_metrics = metrics is not None and not self.metrics_synced
        if send_metrics:
            metrics = self._broadcast_object(dict(metrics) if self.rank == 0 else None)
        self.syncs += 1

        time_ = out[_TIME] if out[_HAS_TIME] > 0 else None
        self._synced_time = time_
        self._next_sync = int(out[_NEXT])
        self._interval = int(out[_INTERVAL])
        self._last_sync_step = step
        if self.rank == 0:
            self._last_sync_clock = self._last_clock_candidate

        r0 = int(out[_R0_SIGNAL])
        if r0 != 0:
            sig = signal_from_code(r0)
        else:
            sig = False
            for i in range(_NSIG):
                if out[_SIG_BASE + i] > 0:
                    sig = signal_from_code(i + 1)
                    break
            if sig is False and out[_ANY_UNNAMED] > 0:
                sig = True
        self._pending_signal = 0
        return time_, sig, metrics

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
