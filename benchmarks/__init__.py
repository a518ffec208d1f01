"""Benchmarks for saverules: decision overhead, schedule simulation, the checker
at its input limits, checker start-up, save stall and throughput, loop overhead and DDP collectives.

Run them all with ``python -m benchmarks`` (``--quick`` for a smoke run,
``--only NAME`` for one benchmark, ``--json PATH`` for machine-readable
output).  Every figure that is compared against something is measured side by
side with it in the same process run: the variants are interleaved and
repeated, and the medians are reported, because a shared machine is noisy.
See docs/performance.md for the published figures.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

__all__ = ["Row", "interleaved", "median", "fmt_value", "BENCHMARKS"]

#: The benchmarks in the order they run, as (name, module under benchmarks/).
BENCHMARKS = [
    ("decide", "bench_decide"),
    ("simulate", "bench_simulate"),
    ("check", "bench_check"),
    ("startup", "bench_startup"),
    ("save", "bench_save"),
    ("loop", "bench_loop"),
]


@dataclass
class Row:
    """One reported figure.

    ``value`` is in ``unit``.  ``ratio`` (when set) is ``value`` divided by the
    figure named in ``vs``, measured in the same run.  ``goal`` is the
    promise in words and ``met`` says whether this run kept it (``None``: the
    row is context, not a goal).  ``extrapolated`` marks figures computed from
    a smaller measured run instead of measured directly.
    """

    benchmark: str
    name: str
    value: Optional[float]
    unit: str
    ratio: Optional[float] = None
    vs: Optional[str] = None
    goal: Optional[str] = None
    met: Optional[bool] = None
    extrapolated: bool = False
    note: str = ""
    samples: List[float] = field(default_factory=list)

    def as_dict(self) -> dict:
        d = asdict(self)
        for key in ("value", "ratio"):
            v = d[key]
            if isinstance(v, float) and not math.isfinite(v):
                d[key] = None
        return d


def median(xs) -> float:
    return statistics.median(xs)


def interleaved(variants: Dict[str, Callable[[], float]], repeats: int, warmup: int = 1) -> Dict[str, List[float]]:
    """Run every variant ``repeats`` times, round-robin, and collect what each returns.

    Each callable measures itself and returns a number (typically seconds per
    unit of work).  Interleaving spreads the machine's slow moments evenly over
    the variants, so their medians can be compared.  The order rotates each
    round, so no variant is always first after a pause.
    """
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    out: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            out[name].append(variants[name]())
    return out


def timed(fn: Callable[[], object]) -> float:
    """Wall seconds one call of ``fn`` takes."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def fmt_value(v: Optional[float], unit: str = "") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    a = abs(v)
    if a == 0:
        s = "0"
    elif a >= 1000:
        s = f"{v:,.0f}"
    elif a >= 100:
        s = f"{v:.0f}"
    elif a >= 10:
        s = f"{v:.1f}"
    elif a >= 1:
        s = f"{v:.2f}"
    else:
        s = f"{v:.3g}"
    return f"{s} {unit}".strip()
