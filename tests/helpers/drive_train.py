"""Run the reference training loop from outside, as a user's own script would, with a test's clock,
signals, holds and decision reports (test fixture, not part of saverules).

    python tests/helpers/drive_train.py [DRIVER FLAGS] [TRAIN FLAGS]
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/helpers/drive_train.py [...]

The loop is ``saverules.minimind.train.main``, given a ``clock`` and an ``after_step`` callback; every
flag this script does not know goes to the loop. Driver flags (all optional):

  --step-seconds DT                the clock's n-th read is n * DT (the loop reads it once per optimizer
                                   step, so a fresh run sees step * DT) instead of the checkpointer's clock
  --clock-skew R:A:B               rank R's clock reads A * t + B instead of t (repeatable)
  --send-signal STEP:RANK[:NAME]   after optimizer step STEP, rank RANK sends itself signal NAME (default
                                   SIGUSR1) with os.kill (repeatable)
  --hold-at STEP                   after optimizer step STEP, print "holding at step STEP" and wait there
                                   until a signal arrives (so a test can kill or signal the run there)
  --report PATH                    each rank appends its decisions, one JSON line a step, to PATH.rank<R>:
                                   step, save, reasons, the agreed signal (or false), collectives so far,
                                   sync steps so far, the decider's save-cost estimate [stall, write] (or null),
                                   the process id
  --save-sleep S1[,S2...]          add a state entry whose state_dict sleeps S1 seconds at its first call,
                                   S2 at its second, ... (the last one from then on), so a save costs what
                                   the test says; its state (the calls so far) resumes with the run

(No flag is a prefix of a torchrun option: torchrun's parser would take it for its own.)
The rank is torchrun's RANK (0 without torchrun).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from saverules.minimind.train import StepReport, main


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="drive_train.py", allow_abbrev=False,
                                description="Drive saverules.minimind.train with a test's clock, signals and reports.")
    p.add_argument("--step-seconds", type=float, default=None)
    p.add_argument("--clock-skew", action="append", default=[], metavar="R:A:B")
    p.add_argument("--send-signal", action="append", default=[], metavar="STEP:RANK[:NAME]")
    p.add_argument("--hold-at", type=int, default=None, metavar="STEP")
    p.add_argument("--report", default=None, metavar="PATH")
    p.add_argument("--save-sleep", default=None, metavar="S1[,S2...]")
    return p


class SleepyState:
    """A state entry whose ``state_dict`` takes as long as the schedule says: a save of a known cost."""

    def __init__(self, schedule: list[float]) -> None:
        self.schedule = schedule
        self.calls = 0

    def state_dict(self) -> dict[str, int]:
        seconds = self.schedule[min(self.calls, len(self.schedule) - 1)]
        self.calls += 1
        time.sleep(seconds)
        return {"calls": self.calls}

    def load_state_dict(self, d: dict[str, int]) -> None:
        self.calls = int(d["calls"])


def make_clock(step_seconds: float | None, skews: list[str], rank: int) -> Callable[[], float] | None:
    """The clock the loop is given, or None for its own (no --step-seconds and no skew for this rank)."""
    scale, offset = 1.0, 0.0
    for item in skews:
        r, a, b = item.split(":")
        if int(r) == rank:
            scale, offset = float(a), float(b)
    if step_seconds is None and (scale, offset) == (1.0, 0.0):
        return None
    reads = [0]
    start = time.monotonic()

    def clock() -> float:
        reads[0] += 1
        t = reads[0] * step_seconds if step_seconds is not None else time.monotonic() - start
        return scale * t + offset

    return clock


def hold(step: int) -> None:
    """Print the hold line, then wait until SIGTERM or SIGUSR1 arrives; the loop's own handler still gets it."""
    arrived: list[int] = []
    previous: dict[int, Any] = {}

    def on_signal(signum: int, frame: FrameType | None) -> None:
        arrived.append(signum)
        handler = previous[signum]
        if callable(handler):
            handler(signum, frame)

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        previous[sig] = signal.signal(sig, on_signal)
    try:
        print(f"holding at step {step}", flush=True)
        while not arrived:
            time.sleep(0.02)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def make_after_step(signals: list[str], hold_at: int | None, report: str | None,
                    rank: int) -> Callable[[StepReport], None]:
    sends: dict[int, str] = {}
    for item in signals:
        parts = item.split(":")
        if int(parts[1]) == rank:
            sends[int(parts[0])] = parts[2] if len(parts) > 2 else "SIGUSR1"
    report_path = f"{report}.rank{rank}" if report else None

    def after_step(r: StepReport) -> None:
        if report_path is not None:
            decider = getattr(r.checkpointer, "decider", None)
            cost = getattr(decider, "save_cost", None)
            line = {"step": r.step, "save": r.decision.save, "reasons": list(r.decision.reasons),
                    "signal": r.signal or False, "collectives": getattr(decider, "collectives", 0),
                    "syncs": getattr(decider, "syncs", 0), "cost": None if cost is None else list(cost),
                    "pid": os.getpid()}
            with open(report_path, "a") as f:
                f.write(json.dumps(line) + "\n")
        if r.step in sends:  # a real signal to this process, as a scheduler would send it
            os.kill(os.getpid(), getattr(signal, sends[r.step]))
        if r.step == hold_at:
            hold(r.step)

    return after_step


def run(argv: list[str] | None = None) -> int:
    opts, rest = _parser().parse_known_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    extra = None
    if opts.save_sleep is not None:
        extra = {"sleepy": SleepyState([float(x) for x in opts.save_sleep.split(",")])}
    return main(rest, clock=make_clock(opts.step_seconds, opts.clock_skew, rank),
                after_step=make_after_step(opts.send_signal, opts.hold_at, opts.report, rank), extra_state=extra)


if __name__ == "__main__":
    sys.exit(run())
