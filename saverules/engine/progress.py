"""The data that flows into and out of a decision.

Everything a rule may look at arrives on a :class:`Progress`: the step, the
run's length, epoch boundaries, the training clock, reported metrics and
preemption signals.  No rule reads a clock or a global itself.
"""
from __future__ import annotations

import math
import operator
import signal as _signal
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeAlias

SignalLike: TypeAlias = bool | str | int | None

#: The fields of a Progress, in the order its constructor takes them.
FIELDS = ("step", "total_steps", "epoch", "epoch_end", "is_last", "time", "metrics", "signal")

#: Signal names a Progress may carry ("SIGTERM"; "TERM" and "sigterm" name it too).
SIGNAL_NAMES = frozenset(s.name for s in _signal.Signals if not s.name.startswith("SIG_"))


class Progress:
    """Where the training loop is, at one decision.

    ``step`` counts completed optimizer steps across epochs, starting at 1
    after the first update.  ``epoch`` is the 0-based epoch that ``step``
    belongs to and ``epoch_end`` is true on the last step of that epoch.
    ``is_last`` is ``True`` on the run's last step when the loop knows it,
    ``None`` when it does not say.  ``time`` is the run's training clock in
    seconds (monotonic, continuous across resumes).  ``metrics`` maps metric
    names to numbers on the steps where they are reported.  ``signal`` is
    ``False``, ``True`` (some preemption signal arrived), or the signal's name
    (``"SIGTERM"``) or number.

    A Progress is checked when it is built: a wrong type or an out-of-range
    value raises ``TypeError`` or ``ValueError`` at once, naming the field.
    Integers of other types (numpy, a 0-d torch tensor) are converted to
    ``int`` and numbers to ``float``; ``bool`` is not a number here.  Its
    fields are read-only; :meth:`replace` makes a changed copy.
    """

    # Built on every training step, so the constructor is on the hot path.
    # The values live in private slots (a slot store is the cheapest way to
    # fill an object); the public fields are read-only properties over them.
    # Values of the exact expected types pass one inline test; anything else
    # goes through the full check, which converts or raises.
    __slots__ = ("_step", "_total_steps", "_epoch", "_epoch_end", "_is_last", "_time", "_metrics", "_signal")

    def __init__(
        self,
        step: int,
        total_steps: int | None = None,
        epoch: int = 0,
        epoch_end: bool = False,
        is_last: bool | None = None,
        time: float | None = None,
        metrics: Mapping[str, float] | None = None,
        signal: SignalLike = False,
    ) -> None:
        if not (
            type(step) is int and step > 0
            and (total_steps is None or type(total_steps) is int and total_steps > 0)
            and type(epoch) is int and epoch >= 0
            and (epoch_end is False or epoch_end is True)
            and (is_last is None or is_last is True or is_last is False)
            and (time is None or type(time) is float and time - time == 0.0)
            and metrics is None
            and (signal is False or signal is True)
        ):
            step, total_steps, epoch, epoch_end, is_last, time, metrics, signal = _checked(
                step, total_steps, epoch, epoch_end, is_last, time, metrics, signal
            )
        self._step = step
        self._total_steps = total_steps
        self._epoch = epoch
        self._epoch_end = epoch_end
        self._is_last = is_last
        self._time = time
        self._metrics = metrics
        self._signal = signal

    step = property(operator.attrgetter("_step"), doc="completed optimizer steps (>= 1)")
    total_steps = property(operator.attrgetter("_total_steps"), doc="the run's length, or None")
    epoch = property(operator.attrgetter("_epoch"), doc="the 0-based epoch of this step")
    epoch_end = property(operator.attrgetter("_epoch_end"), doc="True at the step that ends an epoch")
    is_last = property(operator.attrgetter("_is_last"), doc="True at the run's last step, None if not said")
    time = property(operator.attrgetter("_time"), doc="the training clock in seconds, or None")
    metrics = property(operator.attrgetter("_metrics"), doc="metric name -> number, or None")
    signal = property(operator.attrgetter("_signal"), doc="False, True, or a signal's name or number")

    def _fields(self) -> tuple:
        return (self._step, self._total_steps, self._epoch, self._epoch_end, self._is_last, self._time,
                self._metrics, self._signal)

    def replace(self, **changes) -> Progress:
        """A copy with some fields changed (checked like a new Progress)."""
        unknown = set(changes) - set(FIELDS)
        if unknown:
            raise TypeError(f"Progress has no field {sorted(unknown)[0]!r}; its fields are {', '.join(FIELDS)}")
        return type(self)(*(changes.get(name, value) for name, value in zip(FIELDS, self._fields())))

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        inner = ", ".join(f"{name}={value!r}" for name, value in zip(FIELDS, self._fields()))
        return f"{type(self).__name__}({inner})"

    def __reduce__(self):
        return (type(self), self._fields())


# -- the full check -----------------------------------------------------------------


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__module__ + '.' if type(value).__module__ != 'builtins' else ''}{type(value).__qualname__})"


def _integer(name: str, value: Any, low: int, owner: str = "Progress.") -> int:
    if isinstance(value, bool) or isinstance(value, float):
        raise TypeError(f"{owner}{name} must be an int >= {low}, got {_describe(value)}")
    try:
        n = operator.index(value)  # int, numpy and torch integers
    except TypeError:
        raise TypeError(f"{owner}{name} must be an int >= {low}, got {_describe(value)}") from None
    if n < low:
        hint = " (steps count completed optimizer steps: the first is 1)" if name == "step" else ""
        raise ValueError(f"{owner}{name} must be >= {low}, got {n}{hint}")
    return n


def checked_total(value: Any, where: str) -> int | None:
    """A run length given outside a Progress (``where`` names the argument): None or an int >= 1."""
    return None if value is None else _integer(where, value, 1, owner="")


def _flag(name: str, value: Any, optional: bool) -> bool | None:
    if value is True or value is False or (optional and value is None):
        return value
    kind = type(value)
    if kind.__module__ == "numpy" and kind.__name__ in ("bool_", "bool"):
        return bool(value)  # a comparison of numpy integers
    allowed = "True, False or None" if optional else "True or False"
    raise TypeError(f"Progress.{name} must be {allowed}, got {_describe(value)}; pass bool(...) if it is a flag")


def _number(what: str, value: Any) -> float:
    """``value`` as a float (ints, numpy and torch scalars convert); bool and str are refused."""
    if type(value) is float:
        return value
    if isinstance(value, (bool, str, bytes)) or not (
        hasattr(type(value), "__float__") or hasattr(type(value), "__index__")
    ):
        raise TypeError(f"{what} must be a number, got {_describe(value)}")
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise TypeError(f"{what} must be a number, got {_describe(value)} ({exc})") from None


def _time(value: Any) -> float | None:
    if value is None:
        return None
    t = _number("Progress.time (seconds of training)", value)
    if not math.isfinite(t):
        raise ValueError(f"Progress.time must be a finite number of seconds, got {t!r}")
    return t


def _metrics(value: Any) -> dict | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise TypeError(f"Progress.metrics must be a mapping of metric names to numbers, got {_describe(value)}")
    out = {}
    for key, v in value.items():
        if not isinstance(key, str):
            raise TypeError(f"Progress.metrics keys must be metric names (str), got {_describe(key)}")
        out[key] = _number(f"Progress.metrics[{key!r}]", v)
    return out


def _signal_value(value: Any) -> SignalLike:
    if value is None or value is False or value is True:
        return value
    if isinstance(value, str):
        name = value.strip().upper()
        if not name.startswith("SIG"):
            name = "SIG" + name
        if name not in SIGNAL_NAMES:
            raise ValueError(
                f"Progress.signal {value!r} is not a known signal name; use one of "
                f"{', '.join(sorted(n for n in SIGNAL_NAMES if not n.startswith('SIGRT')))}, "
                "a signal number, True (some signal) or False"
            )
        return value
    if isinstance(value, float):
        raise TypeError(f"Progress.signal must be a signal name, number, True or False, got {_describe(value)}")
    try:
        n = operator.index(value)
    except TypeError:
        raise TypeError(
            f"Progress.signal must be a signal name (\"SIGTERM\"), a signal number, True or False, got "
            f"{_describe(value)}"
        ) from None
    if n == 0:
        return False  # 0 is "no signal", as in signal-number APIs
    if not 0 < n < _signal.NSIG:
        raise ValueError(f"Progress.signal {n} is not a signal number of this platform (1 to {_signal.NSIG - 1})")
    return n


def _checked(step, total_steps, epoch, epoch_end, is_last, time, metrics, signal) -> tuple:
    return (
        _integer("step", step, 1),
        None if total_steps is None else _integer("total_steps", total_steps, 1),
        _integer("epoch", epoch, 0),
        _flag("epoch_end", epoch_end, optional=False),
        _flag("is_last", is_last, optional=True),
        _time(time),
        _metrics(metrics),
        _signal_value(signal),
    )


class Decision(NamedTuple):
    """The answer for one step: save or not, and the name of every rule that fired.

    ``reasons`` names the rules of the local tier (the top level of the
    policy) that fired, ``durable`` those of the durable tier (``[durable]``,
    see :mod:`saverules.engine.tiers`).  A durable save promotes a local
    checkpoint, so ``save`` is true when either is non-empty.
    """

    save: bool
    reasons: tuple = ()
    durable: tuple = ()

    def __bool__(self) -> bool:  # ``if decider(progress): ...`` reads naturally
        return self.save

    @property
    def tiers(self) -> tuple[str, ...]:
        """The tiers this decision saves to: ``()``, ``("local",)`` or ``("local", "durable")``
        (a durable save is a local save promoted)."""
        if self.durable:
            return ("local", "durable")
        return ("local",) if self.save else ()


NO_SAVE = Decision(False, ())


@dataclass(frozen=True)
class Checkpoint:
    """A saved checkpoint as retention sees it."""

    step: int
    time: float | None = None
    metrics: Mapping[str, float] | None = None
    final: bool = False


__all__ = ["Progress", "Decision", "Checkpoint", "NO_SAVE"]
