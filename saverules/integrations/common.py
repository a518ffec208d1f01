"""What the trainer integrations share: options, the training clock, signals, the decider.

:mod:`saverules.transformers` and :mod:`saverules.lightning` both turn a
trainer's hooks into one :class:`~saverules.engine.progress.Progress` per optimizer
step.  This module holds the parts that do not depend on either framework: the
checked keyword options, a training clock that continues across a resume,
signal flags set by handlers, the decider's restore from a callback's state and the save log.
The policy, the decider and its restore are the store's own
(:func:`saverules.store.parts.load_policy` and ``make_decider``,
:func:`saverules.store.restore.restore_decider`).  It
imports neither torch nor a framework.
"""
from __future__ import annotations

import logging
import math
import os
import signal as _signal
import sys
import time as _time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..distributed import SyncedDecider
    from ..engine.decider import Decider
    from ..engine.tiers import TieredDecider

log = logging.getLogger("saverules")

#: The options every integration accepts, with their defaults.
COMMON_OPTIONS: dict[str, Any] = {
    "sync_seconds": 1.0,
    "signals": ("SIGTERM", "SIGUSR1"),
}


class ConflictingSettingsError(ValueError):
    """A trainer setting would make the trainer save or delete checkpoints on its own."""


def check_callback_options(owner: str, options: Mapping[str, Any], allowed: Mapping[str, Any]) -> dict[str, Any]:
    """Validate keyword options against ``allowed`` (name -> default); unknown names and bad values raise."""
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        import difflib

        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, allowed, n=1)
            hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise TypeError(
            f"{owner} got unknown option{'s' if len(unknown) > 1 else ''} {', '.join(hints)}; "
            f"it accepts {', '.join(sorted(allowed))}"
        )
    out = dict(allowed)
    out.update(options)
    sync = out["sync_seconds"]
    if isinstance(sync, bool) or not isinstance(sync, (int, float)) or not (sync > 0 and math.isfinite(sync)):
        raise ValueError(f"{owner}: sync_seconds must be a positive number of seconds, got {sync!r}")
    out["sync_seconds"] = float(sync)
    sigs = out["signals"]
    if isinstance(sigs, str) or not isinstance(sigs, (tuple, list)):
        raise TypeError(f"{owner}: signals must be a list of signal names such as ['SIGTERM'], got {sigs!r}")
    names = []
    for sig in sigs:
        name = str(sig).upper() if isinstance(sig, str) else sig
        if isinstance(name, str) and not name.startswith("SIG"):
            name = "SIG" + name
        if not isinstance(name, str) or not hasattr(_signal, name) or name in ("SIGKILL", "SIGSTOP"):
            raise ValueError(f"{owner}: {sig!r} in signals is not a signal this process can catch")
        names.append(name)
    out["signals"] = tuple(names)
    for key, default in allowed.items():
        if isinstance(default, bool) and not isinstance(out[key], bool):
            raise TypeError(f"{owner}: {key} must be true or false, got {out[key]!r}")
    return out


class TrainingClock:
    """Seconds of training, continuous across resumes (as ``Checkpointer.clock()`` is)."""

    def __init__(self) -> None:
        self.offset = 0.0
        self.t0 = _time.monotonic()

    def now(self) -> float:
        return self.offset + (_time.monotonic() - self.t0)

    def restore(self, seconds: float | None) -> None:
        self.offset = float(seconds or 0.0)
        self.t0 = _time.monotonic()


class SignalFlags:
    """Handlers that only record which signals arrived; the next decision takes them.

    Installed for the signals the integration handles, restored on
    :meth:`uninstall`.  A signal whose previous handler was a Python function
    still reaches that function.
    """

    def __init__(self) -> None:
        self.pending: list = []
        self._previous: dict[int, Any] = {}

    def install(self, names) -> None:
        if self._previous:
            return
        for name in names:
            num = getattr(_signal, name)
            try:
                self._previous[num] = _signal.signal(num, self._handler)
            except ValueError:  # not the main thread: the trainer's own handling applies
                continue

    def _handler(self, signum: int, frame: Any) -> None:
        name = _signal.Signals(signum).name
        if name not in self.pending:
            self.pending.append(name)
        previous = self._previous.get(signum)
        if callable(previous):
            previous(signum, frame)

    def take(self) -> Any:
        """The first pending signal's name (SIGTERM first), or False; clears them."""
        if not self.pending:
            return False
        pending, self.pending = self.pending, []
        return "SIGTERM" if "SIGTERM" in pending else pending[0]

    def uninstall(self) -> None:
        for num, previous in self._previous.items():
            try:
                _signal.signal(num, previous if previous is not None else _signal.SIG_DFL)
            except (ValueError, TypeError):
                pass
        self._previous = {}


def resume_costs(decider: Decider | TieredDecider | SyncedDecider, data: Mapping[str, Any] | None, step: int, owner: str,
                 checkpoint: str | os.PathLike | None) -> tuple[float | None, list[tuple[float, float]]]:
    """Restore ``decider`` from the callback state saved at ``step``: the training clock at that
    save and the save costs it plans with.

    ``data`` is what the callback saved inside the checkpoint (``decider``, ``clock``,
    ``policy_digest``); the decider continues by the store's one rule
    (:func:`saverules.store.restore.restore_decider`): rules that both policies hold keep
    their state, changed and new rules start fresh from ``step``, and one warning says which.
    That state was written during the save, before the save's own cost was known: the
    checkpoint's manifest (``checkpoint``) records the costs up to and including it
    (``save_costs``), and they take the place of the state's, so the resumed decider plans
    the interval the uninterrupted one would.  Every rank reads the same manifest, beside
    the files it resumes from.
    """
    from ..store.restore import restore_decider
    from . import manifest as fm

    clock = None
    saved = None
    digest = None
    if data:
        raw = data.get("clock")
        clock = float(raw) if isinstance(raw, (int, float)) and math.isfinite(raw) else None
        saved = data.get("decider")
        found = data.get("policy_digest")
        digest = found if isinstance(found, str) else None
    recorded = fm.save_costs_of(checkpoint, step, clock) if checkpoint is not None else None
    if recorded is not None and isinstance(saved, Mapping):
        saved = {**saved, "costs": [list(c) for c in recorded]}
    restore_decider(decider, saved, step, clock, f"the {owner} state in the checkpoint", digest)
    state = decider.state_dict()
    costs = [(float(c), float(w)) for c, w in state.get("costs") or ()]
    return clock, costs


def note_cost(decider: Decider | TieredDecider | SyncedDecider, costs: list[tuple[float, float]],
              seconds: float) -> list[tuple[float, float]]:
    """Report a synchronous save that stalled training ``seconds`` (stall = write); the latest costs, newest last."""
    from ..engine.cost import COST_WINDOW

    decider.note_cost(seconds, seconds)
    return (costs + [(seconds, seconds)])[-COST_WINDOW:]


def agreed_signals(decider: Decider | TieredDecider | SyncedDecider, signal: Any) -> tuple[Any, ...]:
    """The signals the latest decision saw: every rank's under DDP, else this process's own ``signal``."""
    from ..distributed import SyncedDecider

    if isinstance(decider, SyncedDecider):
        return decider.last_signals
    return (signal,) if signal not in (False, None, 0) else ()


class SaveTimer:
    """What one save stalls training, timed on the training thread (``time.perf_counter``).

    ``start`` when the callback asks for the save (again after anything at that step
    that is not the save, such as an evaluation), ``stop`` when the save has ended.
    """

    def __init__(self) -> None:
        self.started: float | None = None

    def start(self) -> None:
        self.started = _time.perf_counter()

    def stop(self) -> float | None:
        """Seconds since ``start`` (None when no save was asked for); the timer is then idle."""
        started, self.started = self.started, None
        return None if started is None else max(0.0, _time.perf_counter() - started)


def say(message: str) -> None:
    """Log a save or a removal: through the ``saverules`` logger, shown on stderr when nothing else is set up."""
    if not log.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("saverules: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    log.info(message)


def describe(step: int, reasons: tuple[str, ...]) -> str:
    return f"saved step {step}: {', '.join(reasons) or 'requested'}"

