"""Checker start-up: ``python -m saverules.check rules/default.toml`` against a bare interpreter.

Also ``python -m saverules.ls`` on a small store, next to ``python -c 'import torch'``:
listing and verifying a store imports no torch, so it should cost a fraction of it.

Each command runs as a fresh process of the interpreter running the
benchmarks (``sys.executable``, not a shell shim), interleaved and repeated;
the medians are compared.  When the goal is missed, ``python -X importtime``
names what the start-up spends its time importing.
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

from . import Row, interleaved, median, timed

NAME = "startup"
ROOT = Path(__file__).resolve().parent.parent
GOAL_RATIO = 3.0
CHECK = [sys.executable, "-m", "saverules.check", str(ROOT / "rules" / "default.toml")]


def _run(cmd) -> float:
    def go():
        proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[1:])} exited {proc.returncode}: {proc.stderr.strip()[-500:]}")
    return timed(go)


def import_offenders(cmd, runs: int = 3, top: int = 8):
    """[(package or saverules module, median ms of its own import time)], largest first, and the total."""
    per_run = []
    for _ in range(runs):
        proc = subprocess.run([cmd[0], "-X", "importtime", *cmd[1:]], cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
        totals = defaultdict(float)
        for line in proc.stderr.splitlines():
            parts = line[len("import time:"):].split("|") if line.startswith("import time:") else []
            if len(parts) != 3 or "self [us]" in line:
                continue
            module = parts[2].strip()
            # saverules by module, everything else by top-level package
            key = ".".join(module.split(".")[:2]) if module.startswith("saverules.") else module.split(".")[0]
            totals[key] += float(parts[0]) / 1000.0
        per_run.append(totals)
    names = set().union(*per_run)
    meds = {n: median([r.get(n, 0.0) for r in per_run]) for n in names}
    return sorted(meds.items(), key=lambda kv: -kv[1])[:top], median([sum(r.values()) for r in per_run])


MAKE_STORE = """
import sys, torch, saverules
from saverules import Progress
from saverules.torch import Checkpointer
ck = Checkpointer(saverules.loads('version = 1'), sys.argv[1])
model = torch.nn.Linear(256, 256)
for step in (1, 2, 3):
    ck.save(Progress(step), {"model": model})
ck.close()
"""


def run(quick: bool = False) -> list:
    repeats = 3 if quick else 15
    with tempfile.TemporaryDirectory(prefix="saverules-ls-bench-") as tmp:
        store = str(Path(tmp) / "store")
        subprocess.run([sys.executable, "-c", MAKE_STORE, store], cwd=ROOT, check=True, capture_output=True)
        return _run_all(quick, repeats, store)


def _run_all(quick: bool, repeats: int, store: str) -> list:
    check = ROOT / "saverules" / "check.py"
    if not check.is_file():
        return [Row(NAME, "python -m saverules.check", None, "s", note="saverules/check.py is missing: not measured")]
    variants = {
        "bare": lambda: _run([sys.executable, "-c", "pass"]),
        "import": lambda: _run([sys.executable, "-c", "import saverules"]),
        "check": lambda: _run(CHECK),
        "ls": lambda: _run([sys.executable, "-m", "saverules.ls", store]),
        "torch": lambda: _run([sys.executable, "-c", "import torch"]),
    }
    samples = interleaved(variants, repeats)
    med = {k: median(v) for k, v in samples.items()}
    ratio = med["check"] / med["bare"]
    met = ratio <= GOAL_RATIO
    rows = [
        Row(NAME, "python -c pass", med["bare"] * 1e3, "ms", samples=samples["bare"]),
        Row(NAME, "python -c 'import saverules'", med["import"] * 1e3, "ms", ratio=med["import"] / med["bare"],
            vs="bare interpreter", samples=samples["import"]),
        Row(NAME, "python -m saverules.check rules/default.toml", med["check"] * 1e3, "ms", ratio=ratio,
            vs="bare interpreter", goal=f"<= {GOAL_RATIO:g}x bare", met=met, samples=samples["check"],
            note="parses, validates and simulates the policy and prints the report"),
        Row(NAME, "python -c 'import torch'", med["torch"] * 1e3, "ms", ratio=med["torch"] / med["bare"],
            vs="bare interpreter", samples=samples["torch"]),
        Row(NAME, "python -m saverules.ls STORE (3 checkpoints, hashed and checked)", med["ls"] * 1e3, "ms",
            ratio=med["ls"] / med["torch"], vs="python -c 'import torch'", goal="< 1x import torch",
            met=med["ls"] < med["torch"], samples=samples["ls"],
            note="listing and verifying import no torch (only --load does)"),
    ]
    if not met or quick:
        offenders, total = import_offenders(CHECK, runs=1 if quick else 3)
        for name, ms in offenders:
            rows.append(Row(NAME, f"import time of {name}" + ("" if name.startswith("saverules") else "*"), ms, "ms",
                            note="" if name != offenders[0][0] else
                            f"python -X importtime: own import time per saverules module and per other top-level package (*), "
                            f"{total:.0f} ms in all (importtime inflates it)"))
    return rows
