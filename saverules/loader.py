"""TOML text -> :class:`Policy`, with diagnostics that point at line and column.

Nothing but :class:`PolicyError` escapes from :func:`loads` or :func:`load`,
whatever the input.
"""
from __future__ import annotations

import difflib
import os
import re
import sys
from typing import List

from pydantic import ValidationError

from .errors import Diagnostic, PolicyError, dotted
from .locate import key_positions, locate
from .policy import KeepBest, Policy, Retention, RunShape, Storage
from .rules import RULE_KINDS, Segment

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

_TOML_POSITION = re.compile(r"\s*\(at line (\d+), column (\d+)\)\s*$")
_TOML_END = re.compile(r"\s*\(at end of document\)\s*$")

_KNOWN_KEYS = sorted(
    {name for model in (Policy, RunShape, Retention, KeepBest, Storage, Segment, *RULE_KINDS.values()) for name in model.model_fields}
)


def _suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _strip_tags(loc: tuple) -> tuple:
    """Drop the union tags pydantic inserts after a rule's index (``rules[0].every_steps.every``)."""
    out: list = []
    for part in loc:
        if isinstance(part, str) and part in RULE_KINDS and out and (isinstance(out[-1], int) or out[-1] == "rule"):
            continue
        out.append(part)
    return tuple(out)


def _message(error: dict) -> str:
    kind = error["type"]
    ctx = error.get("ctx") or {}
    if kind == "union_tag_invalid":
        tag = ctx.get("tag")
        return f"unknown rule kind {tag!r}{_suggest(tag, RULE_KINDS)} (kinds: {', '.join(RULE_KINDS)})"
    if kind == "union_tag_not_found":
        return f"this rule has no `kind`; add kind = \"...\" with one of: {', '.join(RULE_KINDS)}"
    if kind == "extra_forbidden":
        key = error["loc"][-1] if error["loc"] else "?"
        return f"unknown key {key!r}{_suggest(key, _KNOWN_KEYS)}"
    if kind == "missing":
        key = error["loc"][-1] if error["loc"] else "?"
        if key == "version":
            return "missing `version = 1` at the top of the file"
        return f"missing required key {key!r}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return "expected a table"
    if kind == "too_short":
        return "must not be empty"
    if kind in ("tuple_type", "list_type"):
        return "expected an array"
    message = error["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    return message


def diagnostics_from_validation(exc: ValidationError, source: str, positions) -> List[Diagnostic]:
    out = []
    seen = set()
    for error in exc.errors(include_url=False):
        loc = tuple(error["loc"])
        if error["type"] == "union_tag_invalid":  # the offending key is the rule's kind
            loc += ("kind",)
        line, col = locate(positions, loc)
        where = _strip_tags(loc)
        message = _message(error)
        text = f"{dotted(where)}: {message}" if where else message
        if (line, col, text) not in seen:
            seen.add((line, col, text))
            out.append(Diagnostic(source, line, col, text))
    return out


def _syntax_error(exc: Exception, source: str, text: str) -> Diagnostic:
    message = str(exc)
    line, col = 1, 1
    match = _TOML_POSITION.search(message)
    if match:
        line, col = int(match.group(1)), int(match.group(2))
        message = message[: match.start()]
    elif _TOML_END.search(message):
        lines = text.split("\n")
        line, col = len(lines), len(lines[-1]) + 1
        message = _TOML_END.sub("", message)
    lines = max(1, text.count("\n") + 1)
    line = min(max(line, 1), lines)
    return Diagnostic(source, line, max(col, 1), f"TOML syntax: {message}")


def loads(text: str, source: str = "<string>") -> Policy:
    """Parse and validate a policy from TOML text."""
    if isinstance(text, bytes):
        return loads(_decode(text, source), source)
    if not isinstance(text, str):
        raise PolicyError([Diagnostic(source, 1, 1, f"expected TOML text, got {type(text).__name__}")])
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError([_syntax_error(exc, source, text)]) from None
    except Exception as exc:  # tomllib may raise other errors on pathological input
        raise PolicyError([Diagnostic(source, 1, 1, f"TOML syntax: {exc}")]) from None
    positions = key_positions(text)
    try:
        policy = Policy.model_validate(data)
    except ValidationError as exc:
        raise PolicyError(diagnostics_from_validation(exc, source, positions)) from None
    except RecursionError:
        raise PolicyError([Diagnostic(source, 1, 1, "rules are nested too deeply")]) from None
    policy._source = source
    policy._positions = positions
    if policy.run is not None and policy.run.total_steps is not None:
        # Shares of the run are known now: check what depends on them at load time.
        policy.compile(policy.run.total_steps)
    return policy


def _decode(data: bytes, source: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        col = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise PolicyError([Diagnostic(source, line, col, "the file is not valid UTF-8 text")]) from None


def load(path: "str | os.PathLike[str]") -> Policy:
    """Read and validate a policy file."""
    source = os.fspath(path)
    try:
        with open(source, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise PolicyError([Diagnostic(source, 1, 1, f"cannot read the file: {exc.strerror or exc}")]) from None
    return loads(_decode(data, source), source)
