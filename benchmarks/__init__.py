"""Benchmarks for saverules: decision overhead, schedule simulation, the checker
at its input limits, check --plot on 10,000 saves, checker start-up, save stall and throughput, loop overhead and DDP collectives.

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
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

__all__ = ["Row", "interleaved", "median", "fmt_value", "held_training_step", "BENCHMARKS"]

#: The benchmarks in the order they run, as (name, module under benchmarks/).
BENCHMARKS = [
    ("decide", "bench_decide"),
    ("simulate", "bench_simulate"),
    ("check", "bench_check"),
    ("plot", "bench_plot"),
    ("startup", "bench_startup"),
    ("save", "bench_save"),
    ("load", "bench_load"),
    ("loop", "bench_loop"),
    ("tiers", "bench_tiers"),
    ("store_size", "bench_store_size"),
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
    value: float | None
    unit: str
    ratio: float | None = None
    vs: str | None = None
    goal: str | None = None
    met: bool | None = None
    extrapolated: bool = False
    note: str = ""
    samples: list[float] = field(default_factory=list)

    def as_dict(self) -> dict:
        d = asdict(self)
        for key in ("value", "ratio"):
            v = d[key]
            if isinstance(v, float) and not math.isfinite(v):
                d[key] = None
        return d


def median(xs) -> float:
    return statistics.median(xs)


def interleaved(variants: dict[str, Callable[[], float]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
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
    out: dict[str, list[float]] = {name: [] for name in names}
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


def fmt_value(v: float | None, unit: str = "") -> str:
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


def held_training_step(model, opt, tokens: int = 64):
    """A minimind training step to run after a save; each call returns how long its ``optimizer.step()`` was held.

    One step is forward and backward of a fixed 2 x ``tokens`` batch, then
    ``optimizer.step()``.  The hold is measured by a step pre-hook registered
    once another hook is on the optimizer (the store's, on its first
    asynchronous save, in the warm-up round), so that it runs after that one:
    when the store lets the step go.  The same probe times every variant.
    """
    import torch

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (2, tokens), generator=g)
    hooked, probe = [None], [None]

    def step() -> float:
        if probe[0] is None and len(opt._optimizer_step_pre_hooks) > 0:
            probe[0] = opt.register_step_pre_hook(lambda *a: hooked.__setitem__(0, time.perf_counter()))
        _, loss = model(ids, ids)
        loss.backward()
        hooked[0] = None
        t0 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return hooked[0] - t0 if hooked[0] is not None else 0.0
    return step
