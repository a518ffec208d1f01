"""Decision overhead: what one ``Decider.__call__`` costs a training loop.

The measured loop is the shape a training loop has::

    decide(Progress(step, total_steps=total, time=t, signal=flag))

so the figure includes building the Progress.  It is compared, in the same
run, with an empty loop and with the hand-written check that the engine
replaces (``if step % every == 0 or step == total``).  Reported figures are
*net* of the empty loop: what the decision adds to each step.
"""
from __future__ import annotations

import time
from pathlib import Path

import saverules
from saverules import Progress

from . import Row, interleaved, median

NAME = "decide"
ROOT = Path(__file__).resolve().parent.parent
GOAL_NS = 500.0
TOTAL = 10**9  # 5% of it is far beyond any measured step: the quiet path


class SlotsProgress:
    """What-if, not the library: a Progress-shaped class with ``__slots__`` and plain
    assignment (mutable), fed to the real decider to show what the Progress
    representation costs."""

    __slots__ = ("step", "total_steps", "epoch", "epoch_end", "is_last", "time", "metrics", "signal")

    def __init__(self, step, total_steps=None, epoch=0, epoch_end=False, is_last=None, time=None, metrics=None,
                 signal=False):
        self.step = step
        self.total_steps = total_steps
        self.epoch = epoch
        self.epoch_end = epoch_end
        self.is_last = is_last
        self.time = time
        self.metrics = metrics
        self.signal = signal


def _engine_with(cls, n, decide, total, t, flag):
    t0 = time.perf_counter()
    for step in range(1, n + 1):
        decide(cls(step, total_steps=total, time=t, signal=flag))
    return (time.perf_counter() - t0) / n


def _empty(n):
    t0 = time.perf_counter()
    for step in range(1, n + 1):
        pass
    return (time.perf_counter() - t0) / n


def _inline(n, every, total):
    saves = 0
    t0 = time.perf_counter()
    for step in range(1, n + 1):
        if step % every == 0 or step == total:
            saves += 1
    return (time.perf_counter() - t0) / n


def _progress_only(n, total, t, flag):
    t0 = time.perf_counter()
    for step in range(1, n + 1):
        Progress(step, total_steps=total, time=t, signal=flag)
    return (time.perf_counter() - t0) / n


def _call_only(n, decide, p):
    t0 = time.perf_counter()
    for step in range(1, n + 1):
        decide(p)
    return (time.perf_counter() - t0) / n


def _engine(n, decide, total, t, flag):
    t0 = time.perf_counter()
    for step in range(1, n + 1):
        decide(Progress(step, total_steps=total, time=t, signal=flag))
    return (time.perf_counter() - t0) / n


def _saves(decide, n, total, t, flag) -> int:
    return sum(1 for step in range(1, n + 1) if decide(Progress(step, total_steps=total, time=t, signal=flag)))


def run(quick: bool = False) -> list:
    n, repeats = (5_000, 3) if quick else (200_000, 9)
    n_fire = max(100, n // 20)  # the firing path is ~10x slower; fewer calls give the same precision
    default = saverules.load(ROOT / "rules" / "default.toml")
    preempt = saverules.load(ROOT / "rules" / "preemptible.toml")
    every = max(1, TOTAL // 20)
    t = 0.0

    # Sanity: the quiet loops really save nothing, the firing loop saves every step.
    assert _saves(default.compile(TOTAL), n, TOTAL, t, False) == 0
    assert _saves(preempt.compile(TOTAL), n, TOTAL, t, False) == 0
    assert _saves(default.compile(TOTAL), n_fire, TOTAL, t, "SIGUSR1") == n_fire

    quiet_p = Progress(1, total_steps=TOTAL, time=t, signal=False)
    variants = {
        "empty": lambda: _empty(n),
        "inline": lambda: _inline(n, every, TOTAL),
        "progress": lambda: _progress_only(n, TOTAL, t, False),
        "call": lambda: _call_only(n, default.compile(TOTAL), quiet_p),
        "quiet": lambda: _engine(n, default.compile(TOTAL), TOTAL, t, False),
        "quiet_time": lambda: _engine(n, preempt.compile(TOTAL), TOTAL, t, False),
        "whatif_slots": lambda: _engine_with(SlotsProgress, n, default.compile(TOTAL), TOTAL, t, False),
        "fire": lambda: _engine(n_fire, default.compile(TOTAL), TOTAL, t, "SIGUSR1"),
    }
    samples = interleaved(variants, repeats)
    ns = {k: [x * 1e9 for x in v] for k, v in samples.items()}
    med = {k: median(v) for k, v in ns.items()}
    empty = med["empty"]

    def net(k):
        return med[k] - empty

    inline_net = net("inline")
    quiet_net = net("quiet")
    rows = [
        Row(NAME, "empty loop (for step in range)", empty, "ns/step", samples=ns["empty"]),
        Row(NAME, "inline `step % every == 0 or step == total`", inline_net, "ns/step",
            note="net of the empty loop", samples=ns["inline"]),
        Row(NAME, "Progress(step, total_steps, time, signal) alone", net("progress"), "ns/step",
            note="net of the empty loop", samples=ns["progress"]),
        Row(NAME, "decider(p), Progress built once", net("call"), "ns/step",
            note="default.toml, quiet path; net of the empty loop", samples=ns["call"]),
        Row(NAME, "default.toml, no rule fires (common path)", quiet_net, "ns/step",
            ratio=quiet_net / inline_net if inline_net > 0 else None, vs="inline check",
            goal=f"<= {GOAL_NS:.0f} ns", met=quiet_net <= GOAL_NS,
            note=f"includes building the Progress; net of the empty loop ({med['quiet']:.0f} ns gross)",
            samples=ns["quiet"]),
        Row(NAME, "preemptible.toml (time rule), no rule fires", net("quiet_time"), "ns/step",
            ratio=net("quiet_time") / inline_net if inline_net > 0 else None, vs="inline check",
            note="includes building the Progress; net of the empty loop", samples=ns["quiet_time"]),
        Row(NAME, "what-if: same loop, Progress replaced by a __slots__ class", net("whatif_slots"), "ns/step",
            ratio=net("whatif_slots") / quiet_net if quiet_net > 0 else None, vs="common path",
            note="not the library: the real decider fed a mutable __slots__ object (no frozen dataclass); "
                 "net of the empty loop", samples=ns["whatif_slots"]),
        Row(NAME, "default.toml, a rule fires (on_signal)", net("fire"), "ns/step",
            ratio=net("fire") / quiet_net if quiet_net > 0 else None, vs="common path",
            note="the full evaluation, taken only on steps that save; net of the empty loop",
            samples=ns["fire"]),
    ]
    return rows
