"""The adaptive rule under DDP: the reference loop on two gloo ranks under torchrun.

The loop runs through tests/helpers/drive_train.py with a simulated clock (0.125 s a step, so the
sync steps are known) and a state entry whose ``state_dict`` sleeps (0.2 s, 0.2 s, then 0.6 s), so
the save cost the writing rank measures really changes during the run. Each rank reports every
decision with the decider's cost estimate; the tests check that:

- both ranks take the same decisions with the same estimate at every step;
- the adaptive rule fires exactly at the sync steps whose clock has passed the last save plus
  T = max(min_every, c / max_overhead, w), written out here, for the estimate the ranks agreed on;
- the costs ride in no collective of their own (one collective per sync step);
- after a SIGKILL of both ranks, the resumed run plans with the costs saved in the checkpoint
  and goes on with the same interval.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from saverules.distributed import sync_schedule

REPO = Path(__file__).resolve().parents[2]
DRIVER = REPO / "tests" / "helpers" / "drive_train.py"
FAST = ["--max_seq_len", "32", "--batch_size", "4", "--deterministic", "--progress", "log", "--log_interval", "50"]
DT = 0.125  # simulated seconds of training a step: 8 steps a second, a sync every 8 steps once ramped up
SLEEPS = "0.2,0.2,0.6"
POLICY = """
version = 1
final = true
[[rules]]
kind = "adaptive"
max_overhead = "10%"
min_every = "1s"
"""

pytestmark = pytest.mark.slow


def interval(cost):
    """The adaptive interval for the agreed estimate (c, w): max(min_every, c / max_overhead, w)."""
    if cost is None:
        return 1.0  # no cost yet: min_every
    c, w = cost
    return max(1.0, c / 0.1, w)


def env():
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    e["PYTHONUNBUFFERED"] = "1"
    e["OMP_NUM_THREADS"] = "1"
    return e


def command(tmp_path, *args, clock_offset=0.0, hold_at=None):
    driver = ["--step-seconds", str(DT), "--report", str(tmp_path / "report"), "--save-sleep", SLEEPS]
    if clock_offset:  # a resumed run's clock continues from the checkpoint's step
        driver += ["--clock-skew", f"0:1:{clock_offset}", "--clock-skew", f"1:1:{clock_offset}"]
    if hold_at is not None:
        driver += ["--hold-at", str(hold_at)]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            str(DRIVER), *driver, *FAST, "--rules", str(tmp_path / "p.toml"), *args]


def reports(tmp_path):
    """Each rank's report lines, and the same without the process id (to compare the ranks)."""
    rows = [[json.loads(line) for line in Path(f"{tmp_path / 'report'}.rank{r}").read_text().splitlines()]
            for r in (0, 1)]
    return rows, [[{k: v for k, v in d.items() if k != "pid"} for d in rank] for rank in rows]


def check_adaptive(rows, anchor):
    """The adaptive rule fires at exactly the sync steps whose clock reached ``anchor`` (the clock of
    the latest save) plus the interval of the estimate in force; returns the steps it fired at."""
    fired = []
    syncs = 0
    for d in rows:
        synced = d["syncs"] > syncs
        syncs = d["syncs"]
        due = synced and d["step"] * DT >= anchor + interval(d["cost"]) - 1e-9
        adaptive = [r for r in d["reasons"] if r.startswith("adaptive(")]
        assert bool(adaptive) == due, (d, anchor, interval(d["cost"]))
        if adaptive:
            fired.append(d["step"])
        if d["save"]:
            anchor = d["step"] * DT
    return fired


def checkpoints(tmp_path):
    root = tmp_path / "out" / "checkpoints"
    return {json.loads((d / "manifest.json").read_text())["step"]: json.loads((d / "manifest.json").read_text())
            for d in root.iterdir() if (d / "manifest.json").is_file()}


def test_ddp_ranks_agree_follow_the_formula_and_resume_the_interval_after_sigkill(tmp_path):
    (tmp_path / "p.toml").write_text(POLICY)
    hold = 104
    proc = subprocess.Popen(command(tmp_path, "--max_steps", "168", hold_at=hold), cwd=tmp_path, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                rows, _ = reports(tmp_path)
            except (OSError, json.JSONDecodeError):
                rows = [[], []]
            if all(rank and rank[-1]["step"] == hold for rank in rows):
                pids = [rank[-1]["pid"] for rank in rows]
                break
            time.sleep(0.2)
        assert pids, f"the run did not reach step {hold}: {proc.poll()}"
        for pid in pids:  # the crash: both workers die at once, nothing more is saved
            os.kill(pid, signal.SIGKILL)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher's own session
        except ProcessLookupError:
            pass
        output = proc.communicate(timeout=60)[0]
    rows, same = reports(tmp_path)
    assert same[0] == same[1], output  # decisions, reasons, syncs, collectives and the cost estimate
    r0 = rows[0]
    assert [d["step"] for d in r0] == list(range(1, hold + 1))
    # the costs need no collective of their own: one per sync step, the documented schedule
    schedule = [s for s in sync_schedule(168, DT) if s <= hold]
    assert r0[-1]["collectives"] == r0[-1]["syncs"] == len(schedule)
    fired = check_adaptive(r0, anchor=DT)  # the clock starts at the first decision
    assert len(fired) >= 3, fired
    # the estimate is rank 0's measured cost, which the sleeping state_dict raised mid-run
    estimates = [d["cost"] for d in r0 if d["cost"] is not None]
    assert estimates[0][0] >= 0.2 and estimates[-1][0] >= (0.2 + 0.2 + 0.6) / 3
    assert interval(estimates[-1]) > interval(estimates[0]) + 0.5

    saved = checkpoints(tmp_path)
    k = max(saved)
    assert sorted(saved) == [d["step"] for d in r0 if d["save"]]
    at_k = next(d for d in r0 if d["step"] == k)

    (tmp_path / "report.rank0").unlink()
    (tmp_path / "report.rank1").unlink()
    resumed = subprocess.run(command(tmp_path, "--max_steps", "168", "--resume", clock_offset=k * DT), cwd=tmp_path,
                             env=env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resumed from step {k}" in resumed.stdout
    rows, same = reports(tmp_path)
    assert same[0] == same[1]
    r0 = rows[0]
    assert r0[0]["step"] == k + 1 and r0[-1]["step"] == 168
    # the costs came back with the checkpoint: the same estimate, so the same interval as before the kill
    assert r0[0]["cost"] == at_k["cost"] and interval(r0[0]["cost"]) > 1.0
    fired_after = check_adaptive(r0, anchor=k * DT)
    assert fired_after, "no adaptive save after the resume"
    first = fired_after[0]
    syncs_after = sync_schedule(168, DT, start_step=k)
    assert all(d["cost"] == at_k["cost"] for d in r0 if d["step"] <= first)  # no save, no new cost, until then
    assert first == next(s for s in syncs_after if s * DT >= k * DT + interval(at_k["cost"]) - 1e-9)
    assert r0[-1]["collectives"] == len(syncs_after)


def test_dcp_ranks_agree_and_follow_the_formula(tmp_path):
    (tmp_path / "p.toml").write_text(POLICY)
    proc = subprocess.run(command(tmp_path, "--fsdp", "--max_steps", "96"), cwd=tmp_path, env=env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows, same = reports(tmp_path)
    assert same[0] == same[1]
    r0 = rows[0]
    fired = check_adaptive(r0, anchor=DT)
    assert len(fired) >= 2, fired
    assert r0[-1]["collectives"] == r0[-1]["syncs"] == len(sync_schedule(96, DT))
    estimates = [d["cost"] for d in r0 if d["cost"] is not None]
    assert estimates[0][0] >= 0.2
    saved = checkpoints(tmp_path)
    assert sorted(saved) == [d["step"] for d in r0 if d["save"]]
    assert all(m["world_size"] == 2 for m in saved.values())
    assert {m["storage_format"] for m in saved.values()} == {"dcp"}
