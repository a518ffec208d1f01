"""TOML text -> :class:`Policy`, with diagnostics that point at line and column.

Nothing but :class:`PolicyError` escapes from :func:`loads` or :func:`load`,
whatever the input.
"""
from __future__ import annotations

import difflib
import os
import re
import sys

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from .errors import Diagnostic, PolicyError
from .limits import MAX_FILE_BYTES, MAX_NESTING, MAX_RULES
from .locate import key_positions, locate
from .policy import Durable, KeepBest, Policy, Retention, RunShape, Storage
from .rules import RULE_KINDS, Segment

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

_TOML_POSITION = re.compile(r"\s*\(at line (\d+), column (\d+)\)\s*$")
_TOML_END = re.compile(r"\s*\(at end of document\)\s*$")

_MODELS: tuple[type[BaseModel], ...] = (
    Policy, RunShape, Retention, KeepBest, Storage, Durable, Segment, *RULE_KINDS.values()
)
_KNOWN_KEYS = sorted({name for model in _MODELS for name in model.model_fields})


def _suggest(word: object, choices) -> str:
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


def _message(error: ErrorDetails) -> str:
    kind = error["type"]
    ctx = error.get("ctx") or {}
    if kind == "union_tag_invalid":
        tag = ctx.get("tag")
        given = error.get("input")
        value = given.get("kind") if isinstance(given, dict) else tag
        if not isinstance(value, str):
            return (f"kind must be a string, got {_type_name(value)} {value!r}; "
                    f"write kind = \"...\" with one of: {', '.join(RULE_KINDS)}")
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


def _type_name(value) -> str:
    return {bool: "a boolean", int: "an integer", float: "a float", list: "an array", dict: "a table"}.get(
        type(value), type(value).__name__)


def compact_path(where: tuple) -> str:
    """A key path, with a run of repeated levels written once with its count:
    ``rules[0].rule.rule.rule.rule`` is ``rules[0](.rule x4)``."""
    parts = [f"[{p}]" if isinstance(p, int) else f".{p}" for p in where]
    out, i = [], 0
    while i < len(parts):
        for period in (1, 2):
            unit = parts[i:i + period]
            n = 1
            while parts[i + n * period:i + (n + 1) * period] == unit:
                n += 1
            if len(unit) == period and n >= 4:
                start, count = i, n
                if i == 0:  # the path's head is written out: rules[0](.rules[0] x3)
                    out.extend(unit)
                    count -= 1
                out.append(f"({''.join(unit)} x{count})")
                i = start + n * period
                break
        else:
            out.append(parts[i])
            i += 1
    return "".join(out).lstrip(".") or "<document>"


def diagnostics_from_validation(exc: ValidationError, source: str, positions) -> list[Diagnostic]:
    out = []
    seen = set()
    for error in exc.errors(include_url=False):
        loc = tuple(error["loc"])
        if error["type"] == "union_tag_invalid":  # the offending key is the rule's kind
            loc += ("kind",)
        line, col = locate(positions, loc)
        where = _strip_tags(loc)
        message = _message(error)
        text = f"{compact_path(where)}: {message}" if where else message
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
    line_count = max(1, text.count("\n") + 1)
    line = min(max(line, 1), line_count)
    return Diagnostic(source, line, max(col, 1), f"TOML syntax: {message}")


# Strings and comments, whose brackets do not nest, and the brackets that do.
_TOKENS = re.compile(
    r'"""(?:[^"\\]|\\[\s\S]|"(?!""))*"{3,5}'
    r"|'''(?:[^']|'(?!''))*'{3,5}"
    r'|"(?:[^"\\\n]|\\.)*"'
    r"|'[^'\n]*'"
    r"|#[^\n]*"
    r"|[\[\]{}]"
)


def _nesting(text: str):
    """(deepest nesting of brackets, offset where it first passes MAX_NESTING or None)."""
    depth = deepest = 0
    crossed = None
    for match in _TOKENS.finditer(text):
        ch = match.group()
        if ch in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if depth > MAX_NESTING and crossed is None:
                    crossed = match.start()
        elif ch in "]}":
            depth -= 1
    return deepest, crossed


def _too_deep(depth: int) -> str:
    return (f"tables and arrays are nested {depth} levels deep here; the limit is {MAX_NESTING} "
            "(each `not` takes one level, each `all` / `any` two): flatten the rules")


def _data_depth(data):
    """(path to the first value nested deeper than MAX_NESTING, the deepest nesting) in parsed
    data, or None.  Depths count as brackets do: the two levels of a top-level
    ``[[rules]]`` (its array and its table) are not counted, as a header writes them."""
    limit = MAX_NESTING + 2
    stack = [(data, (), 0)]
    first, deepest = None, 0
    while stack:
        value, path, depth = stack.pop()
        if depth > deepest:
            deepest = depth
        if depth > limit and first is None:
            first = path
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        for key, child in items:
            if isinstance(child, (dict, list)):
                stack.append((child, path + (key,), depth + 1))
    return None if first is None else (first, deepest - 2)


def _count_rules(data) -> tuple:
    """(number of rules, nested ones included; the index of the top-level rule that passes MAX_RULES)."""
    rules = data.get("rules") if isinstance(data, dict) else None
    if not isinstance(rules, list):
        return 0, None
    count, crossed = 0, None
    for index, top in enumerate(rules):
        stack = [top]
        while stack:
            rule = stack.pop()
            count += 1
            if isinstance(rule, dict):
                inner = rule.get("rules")
                if isinstance(inner, list):
                    stack.extend(inner)
                if isinstance(rule.get("rule"), dict):
                    stack.append(rule["rule"])
        if count > MAX_RULES and crossed is None:
            crossed = index
    return count, crossed


def _check_size(size: int, source: str, unit: str = "bytes") -> None:
    if size > MAX_FILE_BYTES:
        raise PolicyError([Diagnostic(
            source, 1, 1,
            f"the policy is {size:,} {unit} long; the limit is {MAX_FILE_BYTES:,} {unit} (1 MiB): "
            "a policy needs a few kilobytes, so this is probably not a policy file")])


def loads(text: str, source: str = "<string>") -> Policy:
    """Parse and validate a policy from TOML text."""
    if isinstance(text, bytes):
        _check_size(len(text), source)
        return loads(_decode(text, source), source)
    if not isinstance(text, str):
        raise PolicyError([Diagnostic(source, 1, 1, f"expected TOML text, got {type(text).__name__}")])
    _check_size(len(text), source, "characters")
    if text.startswith("\ufeff"):
        text = text[1:]  # a UTF-8 byte order mark, as some Windows editors write
    depth, crossed = _nesting(text)
    if crossed is not None:
        line = text.count("\n", 0, crossed) + 1
        col = crossed - (text.rfind("\n", 0, crossed) + 1) + 1
        raise PolicyError([Diagnostic(source, line, col, _too_deep(depth))])
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError([_syntax_error(exc, source, text)]) from None
    except Exception as exc:  # tomllib may raise other errors on pathological input
        raise PolicyError([Diagnostic(source, 1, 1, f"TOML syntax: {exc}")]) from None
    positions = key_positions(text)
    deep = _data_depth(data)
    if deep is not None:  # nested through table headers such as [rules.rule.rule]
        path, depth = deep
        line, col = locate(positions, path)
        raise PolicyError([Diagnostic(source, line, col, f"{compact_path(path)}: {_too_deep(depth)}")])
    count, crossed = _count_rules(data)
    if crossed is not None:
        line, col = locate(positions, ("rules", crossed))
        raise PolicyError([Diagnostic(
            source, line, col,
            f"rules[{crossed}]: the policy has {count:,} rules (nested rules included); the limit is {MAX_RULES:,}")])
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


def load(path: str | os.PathLike[str]) -> Policy:
    """Read and validate a policy file."""
    source = os.fspath(path)
    try:
        with open(source, "rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)  # never more than the limit and a byte
            if len(data) > MAX_FILE_BYTES:
                size = os.fstat(handle.fileno()).st_size
                _check_size(max(size, len(data)), source)
    except OSError as exc:
        raise PolicyError([Diagnostic(source, 1, 1, f"cannot read the file: {exc.strerror or exc}")]) from None
    return loads(_decode(data, source), source)
