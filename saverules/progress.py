"""The data that flows into and out of a decision.

Everything a rule may look at arrives on a :class:`Progress`: the step, the
run's length, epoch boundaries, the training clock, reported metrics and
preemption signals.  No rule reads a clock or a global itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, NamedTuple, Optional, Union

SignalLike = Union[bool, str, int, None]


@dataclass(frozen=True)
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
    """

    step: int
    total_steps: Optional[int] = None
    epoch: int = 0
    epoch_end: bool = False
    is_last: Optional[bool] = None
    time: Optional[float] = None
    metrics: Optional[Mapping[str, float]] = None
    signal: SignalLike = False

    # A Progress is built on every training step, so its constructor is on the
    # hot path.  The generated frozen-dataclass __init__ calls
    # object.__setattr__ once per field; filling the instance dict directly is
    # about twice as fast and behaves the same (the instance stays frozen).
    def __init__(
        self,
        step: int,
        total_steps: Optional[int] = None,
        epoch: int = 0,
        epoch_end: bool = False,
        is_last: Optional[bool] = None,
        time: Optional[float] = None,
        metrics: Optional[Mapping[str, float]] = None,
        signal: SignalLike = False,
    ) -> None:
        d = self.__dict__
        d["step"] = step
        d["total_steps"] = total_steps
        d["epoch"] = epoch
        d["epoch_end"] = epoch_end
        d["is_last"] = is_last
        d["time"] = time
        d["metrics"] = metrics
        d["signal"] = signal


class Decision(NamedTuple):
    """The answer for one step: save or not, and the name of every rule that fired."""

    save: bool
    reasons: tuple = ()

    def __bool__(self) -> bool:  # ``if decider(progress): ...`` reads naturally
        return self.save


NO_SAVE = Decision(False, ())


@dataclass(frozen=True)
class Checkpoint:
    """A saved checkpoint as retention sees it."""

    step: int
    time: Optional[float] = None
    metrics: Optional[Mapping[str, float]] = None
    final: bool = False


__all__ = ["Progress", "Decision", "Checkpoint", "NO_SAVE"]
