"""A policy as TOML text: what :meth:`~saverules.engine.policy.Policy.to_toml` writes.

The text holds exactly the keys the policy was given (so every rule's reason
string, which names its written parameters, stays the same) and loads back to
an equal policy.  Tables come out as a person writes them: ``[run]``,
``[[rules]]``, ``[retention.keep_best]``; what is nested in a rule (the rules of
``all``, ``piecewise`` segments) is written inline.
"""
from __future__ import annotations

import math
from typing import Any


def toml_string(text: str) -> str:
    """``text`` as a TOML basic string (control characters and DEL escaped)."""
    out = ['"']
    for ch in text:
        if ch == '"' or ch == "\\":
            out.append("\\" + ch)
        elif ch < " " or ch == "\x7f":
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def toml_value(value: Any) -> str:
    """One TOML value, inline: a string, number, boolean, array or inline table."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in _kind_first(value) if v is not None) + "}"
    raise TypeError(f"cannot write {type(value).__name__} as a TOML value")


def _kind_first(table: dict[str, Any]) -> list[tuple[str, Any]]:
    """A table's items with a rule's ``kind`` first, as a person writes a rule."""
    return sorted(table.items(), key=lambda item: item[0] != "kind")


def _is_table_array(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, dict) for v in value)


def toml_document(data: dict[str, Any], header: str = "") -> str:
    """A TOML document for ``data`` (keys are bare names; ``None`` values are left out)."""
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    _table(lines, (), data)
    return "\n".join(lines).strip("\n") + "\n"


def _table(lines: list[str], path: tuple[str, ...], data: dict[str, Any]) -> None:
    scalars = {k: v for k, v in data.items() if v is not None and not isinstance(v, dict) and not _is_table_array(v)}
    lines.extend(f"{k} = {toml_value(v)}" for k, v in scalars.items())
    for key, value in data.items():
        if isinstance(value, dict):
            lines += ["", f"[{'.'.join(path + (key,))}]"]
            _table(lines, path + (key,), value)
        elif _is_table_array(value):
            for item in value:
                lines += ["", f"[[{'.'.join(path + (key,))}]]"]
                # what is nested inside an item (a rule's rules) is written inline
                lines.extend(f"{k} = {toml_value(v)}" for k, v in _kind_first(item) if v is not None)
