"""Rule models -> runtime nodes.

A node answers two questions about one rule:

* ``fires(progress, run)``: does the rule fire at this decision?  Every child
  of a combinator is always evaluated (no short-circuit), so stateful rules
  such as ``improved`` see every report.
* ``next_step(after, run)``: a lower bound on the first step after ``after``
  at which the rule could fire while the run is *quiet*: no signal, no epoch
  end, no metrics, no ``is_last``, and the training clock below
  :meth:`time_threshold`.  The decider skips evaluation below this bound and
  the simulator jumps straight to it.  A bound may be early (evaluation then
  finds nothing), never late.  It holds whatever the previously decided step
  is, as long as it is at least ``after``: the decider is called with steps
  that jump, so the bound must not assume the steps in between were decided.
  A decision may also repeat the step ``after`` itself: a rule that may fire
  on such a repeat (``window``, ``not``) reports ``after``.
* ``next_fire(after, run)``: the same bound for a run that is asked at every
  step (the previously decided step is always ``step - 1``).  It may be later
  than ``next_step`` (``all`` leapfrogs to a step where every child fires at
  once); the simulator uses it to jump over steps at which nothing happens.
  In a simulation (``run._sim`` holds the run's shape) the clock and the
  epoch ends are known in advance, so ``every_time`` and ``epoch_end`` report
  where they fire too.
* ``next_change(after, run)``: where a rule's own state may change even though
  its parent does not fire (a ``final`` nested in ``all`` remembers that the
  total was reached).  Decisions are only skipped below this step too.

``run`` is the :class:`~saverules.engine.decider.Decider`; nodes read its
``_prev`` (the previously decided step), ``_last_save_step``,
``_last_save_time`` and ``_total``.  Shares of the run are resolved here,
once per total.

A rule kind lives in one place: its node class says which rule model it is
built from (``@builds(Model)``, with the node's ``from_rule``) and which
:data:`EVENTS` of a Progress it reacts to (``events``).  The decider's quiet
path and its per-event lists, and the checker's "fires on events" notes, read
that declaration (:func:`rule_events`); nothing else lists the kinds.  Every
model of the rule union (:data:`~saverules.engine.rules.RULE_KINDS`) must have
a node: a kind without one fails at import.
"""
from __future__ import annotations

import math
import signal as _signal
from bisect import bisect_right
from collections.abc import Callable

from .quantities import Share, resolve_steps
from .rules import (
    RULE_KINDS,
    AdaptiveRule,
    AllRule,
    AnyRule,
    AtStepsRule,
    EpochEndRule,
    EveryStepsRule,
    EveryTimeRule,
    FinalRule,
    ImprovedRule,
    NotRule,
    OnSignalRule,
    PiecewiseRule,
    RuleModel,
    TailRule,
    WindowRule,
    describe,
    interval_annotation,
    uses_cost,
    walk,
)

INF = 1 << 64  # beyond any step (steps are at most 2^63 - 1)
_NEVER = math.inf


class ResolveError(ValueError):
    """A rule that cannot be resolved for this run; ``path`` locates it in the document."""

    def __init__(self, path: tuple, message: str):
        super().__init__(message)
        self.path = path


# -- the events of a Progress a rule may react to, beside the step ----------------

LAST = "is_last"  # the loop says this is the run's last step
SIGNAL = "signal"  # a preemption signal arrived
EPOCH_END = "epoch_end"  # an epoch ended at this step
METRICS = "metrics"  # metrics were reported at this step
CLOCK = "clock"  # the training clock (Progress.time) passed a threshold
#: Every event, in the order the decider's quiet path tests them.
EVENTS = (LAST, SIGNAL, EPOCH_END, METRICS, CLOCK)


class Node:
    children: tuple = ()
    #: The events (of :data:`EVENTS`) at which this rule may fire or change its state
    #: while its step bound has not come: a decision carrying one evaluates the rule.
    #: A ``CLOCK`` node also has ``clock_offset(run)``.
    events: frozenset[str] = frozenset()

    @classmethod
    def from_rule(cls, rule: RuleModel, total: int | None, path: tuple) -> Node:  # pragma: no cover - abstract
        """The node for ``rule`` (at document path ``path``) in a run of ``total`` steps."""
        raise NotImplementedError

    def fires(self, p, run) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def next_step(self, after: int, run) -> int:
        return INF

    def next_fire(self, after: int, run) -> int:
        return self.next_step(after, run)

    def next_change(self, after: int, run) -> int:
        """Lowest step after ``after`` at which evaluating this rule, or a rule nested
        in it, may change its state while the run is quiet.  Skipping a decision is
        only sound below it, even when the rule itself cannot fire there."""
        return min((c.next_change(after, run) for c in self.children), default=INF)

    def time_threshold(self, run) -> float:
        return min((c.time_threshold(run) for c in self.children), default=_NEVER)

    def walk(self):
        yield self
        for child in self.children:
            yield from child.walk()

    def reacts_to(self) -> frozenset[str]:
        """The events this rule, or a rule nested in it, reacts to."""
        return frozenset().union(*(n.events for n in self.walk()))


#: rule model class -> the node class built from it (filled by :func:`builds`)
NODE_OF: dict[type, type[Node]] = {}


def builds(model: type[RuleModel]) -> Callable[[type[Node]], type[Node]]:
    """Register the decorated node class as the one built from rule ``model``."""

    def register(cls: type[Node]) -> type[Node]:
        NODE_OF[model] = cls
        return cls

    return register


def _steps(value, total, path):
    try:
        return resolve_steps(value, total)
    except ValueError as exc:
        raise ResolveError(path, f"{exc}: give the run's total_steps (in [run], to compile() or on the Progress)") from None


# -- step rules: pure functions of (previous step, step] ---------------------


@builds(EveryStepsRule)
class EverySteps(Node):
    def __init__(self, every: int):
        self.every = every

    @classmethod
    def from_rule(cls, rule, total, path):
        return cls(_steps(rule.every, total, path + ("every",)))

    def fires(self, p, run):
        return p.step // self.every > run._prev // self.every

    def next_step(self, after, run):
        return (after // self.every + 1) * self.every


@builds(AtStepsRule)
class AtSteps(Node):
    def __init__(self, steps):
        self.steps = sorted(set(steps))

    @classmethod
    def from_rule(cls, rule, total, path):
        return cls(_steps(s, total, path + ("steps", i)) for i, s in enumerate(rule.steps))

    def fires(self, p, run):
        i = bisect_right(self.steps, run._prev)
        return i < len(self.steps) and self.steps[i] <= p.step

    def next_step(self, after, run):
        i = bisect_right(self.steps, after)
        return self.steps[i] if i < len(self.steps) else INF


@builds(PiecewiseRule)
class Piecewise(Node):
    def __init__(self, segments):
        # (every, low, high): fires at multiples of every in (low, high]
        self.segments = segments
        self.highs = [high for _, _, high in segments]  # increasing: found by bisection

    @classmethod
    def from_rule(cls, rule, total, path):
        segments, low, previous = [], 0, None
        for i, seg in enumerate(rule.segments):
            every = _steps(seg.every, total, path + ("segments", i, "every"))
            high = INF if seg.until is None else _steps(seg.until, total, path + ("segments", i, "until"))
            # Shares were checked in order at load time: if two round to the same
            # step on a short run, the later segment is empty.
            rounded = isinstance(previous, Share) and isinstance(seg.until, Share)
            previous = seg.until
            if high < low or (high == low and not rounded):
                raise ResolveError(
                    path + ("segments", i, "until"),
                    f"segments must be increasing: segments[{i}].until resolves to {high}, not after {low}",
                )
            segments.append((every, low, high))
            low = high
        return cls(segments)

    def fires(self, p, run):
        return self.next_step(run._prev, run) <= p.step

    def next_step(self, after, run):
        segments = self.segments
        for i in range(bisect_right(self.highs, after), len(segments)):
            every, low, high = segments[i]
            start = max(after, low)
            candidate = (start // every + 1) * every
            if candidate <= high:
                return candidate
        return INF


@builds(WindowRule)
class Window(Node):
    def __init__(self, after: int, until: int):
        self.after, self.until = after, until

    @classmethod
    def from_rule(cls, rule, total, path):
        return cls(0, INF)  # bounds are applied by build()

    def fires(self, p, run):
        return self.after < p.step <= self.until

    def next_step(self, after, run):
        # A window is a plain predicate of the step: asked again at the step it
        # was last asked at (a repeated decision), it is as true as it was then.
        step = max(after, self.after + 1)
        return step if step <= self.until else INF

    def next_fire(self, after, run):
        step = max(after + 1, self.after + 1)
        return step if step <= self.until else INF


@builds(FinalRule)
class Final(Node):
    """The first decision with step >= total, and any decision the loop marks is_last.

    Reaching the total fires once per run length: if the total changes (a
    resumed run that was extended or shortened), the new last step is
    guaranteed too, even when the steps are already past it.  ``is_last`` is
    the loop's word that this is the last step, so it always fires (a step is
    never saved twice, whatever fires).
    """

    events = frozenset({LAST})

    def __init__(self):
        self.reached: int | None = None  # the total whose last step was reached

    @classmethod
    def from_rule(cls, rule, total, path):
        return cls()

    def fires(self, p, run):
        total = run._total
        if total is not None and p.step >= total and self.reached != total:
            self.reached = total
            return True
        return p.is_last is True

    def next_step(self, after, run):
        total = run._total
        if total is None or self.reached == total:
            return INF
        # past the total and not yet reached (a resume that adds the final rule): the very next
        # decision reaches it, even one that repeats the previous step
        return max(total, after)

    def next_change(self, after, run):
        return self.next_step(after, run)  # reaching the total is remembered

    def state(self):
        return {"reached": self.reached}

    def load(self, state):
        reached = state.get("reached")
        self.reached = None if reached is None else int(reached)


@builds(TailRule)
class Tail(Node):
    """In the zone total - step < interval: fire at step >= ceil((a + total) / 2),
    a = max(last save, zone start)."""

    def __init__(self, interval: int):
        self.interval = interval

    @classmethod
    def from_rule(cls, rule, total, path):
        return cls(_steps(rule.interval, total, path + ("interval",)))

    def _target(self, run) -> int:
        total = run._total
        zone = total - self.interval
        anchor = max(run._last_save_step or 0, zone)
        return max(-(-(anchor + total) // 2), zone + 1)

    def fires(self, p, run):
        total = run._total
        return total is not None and p.step <= total and p.step >= self._target(run)

    def next_step(self, after, run):
        total = run._total
        if total is None:
            return INF
        step = max(self._target(run), after + 1)
        return step if step <= total else INF


# -- event and clock rules ---------------------------------------------------


@builds(EveryTimeRule)
class EveryTime(Node):
    events = frozenset({CLOCK})

    def __init__(self, seconds: float):
        self.seconds = seconds

    @classmethod
    def from_rule(cls, rule, total, path):
        return cls(rule.every.seconds)

    def fires(self, p, run):
        anchor = run._last_save_time
        return p.time is not None and anchor is not None and p.time >= anchor + self.seconds

    def time_threshold(self, run):
        anchor = run._last_save_time
        return -_NEVER if anchor is None else anchor + self.seconds

    def clock_offset(self, run) -> float:
        """Seconds after the last save from which this rule fires on the clock."""
        return self.seconds

    def next_fire(self, after, run):
        shape = run._sim
        if shape is None or shape.step_seconds is None:
            return INF  # a live run: the clock is watched through time_threshold
        return first_step_at(self.time_threshold(run), shape.step_seconds, after)


@builds(EpochEndRule)
class EpochEnd(Node):
    events = frozenset({EPOCH_END})

    def __init__(self, every: int):
        self.every = every

    @classmethod
    def from_rule(cls, rule, total, path):
        return cls(rule.every)

    def fires(self, p, run):
        return bool(p.epoch_end) and (p.epoch + 1) % self.every == 0

    def next_fire(self, after, run):
        shape = run._sim
        if shape is None:
            return INF  # a live run: epoch ends are events
        total, per_epoch = shape.total_steps, shape.steps_per_epoch
        if not per_epoch:
            return INF  # no epoch length: no epoch ends are simulated
        # As in the reference loop, an epoch ends at a multiple of steps_per_epoch
        # and nowhere else: a run that stops mid-epoch ends no epoch at its last step.
        stride = per_epoch * self.every  # the end of every `every`-th epoch
        best = (after // stride + 1) * stride
        return best if best <= total else INF


_SIGNAL_NAMES = {int(s): s.name for s in _signal.Signals}


@builds(OnSignalRule)
class OnSignal(Node):
    events = frozenset({SIGNAL})

    def __init__(self, names):
        self.names = frozenset(names)

    @classmethod
    def from_rule(cls, rule, total, path):
        return cls(rule.signals)

    def fires(self, p, run):
        sig = p.signal
        if not sig:
            return False
        if sig is True:
            return True
        if isinstance(sig, int):
            sig = _SIGNAL_NAMES.get(sig, "")
        name = str(sig).strip().upper()
        if not name.startswith("SIG"):
            name = "SIG" + name  # "TERM" names SIGTERM, as it does in a policy file
        return name in self.names


@builds(ImprovedRule)
class Improved(Node):
    """Fires when a value ranks among the best ``top`` saved so far (ties go to the
    earlier value): it must beat the ``top``-th best by more than ``min_delta``."""

    events = frozenset({METRICS})

    def __init__(self, metric: str, mode: str, min_delta: float, top: int = 1):
        self.metric, self.mode, self.min_delta, self.top = metric, mode, min_delta, top
        self.values: list = []  # the best `top` values that fired, best first

    @classmethod
    def from_rule(cls, rule, total, path):
        return cls(rule.metric, rule.mode, rule.min_delta, rule.top)

    def fires(self, p, run):
        metrics = p.metrics
        if not metrics or self.metric not in metrics:
            return False
        value = metrics[self.metric]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            try:
                value = float(value)  # numpy and torch scalars
            except (TypeError, ValueError):
                raise TypeError(
                    f"metric {self.metric!r} must be a number, got {type(value).__name__}"
                ) from None
        value = float(value)
        if not math.isfinite(value):
            return False
        values = self.values
        if len(values) >= self.top:
            kth = values[self.top - 1]
            gain = kth - value if self.mode == "min" else value - kth
            if not gain > self.min_delta:
                return False
        # after every value at least as good: on a tie the earlier value ranks first
        key = value if self.mode == "min" else -value
        i = 0
        while i < len(values) and (values[i] if self.mode == "min" else -values[i]) <= key:
            i += 1
        values.insert(i, value)
        del values[self.top:]
        return True

    @property
    def best(self) -> float | None:
        return self.values[0] if self.values else None

    def state(self):
        return {"best": self.best, "values": list(self.values)}

    def load(self, state):
        values = state.get("values")
        if values is None:  # a state written before `top` existed
            best = state.get("best")
            values = [] if best is None else [best]
        self.values = [float(v) for v in values][: self.top]


@builds(AdaptiveRule)
class Adaptive(Node):
    """Fires when the interval planned from the measured save cost (the decider's
    estimate, ``run._cost``) has passed on the training clock since the last save.

    In a simulation that is given no save cost the rule is not simulated: it never fires.
    """

    events = frozenset({CLOCK})

    def __init__(self, rule: AdaptiveRule):
        self.rule = rule

    @classmethod
    def from_rule(cls, rule, total, path):
        return cls(rule)

    def _off(self, run) -> bool:
        shape = run._sim
        return shape is not None and getattr(shape, "save_seconds", None) is None

    def interval(self, run) -> float:
        return self.rule.interval(run._cost)

    def fires(self, p, run):
        anchor = run._last_save_time
        if p.time is None or anchor is None or self._off(run):
            return False
        return p.time >= anchor + self.interval(run)

    def clock_offset(self, run) -> float:
        """Seconds after the last save from which this rule fires on the clock: the
        interval planned from the current cost estimate (it changes when a cost is
        reported, and the decider then recomputes its schedule)."""
        return _NEVER if self._off(run) else self.interval(run)

    def time_threshold(self, run):
        if self._off(run):
            return _NEVER
        anchor = run._last_save_time
        return -_NEVER if anchor is None else anchor + self.interval(run)

    def next_fire(self, after, run):
        shape = run._sim
        if shape is None or shape.step_seconds is None:
            return INF  # a live run: the clock is watched through time_threshold
        return first_step_at(self.time_threshold(run), shape.step_seconds, after)


def first_step_at(threshold: float, step_seconds: float, after: int) -> int:
    """Smallest step > after whose clock (step * step_seconds) reaches threshold."""
    if threshold == -math.inf:
        return after + 1
    if not math.isfinite(threshold):
        return INF
    step = max(after + 1, math.ceil(threshold / step_seconds))
    while step - 1 > after and (step - 1) * step_seconds >= threshold:
        step -= 1
    while step * step_seconds < threshold:
        step += 1
    return step


# -- combinators -------------------------------------------------------------


class _Combinator(Node):
    def __init__(self, children):
        self.children = tuple(children)

    @classmethod
    def from_rule(cls, rule, total, path):
        return cls(build(r, total, path + ("rules", i)) for i, r in enumerate(rule.rules))


@builds(AllRule)
class All(_Combinator):
    def fires(self, p, run):
        results = [c.fires(p, run) for c in self.children]
        return all(results)

    def next_step(self, after, run):
        # A jump from `after` straight to a step s fires when every child fires
        # at s, each by crossing from `after`: s must reach every child's bound.
        return max(c.next_step(after, run) for c in self.children)

    def next_fire(self, after, run):
        low = after
        candidate = INF
        for _ in range(64):  # leapfrog to a step where every child may fire
            candidates = [c.next_fire(low, run) for c in self.children]
            candidate = max(candidates)
            if candidate >= INF or all(c == candidate for c in candidates):
                return candidate
            low = candidate - 1
        return candidate


@builds(AnyRule)
class Any_(_Combinator):
    def fires(self, p, run):
        results = [c.fires(p, run) for c in self.children]
        return any(results)

    def next_step(self, after, run):
        return min(c.next_step(after, run) for c in self.children)

    def next_fire(self, after, run):
        return min(c.next_fire(after, run) for c in self.children)


@builds(NotRule)
class Not(_Combinator):
    @classmethod
    def from_rule(cls, rule, total, path):
        return cls([build(rule.rule, total, path + ("rule",))])

    def fires(self, p, run):
        return not self.children[0].fires(p, run)

    def next_step(self, after, run):
        # `not` of a crossing rule is true at a repeated decision of the same step,
        # so the bound includes `after` itself, unless the child is a window that
        # holds from `after` on.
        child = self.children[0]
        if isinstance(child, Window) and child.after < after <= child.until:
            return child.until + 1 if child.until < INF else INF
        return after

    def next_fire(self, after, run):
        child = self.children[0]
        step = after + 1
        if isinstance(child, Window) and child.after < step <= child.until:
            return child.until + 1 if child.until < INF else INF
        return step


# -- building ----------------------------------------------------------------


missing = sorted(name for name, model in RULE_KINDS.items() if model not in NODE_OF)
if missing:  # pragma: no cover - a new rule model without its node
    raise ImportError(f"rule kinds without a node in saverules.engine.compile: {', '.join(missing)}")


def build(rule: RuleModel, total: int | None, path: tuple) -> Node:
    """Compile one rule model (at document path ``path``) for a run of ``total`` steps."""
    node = NODE_OF[type(rule)].from_rule(rule, total, path)
    if rule.after is not None or rule.until is not None:
        after = _steps(rule.after, total, path + ("after",)) or 0
        until = _steps(rule.until, total, path + ("until",))
        until = INF if until is None else until
        if until <= after and not (isinstance(rule.after, Share) and isinstance(rule.until, Share)):
            # Two shares were checked in order at load time; on a short run they
            # may round to the same step, which leaves an empty window, not an error.
            raise ResolveError(path + ("until",), f"until ({until}) must be greater than after ({after})")
        window = Window(after, until)
        node = window if isinstance(rule, WindowRule) else All([node, window])
    return node


def rule_events(rule: RuleModel) -> frozenset[str]:
    """The events a rule model, or a rule nested in it, reacts to (read from the nodes' declarations)."""
    return frozenset().union(*(NODE_OF[type(r)].events for r in walk(rule)))


def policy_events(policy) -> frozenset[str]:
    """The events any rule of ``policy`` reacts to, its final guarantee included."""
    events = frozenset().union(*(rule_events(r) for r in policy.rules))
    return events | Final.events if policy.final else events


class CostReason:
    """The reason of a rule that plans with the save cost: it names the interval used,
    so it is written at the decision (``reason(run)``), not once at compile time."""

    def __init__(self, rule: RuleModel):
        self.rule = rule

    def __call__(self, run) -> str:
        return describe(self.rule, interval_annotation(run._cost))

    def __str__(self) -> str:
        return describe(self.rule)


def compile_rules(policy, total: int | None):
    """[(node, reason)] for the policy's top-level rules, the final guarantee first.

    A reason is a string, or a :class:`CostReason` to call with the decider.
    """
    compiled: list[tuple[Node, CostReason | str]] = []
    if policy.final:
        compiled.append((Final(), "final"))
    for i, rule in enumerate(policy.rules):
        reason = CostReason(rule) if uses_cost(rule) else describe(rule)
        compiled.append((build(rule, total, ("rules", i)), reason))
    return compiled
