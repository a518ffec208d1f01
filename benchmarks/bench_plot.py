"""``check --plot`` on 10,000 saves: the time to draw a schedule against the time to check it.

Each row runs what ``python -m saverules.check FILE [flags] [--plot IMAGE]`` runs after
start-up (load, simulate, the text report, and with ``--plot`` the figure and the
image file) in this process, interleaved, so the ratios compare figures of one run:

* a run of 10,000 steps saving at every step (10,000 saves, every one listed and
  drawn, three kept), and
* rules/default.toml over 2^63-1 steps (the first 10,000 saves listed and the last
  16 simulated: 10,016 drawn, the rest counted and written in).

matplotlib's first import and font set-up happen once, in the warm-up round; they are
part of a fresh ``python -m saverules.check --plot`` (see the start-up row).
"""
from __future__ import annotations

import io
import subprocess
import sys
import tempfile
from pathlib import Path

from saverules import check
from saverules.engine.limits import MAX_STEPS

from . import Row, interleaved, median, timed

NAME = "plot"
ROOT = Path(__file__).resolve().parent.parent
GOAL_S = 5.0  # "a few seconds"

EVERY_STEP = """version = 1
[run]
total_steps = 10000
step_seconds = 0.5
[[rules]]
kind = "every_steps"
every = 1
[retention]
keep_last = 3
"""


def _check(path: Path, flags: tuple[str, ...], image: Path | None) -> None:
    args = check.parser().parse_args([str(path), *flags])
    report = check.analyse(str(path), args)
    check.render_text(report, False, io.StringIO())
    if image is not None:
        from saverules import plot

        plot.plot([report], str(image))


def run(quick: bool = False) -> list:
    repeats = 1 if quick else 5
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        every = tmp / "every-step.toml"
        every.write_text(EVERY_STEP)
        cases = [
            ("10,000 steps, a save at each (10,000 drawn)", every, ()),
            ("rules/default.toml, --total-steps 2^63-1 (10,016 drawn)", ROOT / "rules" / "default.toml",
             ("--total-steps", str(MAX_STEPS))),
        ]
        for name, path, flags in cases:
            variants = {
                "check": lambda p=path, f=flags: timed(lambda: _check(p, f, None)),
                "png": lambda p=path, f=flags: timed(lambda: _check(p, f, tmp / "s.png")),
                "svg": lambda p=path, f=flags: timed(lambda: _check(p, f, tmp / "s.svg")),
            }
            samples = interleaved(variants, repeats, warmup=1)
            base = median(samples["check"])
            rows.append(Row(NAME, f"check, no plot: {name}", base, "s", samples=samples["check"]))
            for kind in ("png", "svg"):
                secs = median(samples[kind])
                size = (tmp / f"s.{kind}").stat().st_size
                rows.append(Row(NAME, f"check --plot .{kind}: {name}", secs, "s", ratio=secs / base,
                                vs="check, no plot", goal=f"< {GOAL_S:g} s", met=secs < GOAL_S,
                                samples=samples[kind], note=f"{size / 1024:,.0f} KiB written"))
        # a fresh process, start-up and matplotlib's import included, against the same command without --plot
        command = [sys.executable, "-m", "saverules.check", str(every)]
        fresh = interleaved({
            "check": lambda: timed(lambda: subprocess.run(command, capture_output=True, check=True)),
            "png": lambda: timed(lambda: subprocess.run(command + ["--plot", str(tmp / "f.png")],
                                                        capture_output=True, check=True)),
        }, 1 if quick else 3, warmup=0 if quick else 1)
        base = median(fresh["check"])
        rows.append(Row(NAME, "python -m saverules.check, 10,000 saves, a fresh process", base, "s",
                        samples=fresh["check"]))
        secs = median(fresh["png"])
        rows.append(Row(NAME, "python -m saverules.check --plot .png, 10,000 saves, a fresh process", secs, "s",
                        ratio=secs / base, vs="the same without --plot", goal=f"< {GOAL_S:g} s", met=secs < GOAL_S,
                        samples=fresh["png"]))
    return rows

