"""``check`` always answers: the time (and peak memory) of the checker on inputs at its limits.

Each row runs what ``python -m saverules.check FILE [flags]`` runs after start-up
(load, validate, compile, simulate, render the report) in this process, on a
file written for it: 1,000 and 10,000 rules of mixed kinds (so that the ratio
of the two shows the cost is linear in the rules), the longest run (2^63-1
steps) of rules/default.toml, 10^18 one-step epochs, a file at the 1 MiB size
limit, and nesting beyond the depth limit.  Peak memory is the largest amount
Python allocated during the run (tracemalloc), not the process's size.  Each
row also gives the CPU time of the run, which a busy machine inflates less than
the wall time.
"""
from __future__ import annotations

import io
import tempfile
import time
import tracemalloc
from pathlib import Path

from saverules import check
from saverules.engine.limits import MAX_FILE_BYTES, MAX_STEPS

from . import Row, median, timed

NAME = "check"
ROOT = Path(__file__).resolve().parent.parent
GOAL_S = 2.0


def mixed_rules(n: int) -> str:
    """A policy of ``n`` rules cycling through the step, epoch, clock and tail kinds."""
    out = ["version = 1", "[run]", "total_steps = 1000000", "steps_per_epoch = 10000", "step_seconds = 0.5"]
    for i in range(n):
        kind = i % 6
        out.append("[[rules]]")
        if kind == 0:
            out += ['kind = "every_steps"', f"every = {1000 + i}"]
        elif kind == 1:
            out += ['kind = "at_steps"', f"steps = [{i + 1}, {2 * i + 7}]"]
        elif kind == 2:
            out += ['kind = "epoch_end"', f"every = {1 + i % 7}"]
        elif kind == 3:
            out += ['kind = "every_steps"', f'every = "{1 + i % 50}%"', f"after = {i}"]
        elif kind == 4:
            out += ['kind = "tail"', f"interval = {100 + i}"]
        else:
            out += ['kind = "every_time"', f'every = "{1 + i}m"']
    return "\n".join(out) + "\n"


def one_epoch_rule(total: int) -> str:
    return f'version = 1\n[run]\ntotal_steps = {total}\nsteps_per_epoch = 1\n[[rules]]\nkind = "epoch_end"\n'


def nested_nots(depth: int) -> str:
    inner = '{ kind = "every_steps", every = 1 }'
    for _ in range(depth - 1):
        inner = f'{{ kind = "not", rule = {inner} }}'
    return f'version = 1\n[[rules]]\nkind = "not"\nrule = {inner}\n'


def at_the_size_limit(size_limit: int = MAX_FILE_BYTES) -> str:
    head = 'version = 1\n[[rules]]\nkind = "at_steps"\nsteps = ['
    steps, size, n = [], len(head) + 2, 1
    while size + len(str(n)) + 2 <= size_limit:
        steps.append(str(n))
        size += len(str(n)) + 2
        n += 7
    return head + ", ".join(steps) + "]\n"


def _check(path: Path, *flags: str) -> str:
    args = check.parser().parse_args([str(path), *flags])
    out = io.StringIO()
    for report in (check.analyse(str(path), args),):
        check.render_text(report, False, out)
    return out.getvalue()


def _peak_mib(fn) -> float:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def run(quick: bool = False) -> list:
    repeats = 1 if quick else 3
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cases = []
        for n in (1000, 10_000):  # the goal's size even in a quick run: a few seconds
            path = tmp / f"rules-{n}.toml"
            path.write_text(mixed_rules(n))
            cases.append((f"{n:,} rules of mixed kinds ({path.stat().st_size // 1024} KiB), 10^6 steps",
                          path, (), "valid"))
        cases.append(("rules/default.toml, --total-steps 2^63-1", ROOT / "rules" / "default.toml",
                      ("--total-steps", str(MAX_STEPS)), "counted"))
        path = tmp / "epochs.toml"
        path.write_text(one_epoch_rule(10**18))
        cases.append(("10^18 steps, steps_per_epoch = 1, epoch_end", path, (), "counted"))
        path = tmp / "big.toml"
        path.write_text(at_the_size_limit(MAX_FILE_BYTES // 16 if quick else MAX_FILE_BYTES))
        cases.append((f"a {path.stat().st_size // 1024} KiB file" + ("" if quick else " (the size limit)")
                      + ", one at_steps", path, (), "valid"))
        path = tmp / "over.toml"
        path.write_text(at_the_size_limit() + "#" * 64 + "\n")
        cases.append(("a file over the size limit", path, (), "error"))
        for depth in (300, 5000):
            path = tmp / f"not-{depth}.toml"
            path.write_text(nested_nots(depth))
            cases.append((f"{depth} nested `not`s", path, (), "error"))

        seconds = {}
        for name, path, flags, expect in cases:
            text = _check(path, *flags)
            answered = ("error:" in text) if expect == "error" else (
                "valid" in text and ("counted" in text if expect == "counted" else True))
            runs, cpu = [], []
            for _ in range(repeats):
                c0 = time.process_time()
                runs.append(timed(lambda path=path, flags=flags: _check(path, *flags)))
                cpu.append(time.process_time() - c0)
            secs = seconds[name] = median(runs)
            peak = _peak_mib(lambda path=path, flags=flags: _check(path, *flags))
            ten_thousand = name.startswith("10,000 rules")
            rows.append(Row(
                NAME, f"check: {name}", secs, "s", samples=runs,
                goal=f"< {GOAL_S:g} s" if ten_thousand else None, met=(secs < GOAL_S) if ten_thousand else None,
                note=f"{median(cpu):.3g} s of CPU; peak {peak:.1f} MiB allocated; " + ("answered as expected" if answered
                                                            else "UNEXPECTED answer: a checker bug"),
            ))
        small, large = (seconds[n] for n in seconds if "rules of mixed kinds" in n)
        rows.append(Row(NAME, "check: 10,000 rules against 1,000 (linear or better: at most about 10)", large / small,
                        "x", note="the two rows above, same run"))
    return rows
