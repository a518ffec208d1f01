"""The benchmark command runs and reports well-formed figures (quick mode).

No assertion here is about speed: the figures of a quick run are not
meaningful, and performance is published in docs/performance.md from a full
run of ``python -m benchmarks``.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ALL = ["decide", "simulate", "check", "plot", "startup", "save", "load", "loop", "tiers", "store_size"]
ROW_KEYS = {"benchmark", "name", "value", "unit", "ratio", "vs", "goal", "met", "extrapolated", "note", "samples"}


def _run(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "benchmarks", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "quick.json"
    proc = _run("--quick", "--json", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


def test_quick_run_covers_every_benchmark(quick):
    proc, doc = quick
    assert doc["quick"] is True
    assert doc["benchmarks"] == ALL
    assert doc["failed"] == []
    assert {r["benchmark"] for r in doc["rows"]} == set(ALL)
    for name in ALL:
        assert f"== {name} ==" in proc.stdout
    assert "== summary ==" in proc.stdout
    assert set(doc["seconds"]) == set(ALL)


def test_machine_is_described(quick):
    _, doc = quick
    machine = doc["machine"]
    assert machine["cores"] >= 1
    assert machine["cpu"]
    assert machine["python"] == ".".join(map(str, sys.version_info[:3]))
    import torch

    assert machine["torch"] == torch.__version__


def test_rows_are_well_formed(quick):
    _, doc = quick
    for row in doc["rows"]:
        assert set(row) == ROW_KEYS, row
        assert isinstance(row["name"], str) and row["name"]
        assert isinstance(row["unit"], str)
        assert row["met"] in (True, False, None)
        if row["met"] is not None:
            assert row["goal"], row  # a pass/fail figure says what it was measured against
        for key in ("value", "ratio"):
            v = row[key]
            assert v is None or (isinstance(v, (int, float)) and math.isfinite(v)), row
        if row["ratio"] is not None:
            assert row["vs"], row
        assert all(isinstance(x, (int, float)) and math.isfinite(x) for x in row["samples"]), row


def test_every_goal_of_the_issue_is_reported(quick):
    _, doc = quick
    goals = {(r["benchmark"], r["name"]) for r in doc["rows"] if r["met"] is not None}
    by_bench = {b for b, _ in goals}
    assert by_bench == set(ALL)
    names = " | ".join(n for _, n in goals)
    for needle in ("common path", "10^9 steps", "saverules.check", "async save stall", "sync throughput",
                   "engine overhead", "DDP collectives per 1000 steps: step-only",
                   "DDP collectives per 1000 steps: preemptible.toml (time + signal)"):
        assert needle in names, needle


def test_figures_are_positive_where_they_are_measurements(quick):
    _, doc = quick
    rows = {(r["benchmark"], r["name"]): r for r in doc["rows"]}
    common = rows[("decide", "default.toml, no rule fires (common path)")]
    assert common["value"] > 0 and common["samples"]
    assert all(r["value"] > 0 for r in doc["rows"] if r["benchmark"] == "save")
    step_only = [r for k, r in rows.items() if "step-only" in k[1]]
    assert step_only and all(r["value"] == 0 for r in step_only)  # a step-only policy never communicates
    assert all("ranks agree" in r["note"] for r in doc["rows"] if "DDP collectives" in r["name"])


def test_extrapolated_figures_are_marked(quick):
    proc, doc = quick
    extrapolated = [r for r in doc["rows"] if r["extrapolated"]]
    assert extrapolated
    assert all(r["note"] for r in extrapolated)
    assert "(extrapolated)" in proc.stdout


def test_only_runs_the_named_benchmark(tmp_path):
    out = tmp_path / "only.json"
    proc = _run("--quick", "--only", "decide", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["benchmarks"] == ["decide"]
    assert {r["benchmark"] for r in doc["rows"]} == {"decide"}
    assert "== simulate ==" not in proc.stdout


def test_unknown_benchmark_is_a_clear_error():
    proc = _run("--only", "decide,nosuch")
    assert proc.returncode == 2
    assert "unknown benchmark(s) nosuch" in proc.stderr
    assert ", ".join(ALL) in proc.stderr
    assert "Traceback" not in proc.stderr
