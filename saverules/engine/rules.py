"""The rule models: one frozen, strictly typed pydantic model per ``kind``.

A rule here is pure data.  What it means at run time lives in
:mod:`saverules.engine.compile`; how a reason string names it lives in :func:`describe`.

Every rule accepts ``after`` / ``until`` directly, as shorthand for
``all(rule, window(after, until))``.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Annotated, Any, Literal, cast, get_args

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from .cost import adaptive_interval
from .quantities import Count, NonNegativeReal, Overhead, Seconds, Share, StepBound, Steps, format_seconds


def _as_tuple(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(value)
    if not isinstance(value, tuple):
        raise ValueError(f"expected an array, got {type(value).__name__}")
    return value


def _nonempty_str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError("must not be empty")
    return value


Name = Annotated[str, BeforeValidator(_nonempty_str)]

#: Signals a training job is commonly asked to stop or checkpoint with.
SIGNAL_NAMES = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2", "SIGHUP", "SIGQUIT", "SIGXCPU", "SIGCONT")


def _signal_name(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a signal name such as \"SIGTERM\", got {type(value).__name__}")
    name = value.strip().upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    if name not in SIGNAL_NAMES:
        raise ValueError(f"unknown signal {value!r}; use one of {', '.join(SIGNAL_NAMES)}")
    return name


class Model(BaseModel):
    """Base of every table in the format: frozen, strict, unknown keys rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


def _bounds_in_order(after: Any, until: Any, what: str) -> None:
    """Reject until <= after when both are the same kind of quantity."""
    if after is None or until is None:
        return
    prefix = f"{what}: " if what else ""
    if isinstance(after, int) and isinstance(until, int) and until <= after:
        raise ValueError(f"{prefix}until ({until}) must be greater than after ({after})")
    if isinstance(after, Share) and isinstance(until, Share) and until.percent <= after.percent:
        raise ValueError(f"{prefix}until ({until}) must be greater than after ({after})")


class RuleModel(Model):
    after: StepBound | None = None
    until: Steps | None = None

    @field_validator("until")
    @classmethod
    def _window_in_order(cls, until: Any, info: ValidationInfo) -> Any:
        # a field validator, so that the diagnostic points at the `until` key
        _bounds_in_order(info.data.get("after"), until, "")
        return until


class EveryStepsRule(RuleModel):
    """Fires when a multiple of ``every`` lies in (previous decided step, this step]."""

    kind: Literal["every_steps"]
    every: Steps


class EveryTimeRule(RuleModel):
    """Fires when at least ``every`` of training time has passed since the last save."""

    kind: Literal["every_time"]
    every: Seconds


class EpochEndRule(RuleModel):
    """Fires at the end of every ``every``-th epoch."""

    kind: Literal["epoch_end"]
    every: Count = 1


class FinalRule(RuleModel):
    """Fires at the first decision with step >= total_steps, or when the loop says is_last."""

    kind: Literal["final"]


class TailRule(RuleModel):
    """Once fewer than ``interval`` steps remain, saves at the midpoint of what is left, again and again."""

    kind: Literal["tail"]
    interval: Steps


class AtStepsRule(RuleModel):
    """Fires when a listed step lies in (previous decided step, this step]."""

    kind: Literal["at_steps"]
    steps: Annotated[tuple[Steps, ...], BeforeValidator(_as_tuple), Field(min_length=1)]


class Segment(Model):
    every: Steps
    until: Steps | None = None


class PiecewiseRule(RuleModel):
    """every_steps whose interval changes over the run; segment i covers (until[i-1], until[i]]."""

    kind: Literal["piecewise"]
    segments: Annotated[tuple[Segment, ...], BeforeValidator(_as_tuple), Field(min_length=1)]

    @field_validator("segments")
    @classmethod
    def _segments_in_order(cls, segments: Any) -> Any:
        for i, seg in enumerate(segments[:-1]):
            if seg.until is None:
                raise ValueError(f"segments[{i}] needs `until`: only the last segment may omit it")
        previous = None
        for i, seg in enumerate(segments):
            if previous is not None and seg.until is not None:
                try:
                    _bounds_in_order(previous, seg.until, f"segments[{i}]")
                except ValueError:
                    raise ValueError(
                        f"segments must be increasing: segments[{i}].until ({seg.until}) "
                        f"is not after segments[{i - 1}].until ({previous})"
                    ) from None
            previous = seg.until
        return segments


class OnSignalRule(RuleModel):
    """Fires at the next decision after one of ``signals`` arrived (Progress.signal)."""

    kind: Literal["on_signal"]
    signals: Annotated[
        tuple[Annotated[str, BeforeValidator(_signal_name)], ...], BeforeValidator(_as_tuple), Field(min_length=1)
    ] = ("SIGTERM", "SIGUSR1")


class ImprovedRule(RuleModel):
    """Fires when a reported metric beats its best value so far by more than ``min_delta``."""

    kind: Literal["improved"]
    metric: Name
    mode: Literal["min", "max"] = "min"
    min_delta: NonNegativeReal = 0.0
    top: Count = 1


#: ``adaptive`` never saves closer together than this unless the rule says otherwise.
DEFAULT_MIN_EVERY = 60.0


class AdaptiveRule(RuleModel):
    """Fires when the interval planned from the measured save cost has passed since the last save.

    T = min(max_every, max(min_every, c / max_overhead, T_daly(c, mtbf), w)); see saverules.engine.cost.
    """

    kind: Literal["adaptive"]
    max_overhead: Overhead | None = None
    mtbf: Seconds | None = None
    min_every: Seconds | None = None
    max_every: Seconds | None = None

    @field_validator("max_every")
    @classmethod
    def _bounds_in_order(cls, max_every: Any, info: ValidationInfo) -> Any:
        # a field validator, so that the diagnostic points at the `max_every` key
        if max_every is None or "min_every" not in info.data:
            return max_every
        given = info.data["min_every"]
        low = given.seconds if given is not None else DEFAULT_MIN_EVERY
        if max_every.seconds < low:
            what = f"min_every ({given})" if given is not None else 'min_every (default "1m")'
            raise ValueError(f"max_every ({max_every}) must be at least {what}")
        return max_every

    @model_validator(mode="after")
    def _has_a_target(self):
        if self.max_overhead is None and self.mtbf is None:
            raise ValueError(
                'an adaptive rule needs max_overhead (e.g. "2%"), mtbf (e.g. "6h") or both: '
                "they say what the interval is planned for"
            )
        return self

    @property
    def min_every_seconds(self) -> float:
        return self.min_every.seconds if self.min_every is not None else DEFAULT_MIN_EVERY

    def interval(self, cost) -> float:
        """The interval this rule plans for a save cost ``(c, w)``, or for no cost yet (None)."""
        return adaptive_interval(
            cost,
            None if self.max_overhead is None else float(self.max_overhead.percent / 100),
            None if self.mtbf is None else self.mtbf.seconds,
            self.min_every_seconds,
            None if self.max_every is None else self.max_every.seconds,
        )


class WindowRule(RuleModel):
    """True while after < step <= until; a building block for all/any/not."""

    kind: Literal["window"]

    @model_validator(mode="after")
    def _has_a_bound(self):
        if self.after is None and self.until is None:
            raise ValueError("a window needs `after`, `until` or both")
        return self


class AllRule(RuleModel):
    """Fires when every child fires (all children are always evaluated)."""

    kind: Literal["all"]
    rules: Annotated[tuple[Rule, ...], BeforeValidator(_as_tuple), Field(min_length=1)]


class AnyRule(RuleModel):
    """Fires when at least one child fires (all children are always evaluated)."""

    kind: Literal["any"]
    rules: Annotated[tuple[Rule, ...], BeforeValidator(_as_tuple), Field(min_length=1)]


class NotRule(RuleModel):
    """Fires when its child does not."""

    kind: Literal["not"]
    rule: Rule


Rule = Annotated[
    EveryStepsRule | EveryTimeRule | EpochEndRule | FinalRule | TailRule | AtStepsRule | PiecewiseRule | OnSignalRule | ImprovedRule | AdaptiveRule | WindowRule | AllRule | AnyRule | NotRule,
    Field(discriminator="kind"),
]

for _model in (AllRule, AnyRule, NotRule):
    _model.model_rebuild()

#: kind name -> rule model, derived from the union above (the one list of kinds)
RULE_KINDS: dict[str, type[RuleModel]] = {
    m.model_fields["kind"].annotation.__args__[0]: m for m in get_args(get_args(Rule)[0])
}


def _format_value(value: Any) -> str:
    if isinstance(value, RuleModel):
        return describe(value)
    if isinstance(value, BaseModel):
        return "{" + ", ".join(f"{k}={_format_value(v)}" for k, v in _written(value).items()) + "}"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_format_value(v) for v in value) + "]"
    if isinstance(value, (Share,)) or type(value).__name__ == "Duration":
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, float) and value == int(value):
        return repr(value)
    return str(value)


def _written(model: BaseModel) -> dict:
    """The fields the user wrote, in declaration order."""
    names = [k for k in type(model).model_fields if k not in ("kind", "after", "until")] + ["after", "until"]
    return {k: getattr(model, k) for k in names if k in model.model_fields_set}


def describe(rule: RuleModel, annotate: Callable[[RuleModel], dict[str, str]] | None = None) -> str:
    """A rule's reason string: its kind and the parameters as written, e.g. ``every_steps(every=2000)``.

    ``annotate(rule)`` may add values known only at the decision, written after
    the parameters: ``adaptive(max_overhead=2%, interval=2m30s)``.
    """
    fields = _written(rule)
    extra = annotate(rule) if annotate is not None else {}
    # RuleModel is only a base: every rule object is one of the kinds in the Rule union
    kind = cast("Rule", rule).kind
    if isinstance(rule, (AllRule, AnyRule)):
        inner = ", ".join(describe(r, annotate) for r in rule.rules)
        more = "".join(f", {k}={_format_value(v)}" for k, v in fields.items() if k != "rules")
        return f"{kind}({inner}{more})"
    if isinstance(rule, NotRule):
        more = "".join(f", {k}={_format_value(v)}" for k, v in fields.items() if k != "rule")
        return f"not({describe(rule.rule, annotate)}{more})"
    parts = [f"{k}={_format_value(v)}" for k, v in fields.items()] + [f"{k}={v}" for k, v in extra.items()]
    if not parts:
        return kind
    return f"{kind}(" + ", ".join(parts) + ")"


_ANNOTATION = re.compile(r", interval=[^,()]*(?=\))")


def static_reason(reason: str) -> str:
    """A reason without the values added at the decision: the rule's :func:`describe` string."""
    return _ANNOTATION.sub("", reason)


def interval_annotation(cost) -> Callable[[RuleModel], dict[str, str]]:
    """The :func:`describe` annotation of a decision: each adaptive rule's interval for ``cost``."""

    def annotate(rule: RuleModel) -> dict[str, str]:
        if isinstance(rule, AdaptiveRule):
            return {"interval": format_seconds(rule.interval(cost))}
        return {}

    return annotate


def uses_cost(rule: RuleModel) -> bool:
    """Whether a rule, or one nested in it, plans with the measured save cost."""
    return any(isinstance(r, AdaptiveRule) for r in walk(rule))


def walk(rule: RuleModel):
    """Yield a rule and all rules nested inside it, depth first."""
    yield rule
    if isinstance(rule, (AllRule, AnyRule)):
        for child in rule.rules:
            yield from walk(child)
    elif isinstance(rule, NotRule):
        yield from walk(rule.rule)
