"""What the trainer integrations share: options, the training clock, signals, the decider.

:mod:`saverules.transformers` and :mod:`saverules.lightning` both turn a
trainer's hooks into one :class:`~saverules.engine.progress.Progress` per optimizer
step.  This module holds the parts that do not depend on either framework: the
checked keyword options, a training clock that continues across a resume,
signal flags set by handlers, the DDP-safe decider and the save log.  It
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
from typing import Any

from ..engine.policy import Policy

log = logging.getLogger("saverules")

#: The options every integration accepts, with their defaults.
COMMON_OPTIONS: dict[str, Any] = {
    "sync_seconds": 1.0,
    "signals": ("SIGTERM", "SIGUSR1"),
}


class ConflictingSettingsError(ValueError):
    """A trainer setting would make the trainer save or delete checkpoints on its own."""


def load_policy(policy: Any, owner: str) -> Policy:
    """A :class:`Policy` from a Policy or a path; anything else is a TypeError that says what to pass."""
    if isinstance(policy, Policy):
        return policy
    if isinstance(policy, (str, os.PathLike)):
        import saverules

        if not os.path.exists(policy):
            raise FileNotFoundError(f"{owner}: policy file {os.fspath(policy)} does not exist")
        return saverules.load(policy)
    raise TypeError(
        f"{owner}(policy=...) takes a saverules.Policy or the path of a policy file, got {type(policy).__name__}"
    )


def check_options(owner: str, options: Mapping[str, Any], allowed: Mapping[str, Any]) -> dict[str, Any]:
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


def make_decider(policy: Policy, total_steps: int | None, sync_seconds: float, metrics_synced: bool,
                 sync_signals: bool = False):
    """The compiled policy wrapped in a :class:`~saverules.distributed.SyncedDecider`.

    In one process, or for a policy that reads only steps and epochs, the
    wrapper issues no collective at all.
    """
    from ..distributed import SyncedDecider
    from ..engine.rules import uses_cost

    if any(uses_cost(rule) for rule in policy.rules):
        # the trainer writes its own checkpoints, so no save cost reaches the decider:
        # an adaptive rule would plan from min_every for ever
        raise ValueError("adaptive rules need the measured save cost, which the trainer callbacks do not report "
                         "yet: use every_time here, or saverules.torch.Checkpointer in your own loop")
    inner = policy.compile(total_steps=total_steps)
    return SyncedDecider(inner, sync_seconds=sync_seconds, metrics_synced=metrics_synced,
                         sync_signals=sync_signals)


def restore_decider(decider, data: Mapping[str, Any] | None, step: int, owner: str) -> float | None:
    """Restore the decider from the callback state saved at ``step``; return the training clock at that save.

    The decider continues by the store's one rule
    (:func:`saverules.store.restore.restore_decider`): rules that both policies
    hold keep their state, changed and new rules start fresh from ``step``, and
    one warning says which.
    """
    from ..store.restore import restore_decider as restore

    clock = None
    saved = None
    if data:
        raw = data.get("clock")
        clock = float(raw) if isinstance(raw, (int, float)) and math.isfinite(raw) else None
        saved = data.get("decider")
        digest = data.get("policy_digest")
        if isinstance(saved, dict) and saved.get("policy") is None and isinstance(digest, str):
            saved = {**saved, "policy": digest}
    restore(decider, saved, step, clock, f"the {owner} state in the checkpoint")
    return clock


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

