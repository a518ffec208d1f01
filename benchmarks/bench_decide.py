"""Decision overhead: what one ``Decider.__call__`` costs a training loop.

The measured loop is the shape a training loop has::

    decide(Progress(step, total_steps=total, time=t, signal=flag))

so the figure includes building the Progress.  The fields call
``decider.decide(step, total_steps=total, time=t, signal=flag)`` decides the
same without building a Progress on a quiet step.  Both are compared, in the same
run, with an empty loop and with the hand-written check that the engine
replaces (``if step % every == 0 or step == total``), and with Hugging Face's
per-step check (``DefaultFlowCallback.on_step_end``) when transformers is
installed.  Reported figures are *net* of the empty loop: what the decision
adds to each step.  Ratios against the inline check are of the whole loops
(loop included on both sides), as a training loop sees them.
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
GOAL_RATIO = 10.0  # the common path, loop included, against the inline check's loop
TOTAL = 10**9  # 5% of it is far beyond any measured step: the quiet path


class BareSlots:
    """What-if, not the library: the cheapest 8-field object a class call with keywords
    builds here (``__slots__``, plain assignment, no checks, mutable).  Built alone, it
    shows the floor that the interpreter's class call sets for any Progress."""

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


def _hf_flow(n, every, total):
    """Hugging Face's own per-step check: DefaultFlowCallback.on_step_end with save_steps=every.

    None when transformers is not installed."""
    try:
        from transformers.trainer_callback import DefaultFlowCallback, TrainerControl, TrainerState
        from transformers.trainer_utils import IntervalStrategy, SaveStrategy
    except Exception:  # noqa: BLE001 - an optional peer; any import failure means "not measured"
        return None
    from types import SimpleNamespace

    args = SimpleNamespace(logging_first_step=False, logging_strategy=IntervalStrategy.NO,
                           eval_strategy=IntervalStrategy.NO, eval_delay=0, save_strategy=SaveStrategy.STEPS)
    state = TrainerState(max_steps=total, logging_steps=500, eval_steps=500, save_steps=every)
    control = TrainerControl()
    callback = DefaultFlowCallback()

    def measure():
        t0 = time.perf_counter()
        for step in range(1, n + 1):
            state.global_step = step
            callback.on_step_end(args, state, control)
        return (time.perf_counter() - t0) / n

    return measure


def _empty(n):
    t0 = time.perf_counter()
    for _step in range(1, n + 1):
        pass
    return (time.perf_counter() - t0) / n


def _inline(n, every, total):
    saves = 0
    t0 = time.perf_counter()
    for step in range(1, n + 1):
        if step % every == 0 or step == total:
            saves += 1
    return (time.perf_counter() - t0) / n


def _progress_only_of(cls, n, total, t, flag):
    t0 = time.perf_counter()
    for step in range(1, n + 1):
        cls(step, total_steps=total, time=t, signal=flag)
    return (time.perf_counter() - t0) / n


def _progress_only(n, total, t, flag):
    t0 = time.perf_counter()
    for step in range(1, n + 1):
        Progress(step, total_steps=total, time=t, signal=flag)
    return (time.perf_counter() - t0) / n


def _call_only(n, decide, p):
    t0 = time.perf_counter()
    for _step in range(1, n + 1):
        decide(p)
    return (time.perf_counter() - t0) / n


def _engine_positional(n, decide, total, t, flag):
    t0 = time.perf_counter()
    for step in range(1, n + 1):
        decide(Progress(step, total, 0, False, None, t, None, flag))
    return (time.perf_counter() - t0) / n


def _engine(n, decide, total, t, flag):
    t0 = time.perf_counter()
    for step in range(1, n + 1):
        decide(Progress(step, total_steps=total, time=t, signal=flag))
    return (time.perf_counter() - t0) / n


def _engine_fields(n, decider, total, t, flag):
    """The fields call, as a loop writes it (the method looked up at every step, as HF's hook is)."""
    t0 = time.perf_counter()
    for step in range(1, n + 1):
        decider.decide(step, total_steps=total, time=t, signal=flag)
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
    for flag, count in ((False, n_fire), ("SIGUSR1", n_fire)):  # the fields call decides the same
        fields = default.compile(TOTAL)
        calls = default.compile(TOTAL)
        assert [fields.decide(s, total_steps=TOTAL, time=t, signal=flag) for s in range(1, count + 1)] == \
            [calls(Progress(s, total_steps=TOTAL, time=t, signal=flag)) for s in range(1, count + 1)]

    quiet_p = Progress(1, total_steps=TOTAL, time=t, signal=False)
    hf = _hf_flow(n, every, TOTAL)
    variants = {
        "empty": lambda: _empty(n),
        "inline": lambda: _inline(n, every, TOTAL),
        "progress": lambda: _progress_only(n, TOTAL, t, False),
        "bare_slots": lambda: _progress_only_of(BareSlots, n, TOTAL, t, False),
        "call": lambda: _call_only(n, default.compile(TOTAL), quiet_p),
        "quiet": lambda: _engine(n, default.compile(TOTAL), TOTAL, t, False),
        "quiet_positional": lambda: _engine_positional(n, default.compile(TOTAL), TOTAL, t, False),
        "fields": lambda: _engine_fields(n, default.compile(TOTAL), TOTAL, t, False),
        "fields_time": lambda: _engine_fields(n, preempt.compile(TOTAL), TOTAL, t, False),
        "quiet_time": lambda: _engine(n, preempt.compile(TOTAL), TOTAL, t, False),
        "fire": lambda: _engine(n_fire, default.compile(TOTAL), TOTAL, t, "SIGUSR1"),
    }
    if hf is not None:
        variants["hf"] = hf
    samples = interleaved(variants, repeats)
    ns = {k: [x * 1e9 for x in v] for k, v in samples.items()}
    med = {k: median(v) for k, v in ns.items()}
    empty = med["empty"]

    def net(k):
        return med[k] - empty

    def gross_ratio(k):
        """Whole loop against whole loop, as a training loop sees it (the issue's measure)."""
        return med[k] / med["inline"]

    inline_net = net("inline")
    quiet_net = net("quiet")
    quiet_ratio = gross_ratio("quiet")
    rows = [
        Row(NAME, "empty loop (for step in range)", empty, "ns/step", samples=ns["empty"]),
        Row(NAME, "inline `step % every == 0 or step == total`", inline_net, "ns/step",
            note=f"net of the empty loop ({med['inline']:.0f} ns gross)", samples=ns["inline"]),
        Row(NAME, "Progress(step, total_steps, time, signal) alone", net("progress"), "ns/step",
            note="checked on construction; net of the empty loop", samples=ns["progress"]),
        Row(NAME, "what-if: bare mutable __slots__ class, same keywords, alone", net("bare_slots"), "ns/step",
            ratio=net("bare_slots") / net("progress") if net("progress") > 0 else None, vs="Progress alone",
            note="not the library: no checks, no read-only fields; the floor of a class call with these "
                 "keywords on this interpreter; net of the empty loop", samples=ns["bare_slots"]),
        Row(NAME, "decider(p), Progress built once", net("call"), "ns/step",
            note="default.toml, quiet path; net of the empty loop", samples=ns["call"]),
        Row(NAME, "default.toml, no rule fires (common path)", quiet_net, "ns/step",
            ratio=quiet_ratio, vs="inline check, whole loop",
            goal=f"<= {GOAL_NS:.0f} ns", met=quiet_net <= GOAL_NS,
            note=f"includes building the Progress; net of the empty loop ({med['quiet']:.0f} ns gross); "
                 f"net of the empty loop on both sides it is {quiet_net / inline_net:.1f}x the inline check"
                 if inline_net > 0 else "includes building the Progress", samples=ns["quiet"]),
        Row(NAME, "common path against the inline check, whole loop", quiet_ratio, "x",
            goal=f"<= {GOAL_RATIO:.0f}x", met=quiet_ratio <= GOAL_RATIO,
            note=f"{med['quiet']:.0f} ns against {med['inline']:.0f} ns a step, loop included, same run",
            samples=[q / i for q, i in zip(ns["quiet"], ns["inline"])]),
        Row(NAME, "default.toml, Progress with positional arguments", net("quiet_positional"), "ns/step",
            ratio=gross_ratio("quiet_positional"), vs="inline check, whole loop",
            note="Progress(step, total, 0, False, None, t, None, flag), as saverules.minimind.train builds it; "
                 "net of the empty loop", samples=ns["quiet_positional"]),
        Row(NAME, "preemptible.toml (time rule), no rule fires", net("quiet_time"), "ns/step",
            ratio=gross_ratio("quiet_time"), vs="inline check, whole loop",
            note="includes building the Progress; net of the empty loop", samples=ns["quiet_time"]),
    ]
    rows += [
        Row(NAME, "default.toml, fields call decider.decide(step, ...), no rule fires", net("fields"), "ns/step",
            ratio=gross_ratio("fields"), vs="inline check, whole loop",
            note="decide(step, total_steps=total, time=t, signal=flag): the same decision, no Progress built on a "
                 "quiet step; net of the empty loop", samples=ns["fields"]),
        Row(NAME, "preemptible.toml (time rule), fields call, no rule fires", net("fields_time"), "ns/step",
            ratio=gross_ratio("fields_time"), vs="inline check, whole loop",
            note="net of the empty loop", samples=ns["fields_time"]),
    ]
    if hf is not None:
        rows.append(Row(NAME, "peer: transformers DefaultFlowCallback.on_step_end", net("hf"), "ns/step",
                        ratio=gross_ratio("hf"), vs="inline check, whole loop",
                        note="Hugging Face Trainer's per-step save/log/eval check, save_steps as the inline check; "
                             "no record built; net of the empty loop", samples=ns["hf"]))
        hf_net = net("hf")
        if hf_net > 0:
            fields_vs_hf = net("fields") / hf_net
            rows += [
                Row(NAME, "common path, fields call, against HF's on_step_end", fields_vs_hf, "x",
                    goal="<= 1x", met=fields_vs_hf <= 1.0,
                    note=f"{net('fields'):.0f} ns against {hf_net:.0f} ns a step, both net of the empty loop, "
                         "same run", samples=[(f - e) / (h - e) for f, h, e in zip(ns["fields"], ns["hf"], ns["empty"])
                                              if h > e]),
                Row(NAME, "common path, Progress built, against HF's on_step_end", quiet_net / hf_net, "x",
                    note=f"{quiet_net:.0f} ns against {hf_net:.0f} ns a step, both net of the empty loop, same run; "
                         "Progress(...) then decider(p)",
                    samples=[(q - e) / (h - e) for q, h, e in zip(ns["quiet"], ns["hf"], ns["empty"]) if h > e]),
            ]
    rows.append(Row(NAME, "default.toml, a rule fires (on_signal)", net("fire"), "ns/step",
                    ratio=net("fire") / quiet_net if quiet_net > 0 else None, vs="common path",
                    note="the full evaluation, taken only on steps that save; net of the empty loop",
                    samples=ns["fire"]))
    return rows
