"""Value types of the policy format: step counts, shares of the run, durations.

Each validator accepts exactly the TOML types the format allows and rejects the
rest with a message that says what to write instead.  Booleans are rejected
explicitly: in Python ``True`` is an ``int``, in a policy file it is a mistake.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Annotated, TypeAlias

from pydantic import PlainSerializer, PlainValidator, WithJsonSchema

from .limits import MAX_STEPS, steps_text

ZERO_IS_NOT_OFF = "0 does not mean 'off' here: to disable a rule, remove it"

_SHARE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*%\s*")
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smh])\s*")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600}
_BARE_NUMBER = re.compile(r"\s*\d+(?:\.\d+)?\s*")


@dataclass(frozen=True)
class Share:
    """A share of the run, written ``"P%"``; resolved against total_steps."""

    text: str
    percent: Fraction

    def resolve(self, total_steps: int) -> int:
        """ceil(total_steps * P / 100), computed exactly, never below 1."""
        return max(1, math.ceil(total_steps * self.percent / 100))

    def __str__(self) -> str:
        return self.text


StepValue: TypeAlias = int | Share


def resolve_steps(value: StepValue | None, total_steps: int | None) -> int | None:
    """Turn a step count or a share into steps (None stays None)."""
    if value is None or isinstance(value, int):
        return value
    if total_steps is None:
        raise ValueError(f'"{value.text}" is a share of the run, but no total_steps is known')
    return value.resolve(total_steps)


def _type_name(value: object) -> str:
    return {bool: "a boolean", float: "a float", str: "a string", list: "an array", dict: "a table"}.get(
        type(value), type(value).__name__
    )


def _parse_share(value: str, *, allow_zero: bool) -> Share:
    match = _SHARE.fullmatch(value)
    if not match:
        raise ValueError(
            f"expected a whole number of steps or a share of the run like \"5%\", got the string {value!r}"
            + (" (write numbers without quotes)" if value.strip().lstrip("-").isdigit() else "")
        )
    percent = Fraction(match.group(1))
    if percent > 100:
        raise ValueError(f"a share of the run must be at most 100%, got {value!r}")
    if percent == 0 and not allow_zero:
        raise ValueError(f"a share of the run must be more than 0%; {ZERO_IS_NOT_OFF}")
    return Share(f"{match.group(1)}%", percent)


def _step_validator(minimum: int, allow_share: bool = True):
    def validate(value: object) -> StepValue:
        if isinstance(value, Share):
            return value
        if isinstance(value, bool) or not isinstance(value, (int, str)) or (isinstance(value, str) and not allow_share):
            expected = "a whole number of steps" + (' or a share like "5%"' if allow_share else "")
            raise ValueError(f"expected {expected}, got {_type_name(value)}")
        if isinstance(value, str):
            return _parse_share(value, allow_zero=minimum == 0)
        if value < minimum:
            hint = f"; {ZERO_IS_NOT_OFF}" if value == 0 else ""
            raise ValueError(f"must be at least {minimum}, got {value}{hint}")
        if value > MAX_STEPS:
            raise ValueError(f"must be at most {steps_text(MAX_STEPS)}, got {value:,}")
        return value

    return validate


def _serialize_step(value: StepValue) -> int | str:
    return value.text if isinstance(value, Share) else value


_STEP_SCHEMA = {
    "anyOf": [
        {"type": "integer", "minimum": 1, "maximum": MAX_STEPS},
        {"type": "string", "pattern": r"^\d+(\.\d+)?%$", "description": 'a share of the run, e.g. "5%"'},
    ]
}

#: A positive number of steps, or a share of the run ("5%").
Steps = Annotated[
    StepValue,
    PlainValidator(_step_validator(1)),
    PlainSerializer(_serialize_step),
    WithJsonSchema(_STEP_SCHEMA),
]
#: A step bound that may be 0 (``after = 0`` means from the start).
StepBound = Annotated[
    StepValue,
    PlainValidator(_step_validator(0)),
    PlainSerializer(_serialize_step),
    WithJsonSchema({"anyOf": [{"type": "integer", "minimum": 0, "maximum": MAX_STEPS}, _STEP_SCHEMA["anyOf"][1]]}),
]
#: A positive whole number (no shares).
Count = Annotated[
    int,
    PlainValidator(_step_validator(1, allow_share=False)),
    WithJsonSchema({"type": "integer", "minimum": 1, "maximum": MAX_STEPS}),
]


@dataclass(frozen=True)
class Duration:
    """A span of training time, written with a unit: "45s", "30m", "2h"."""

    text: str
    seconds: float

    def __str__(self) -> str:
        return self.text


def _validate_duration(value: object) -> Duration:
    if isinstance(value, Duration):
        return value
    if isinstance(value, bool) or isinstance(value, (int, float)):
        raise ValueError(
            f"a duration needs a unit: write \"{value}s\", \"{value}m\" or \"{value}h\" (a bare number is ambiguous)"
            if not isinstance(value, bool)
            else "expected a duration with a unit such as \"30m\", got a boolean"
        )
    if not isinstance(value, str):
        raise ValueError(f'expected a duration with a unit such as "30m", got {_type_name(value)}')
    match = _DURATION.fullmatch(value)
    if not match:
        if _BARE_NUMBER.fullmatch(value):
            raise ValueError(
                f"a duration needs a unit: write \"{value.strip()}s\", \"{value.strip()}m\" or "
                f"\"{value.strip()}h\" (a bare number is ambiguous)"
            )
        raise ValueError(f'expected a duration such as "45s", "30m" or "2h" (units s, m, h), got {value!r}')
    try:
        seconds = float(Fraction(match.group(1)) * _UNIT_SECONDS[match.group(2)])
    except OverflowError:
        seconds = math.inf
    if seconds <= 0:
        raise ValueError(f"a duration must be positive, got {value!r}; {ZERO_IS_NOT_OFF}")
    if not math.isfinite(seconds):
        raise ValueError(f"a duration must be finite, got {value!r}")
    return Duration(f"{match.group(1)}{match.group(2)}", seconds)


Seconds = Annotated[
    Duration,
    PlainValidator(_validate_duration),
    PlainSerializer(lambda d: d.text),
    WithJsonSchema({"type": "string", "pattern": r"^\d+(\.\d+)?[smh]$", "description": 'e.g. "45s", "30m", "2h"'}),
]


def _validate_real(minimum: float, *, inclusive: bool):
    def validate(value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"expected a number, got {_type_name(value)}")
        try:
            value = float(value)
        except OverflowError:  # an integer too large for a float
            value = math.inf
        if not math.isfinite(value):
            raise ValueError("must be a finite number (inf and nan are not allowed)")
        if value < minimum or (value == minimum and not inclusive):
            raise ValueError(f"must be {'at least' if inclusive else 'more than'} {minimum:g}, got {value:g}")
        return value

    return validate


#: A finite number > 0.
PositiveReal = Annotated[
    float, PlainValidator(_validate_real(0.0, inclusive=False)), WithJsonSchema({"type": "number", "exclusiveMinimum": 0})
]
#: A finite number >= 0.
NonNegativeReal = Annotated[
    float, PlainValidator(_validate_real(0.0, inclusive=True)), WithJsonSchema({"type": "number", "minimum": 0})
]


def format_seconds(seconds: float | None) -> str:
    """Compact human duration: 45s, 13m20s, 4h26m40s."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.3g}s" if seconds < 10 and seconds != int(seconds) else f"{int(round(seconds))}s"
    total = int(round(seconds))
    h, rest = divmod(total, 3600)
    m, s = divmod(rest, 60)
    if h:
        return f"{h}h{m:02d}m" + (f"{s:02d}s" if s else "")
    return f"{m}m{s:02d}s" if s else f"{m}m"


# -- cost-aware quantities -----------------------------------------------------


def _validate_overhead(value: object) -> Share:
    """A share of training time in (0%, 100%): the most that saving may stall."""
    if isinstance(value, Share):
        return value
    if isinstance(value, bool) or not isinstance(value, str):
        hint = f' (write "{value * 100:g}%" for a fraction {value:g})' if isinstance(value, float) and 0 < value < 1 else ""
        raise ValueError(f'expected a share of training time such as "2%", got {_type_name(value)}{hint}')
    match = _SHARE.fullmatch(value)
    if not match:
        raise ValueError(f'expected a share of training time such as "2%", got {value!r}')
    percent = Fraction(match.group(1))
    if percent == 0:
        raise ValueError(f"a share of training time must be more than 0%; {ZERO_IS_NOT_OFF}")
    if percent >= 100:
        raise ValueError(f"a share of training time must be less than 100%, got {value!r}")
    return Share(f"{match.group(1)}%", percent)


#: A share of training time, 0% < P < 100% ("2%").
Overhead = Annotated[
    Share,
    PlainValidator(_validate_overhead),
    PlainSerializer(lambda s: s.text),
    WithJsonSchema({"type": "string", "pattern": r"^\d+(\.\d+)?%$", "description": 'a share of training time, e.g. "2%"'}),
]

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)\s*")
_SIZE_UNITS = {
    "B": 1,
    "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4,
    "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "TiB": 1024**4,
}


@dataclass(frozen=True)
class Size:
    """A number of bytes, written with a unit: "2GB" (powers of 1000) or "2GiB" (powers of 1024)."""

    text: str
    bytes: int

    def __str__(self) -> str:
        return self.text


def _validate_size(value: object) -> Size:
    if isinstance(value, Size):
        return value
    if isinstance(value, bool) or isinstance(value, (int, float)):
        raise ValueError(
            f'a size needs a unit: write "{value}GB", "{value}MB" or "{value}B" (units B, KB, MB, GB, TB, '
            "KiB, MiB, GiB, TiB)" if not isinstance(value, bool) else 'expected a size such as "2GB", got a boolean'
        )
    if not isinstance(value, str):
        raise ValueError(f'expected a size such as "2GB", got {_type_name(value)}')
    match = _SIZE.fullmatch(value)
    if not match:
        raise ValueError(
            f'expected a size such as "2GB" or "512MiB" (units B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), got {value!r}'
        )
    count = Fraction(match.group(1)) * _SIZE_UNITS[match.group(2)]
    if count <= 0:
        raise ValueError(f"a size must be positive, got {value!r}")
    return Size(f"{match.group(1)}{match.group(2)}", math.ceil(count))


#: A positive number of bytes with a unit ("2GB", "512MiB").
Bytes = Annotated[
    Size,
    PlainValidator(_validate_size),
    PlainSerializer(lambda s: s.text),
    WithJsonSchema({
        "type": "string", "pattern": r"^\d+(\.\d+)?([KMGT]i?B|B)$",
        "description": 'a size: "2GB" (B, KB, MB, GB, TB: powers of 1000) or "2GiB" (KiB, MiB, GiB, TiB: powers of 1024)',
    }),
]


def format_bytes(count: float) -> str:
    """Compact size in powers of 1000: 512B, 2.5KB, 40GB, 1.2TB (three significant digits)."""
    for unit, scale in (("TB", 1000**4), ("GB", 1000**3), ("MB", 1000**2), ("KB", 1000)):
        if count >= scale:
            return f"{count / scale:.3g}{unit}"
    return f"{int(count)}B"
