"""Schedule simulation: ``Policy.simulate`` against stepping through every step.

``Policy.simulate`` visits only the steps where something can happen.  The
baselines decide every single step: a plain loop over the real decider
(``for s in range(1, n + 1): decider(progress_at(s, ...))``), and, when the
test suite's brute-force oracle (tests/helpers/oracle.py) is present, that oracle.
Per-step baselines run only where they finish in reasonable time; the other
figures are extrapolated linearly from the largest size measured, and marked so.
"""
from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path

import saverules
from saverules.engine.simulate import progress_at

from . import Row, interleaved, median, timed

NAME = "simulate"
ROOT = Path(__file__).resolve().parent.parent
STEP_SECONDS = 0.4          # the [run] of rules/default.toml
EPOCH_STEPS = 20_000        # ditto
GOAL_S = 1.0


def _oracle():
    """tests/helpers/oracle.py's ``oracle_saves``, or None when the file is not there."""
    tests = ROOT / "tests" / "helpers"
    if not (tests / "oracle.py").is_file():
        return None
    if str(tests) not in sys.path:
        sys.path.insert(0, str(tests))
    try:
        return importlib.import_module("oracle").oracle_saves
    except Exception:  # a broken oracle must not stop the benchmark
        return None


def _steps(saves) -> list:
    """Saved steps from a list of steps or of (step, reasons) pairs."""
    out = []
    for s in saves:
        out.append(int(s[0]) if isinstance(s, (tuple, list)) else int(s))
    return out


def per_step(policy, n, spe, sec) -> list:
    decide = policy.compile(n)
    return [s for s in range(1, n + 1) if decide(progress_at(s, n, spe, sec)).save]


def run(quick: bool = False) -> list:
    policy = saverules.load(ROOT / "rules" / "default.toml")
    oracle = _oracle()
    sizes = [10**4, 10**6, 10**9]
    per_step_max = 10**4 if quick else 10**6   # largest size the per-step loop runs at
    oracle_budget = 2.0 if quick else 90.0     # seconds the oracle may take at one size (one run)
    repeats = 1 if quick else 5
    rows = []
    measured_rate = {}  # baseline -> seconds per step at the largest size run
    measured_at = {}    # baseline -> that size

    for n in sizes:
        spe = max(1, n // 2)  # two epochs: the shape of [run], scaled to n
        sim = policy.simulate(n, steps_per_epoch=spe, step_seconds=STEP_SECONDS)
        variants = {"simulate": lambda n=n, spe=spe: timed(
            lambda: policy.simulate(n, steps_per_epoch=spe, step_seconds=STEP_SECONDS))}
        run_per_step = n <= per_step_max
        agree = None
        if run_per_step:
            variants["per_step"] = lambda n=n, spe=spe: timed(lambda: per_step(policy, n, spe, STEP_SECONDS))
            agree = per_step(policy, n, spe, STEP_SECONDS) == sim.saved_steps
        oracle_s = None
        if oracle is not None:
            rate = measured_rate.get("oracle")
            if rate is None or rate * n <= oracle_budget:
                # The oracle is slow: one timed run per size, whose answer is also checked.
                t0 = time.perf_counter()
                got = _steps(oracle(policy, n, steps_per_epoch=spe, step_seconds=STEP_SECONDS))
                oracle_s = time.perf_counter() - t0
                measured_rate["oracle"], measured_at["oracle"] = oracle_s / n, n
                agree = (agree is not False) and got == sim.saved_steps
        reps = repeats if n <= 10**4 else min(repeats, 3)
        samples = interleaved(variants, reps, warmup=0 if quick or n > 10**4 else 1)
        sim_s = median(samples["simulate"])
        label = f"10^{len(str(n)) - 1} steps"
        goal = met = None
        if n == 10**9:
            goal, met = f"< {GOAL_S:g} s", sim_s < GOAL_S
        baselines = {}
        if oracle_s is not None:
            samples["oracle"] = [oracle_s]
        for base in ("per_step", "oracle"):
            if base in samples:
                baselines[base] = (median(samples[base]), False)
                measured_rate[base] = baselines[base][0] / n
                measured_at[base] = n
            elif base in measured_rate:
                baselines[base] = (measured_rate[base] * n, True)
        main_base = baselines.get("per_step")
        rows.append(Row(
            NAME, f"Policy.simulate, {label} ({len(sim.saves)} saves)", sim_s, "s",
            ratio=sim_s / main_base[0] if main_base else None,
            vs="per-step decider loop" + (" (extrapolated)" if main_base and main_base[1] else ""),
            goal=goal, met=met, samples=samples["simulate"],
            note="" if agree is None else ("same saves as every per-step run at this size" if agree
                                          else "DIFFERENT saves from a per-step run: an engine bug"),
        ))
        names = {"per_step": "per-step decider loop", "oracle": "brute-force oracle (tests/helpers/oracle.py)"}
        for base, (secs, extra) in baselines.items():
            rows.append(Row(NAME, f"{names[base]}, {label}", secs, "s", extrapolated=extra,
                            samples=samples.get(base, []),
                            note=f"not run: linear from the measured 10^{len(str(measured_at[base])) - 1} steps"
                            if extra else ("one run" if base == "oracle" else "")))
        if agree is False:
            rows.append(Row(NAME, f"simulate agrees with per-step, {label}", 0.0, "", goal="same saves", met=False))
    if oracle is None:
        rows.append(Row(NAME, "brute-force oracle", None, "", note="tests/helpers/oracle.py not present: not measured"))

    # Stress shape: the default's fixed 20000-step epochs, so the number of saves grows with n
    # (one per epoch end, all kept by keep_every): the cost is linear in the saves.
    stress = [10**6, 10**7] if quick else [10**7, 10**9]
    for n in stress:
        runs = [timed(lambda n=n: policy.simulate(n, steps_per_epoch=EPOCH_STEPS, step_seconds=STEP_SECONDS))
                for _ in range(1 if n >= 10**9 else 3)]
        sim = policy.simulate(n, steps_per_epoch=EPOCH_STEPS, step_seconds=STEP_SECONDS)
        big = n >= 10**9
        listed = "" if sim.complete else f", the first {len(sim.saves):,} listed and the rest counted"
        rows.append(Row(NAME, f"Policy.simulate, 10^{len(str(n)) - 1} steps, 20000-step epochs "
                              f"({sim.save_count} saves{listed})",
                        median(runs), "s", samples=runs,
                        goal=f"< {GOAL_S:g} s" if big else None, met=(median(runs) < GOAL_S) if big else None,
                        note="one run" if big else None))
        if not sim.complete:
            runs = [timed(lambda n=n: policy.simulate(n, steps_per_epoch=EPOCH_STEPS, step_seconds=STEP_SECONDS,
                                                      max_saves=None)) for _ in range(1)]
            rows.append(Row(NAME, "Policy.simulate(max_saves=None), the same run, every save listed",
                            median(runs), "s", samples=runs, note="one run"))
    return rows
