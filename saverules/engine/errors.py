"""Diagnostics: every problem with a policy names its file, line, column and key."""
from __future__ import annotations

from typing import NamedTuple


class Diagnostic(NamedTuple):
    source: str
    line: int
    col: int
    message: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line}:{self.col}: error: {self.message}"


class PolicyError(ValueError):
    """A policy that cannot be used; ``.diagnostics`` says where and why."""

    def __init__(self, diagnostics: list[Diagnostic]):
        self.diagnostics = list(diagnostics)
        super().__init__("\n".join(str(d) for d in self.diagnostics))


def dotted(loc) -> str:
    """``("rules", 2, "segments", 0, "every")`` -> ``rules[2].segments[0].every``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<document>"
