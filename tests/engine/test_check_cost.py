"""check's cost and disk report, the adaptive rule's and the cost keys' validation."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import saverules
from saverules import check
from saverules.distributed import SyncedDecider

REPO = Path(__file__).resolve().parents[2]


def main(capsys, *args):
    code = check.main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def write(tmp_path, text):
    path = tmp_path / "policy.toml"
    path.write_text(text)
    return path


def test_adaptive_toml_prints_the_schedule_with_the_cost_report():
    proc = subprocess.run([sys.executable, "-m", "saverules.check", "rules/adaptive.toml", "--strict"],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "adaptive(max_overhead=2%, mtbf=4h, max_every=1h, interval=16m40s)" in out
    assert "saving   45 saves x 20s = 15m, 2.08% of the run's training time" in out
    assert "rework   8m18s of training lost per failure" in out
    assert "failures 3 expected failures (mtbf 4h00m, 5m to restart)" in out
    assert "this policy wastes 7.63% (54m55s); saving every 12m26s would waste 7.35%" in out
    # keep_last = 2: the third checkpoint is written before retention prunes (issue 16, item 15)
    assert ("disk     at most 24GB at once (with the checkpoint being written before retention prunes), "
            "360GB written in all (8GB a checkpoint)") in out
    assert "warning" not in out


def test_json_carries_the_report_and_the_inputs(capsys):
    code, out, _ = main(capsys, "rules/adaptive.toml", "--format", "json", "--checkpoint-size", "1GiB")
    assert code == 0
    (doc,) = json.loads(out)["files"]
    cost = doc["cost"]
    assert cost["saves"] == len(doc["saves"]) == 45
    assert cost["saving_seconds"] == 900.0 and cost["failures"] == 3.0
    assert cost["checkpoint_bytes"] == 1024**3 and cost["peak_bytes"] == 3 * 1024**3  # 2 kept + 1 written
    assert doc["run"]["save_seconds"] == 20.0 and doc["run"]["mtbf"] == 14400.0
    assert abs(cost["rework_seconds"] - 19_137_992 * 1.5 / 57_600) < 1e-9


def test_an_adaptive_rule_without_a_cost_is_listed_not_simulated(capsys, tmp_path):
    path = write(tmp_path, 'version = 1\n[run]\ntotal_steps = 100\nstep_seconds = 60\n'
                           '[[rules]]\nkind = "adaptive"\nmax_overhead = "5%"\n')
    code, out, _ = main(capsys, path, "--strict")
    assert code == 0
    assert "depends on the measured save cost, not simulated: give --save-seconds" in out
    assert "saves    1" in out  # the final step only
    code, out, _ = main(capsys, path, "--save-seconds", "30", "--strict")
    assert code == 0 and "interval=10m" in out  # 30 s / 5%
    assert "saving   " in out and "rework   " in out and "waste" not in out


def test_costly_saving_and_a_wasteful_policy_warn_at_the_run_keys(capsys, tmp_path):
    path = write(tmp_path, 'version = 1\n[run]\ntotal_steps = 1000\nstep_seconds = 1\n'
                           'save_seconds = 5\nmtbf = "10h"\n[[rules]]\nkind = "every_steps"\nevery = 20\n')
    code, out, _ = main(capsys, path)
    assert code == 0
    assert f"{path}:5:1: warning: saving takes 25.0% of the run's training time (more than 10%)" in out
    assert f"{path}:6:1: warning: this policy wastes" in out and "more than twice" in out
    code, out, _ = main(capsys, path, "--strict")
    assert code == 1


def test_cost_flags_are_checked(capsys, tmp_path):
    for flag, value in (("--mtbf", "6"), ("--checkpoint-size", "2XB"), ("--save-seconds", "0"),
                        ("--restart-seconds", "-1"), ("--checkpoint-size", "0GB")):
        with pytest.raises(SystemExit) as exc:
            check.main(["rules/adaptive.toml", flag, value])
        assert exc.value.code == 2
        assert "error" in capsys.readouterr().err


def test_write_seconds_below_the_stall_is_an_error(capsys, tmp_path):
    path = write(tmp_path, 'version = 1\n[run]\ntotal_steps = 10\nsave_seconds = 5\n')
    code, out, _ = main(capsys, path, "--write-seconds", "2")
    assert code == 1 and "write_seconds (2) must be at least save_seconds (5)" in out
    with pytest.raises(saverules.PolicyError) as exc:
        saverules.loads("version = 1\n[run]\nsave_seconds = 5\nwrite_seconds = 2\n", source="p.toml")
    assert str(exc.value).startswith("p.toml:4:1: error: run.write_seconds: write_seconds (2)")


@pytest.mark.parametrize("body, where, message", [
    ('max_overhead = "0%"', (4, 1), "more than 0%"),
    ('max_overhead = "100%"', (4, 1), "less than 100%"),
    ("max_overhead = 0.02", (4, 1), 'write "2%"'),
    ('mtbf = "6"', (4, 1), "a duration needs a unit"),
    ('min_every = "1m"', (2, 1), "needs max_overhead"),
    ('mtbf = "6h"\nmin_every = "10m"\nmax_every = "5m"', (6, 1), "max_every (5m) must be at least min_every (10m)"),
    ('mtbf = "6h"\nmax_every = "30s"', (5, 1), 'at least min_every (default "1m")'),
])
def test_adaptive_rules_are_validated_at_load_with_located_errors(body, where, message):
    text = f'version = 1\n[[rules]]\nkind = "adaptive"\n{body}\n'
    with pytest.raises(saverules.PolicyError) as exc:
        saverules.loads(text, source="p.toml")
    (d,) = exc.value.diagnostics
    assert (d.line, d.col) == where and message in d.message, d


@pytest.mark.parametrize("text, count", [
    ("2GB", 2 * 10**9), ("512MiB", 512 * 2**20), ("1.5KB", 1500), ("3B", 3), ("1TiB", 2**40), ("0.5TB", 5 * 10**11),
])
def test_checkpoint_size_units(text, count):
    policy = saverules.loads(f'version = 1\n[run]\ncheckpoint_size = "{text}"\n')
    assert policy.run.checkpoint_size.bytes == count


@pytest.mark.parametrize("value, message", [(2000, "a size needs a unit"), ('"2 G"', "units B, KB")])
def test_checkpoint_size_needs_a_unit(value, message):
    with pytest.raises(saverules.PolicyError) as exc:
        saverules.loads(f"version = 1\n[run]\ncheckpoint_size = {value}\n", source="p.toml")
    assert str(exc.value).startswith("p.toml:3:1: error: run.checkpoint_size:") and message in str(exc.value)


def test_note_cost_refuses_what_is_not_a_duration():
    decider = saverules.loads('version = 1\n[[rules]]\nkind = "adaptive"\nmtbf = "1h"\n').compile()
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="stall_seconds must be a finite number of seconds >= 0"):
            decider.note_cost(bad)
    with pytest.raises(TypeError, match="write_seconds must be a number"):
        decider.note_cost(1.0, "slow")
    assert decider.save_cost is None
    decider.note_cost(2.0)
    assert decider.save_cost == (2.0, 2.0)


def test_adaptive_rules_are_taken_under_ddp_where_rank_0s_cost_rides_in_the_syncs():
    policy = saverules.loads('version = 1\n[[rules]]\nkind = "adaptive"\nmtbf = "1h"\n')
    synced = SyncedDecider(policy.compile(), rank=0, world_size=2)  # no longer refused (issue 19)
    assert not synced.deterministic  # a clock rule: the ranks agree at sync steps, where the costs ride
    SyncedDecider(policy.compile(), rank=0, world_size=1)  # one process: nothing to agree on


def test_the_trainer_callbacks_decider_takes_adaptive_rules_and_plans_from_the_reported_cost():
    from saverules.store.parts import make_decider

    policy = saverules.loads('version = 1\n[[rules]]\nkind = "adaptive"\nmax_overhead = "2%"\n')
    decider = make_decider(policy, 100, 1, {"sync_seconds": 1.0, "metrics_synced": False})
    assert decider(saverules.Progress(1, time=0.0)).save is False
    decider.note_cost(2.0)
    assert decider.next_time == 100.0  # 2 s / 2%
    plain = saverules.loads('version = 1\n[[rules]]\nkind = "every_time"\nevery = "1h"\n')
    assert make_decider(plain, 100, 1, None)(saverules.Progress(1, time=0.0)).save is False


def test_a_run_with_more_saves_than_are_listed_gets_no_cost_report_and_says_so(capsys, tmp_path):
    # 30,000 saves of a 60,000-step run: the listing stops at the 10,000th, so the gaps and
    # the disk use of the rest are not known and no part-run report is given
    path = write(tmp_path, 'version = 1\n[run]\ntotal_steps = 60000\nstep_seconds = 1\nsave_seconds = 0.5\n'
                           'mtbf = "6h"\ncheckpoint_size = "1GB"\n[[rules]]\nkind = "every_steps"\nevery = 2\n')
    code, out, _ = main(capsys, path, "--format", "json")
    (doc,) = json.loads(out)["files"]
    assert code == 0 and doc["complete"] is False and doc["save_count"] == 30_000
    assert "cost" not in doc
    (note,) = [n["message"] for n in doc["notes"] if "cost and disk report" in n["message"]]
    assert "30,000 saves" in note and "10,000" in note
    code, out, _ = main(capsys, path)
    assert "  saving " not in out and "  rework " not in out and "  disk " not in out
    assert "note: no cost and disk report: it needs every save of the run" in out
    # the same policy over a run whose saves are all listed has the report
    code, out, _ = main(capsys, path, "--total-steps", "20000", "--format", "json")
    (doc,) = json.loads(out)["files"]
    assert doc["complete"] is True and doc["cost"]["saves"] == 10_000


def test_saves_beyond_the_listing_of_an_adaptive_rule_are_not_counted(tmp_path):
    # a 1 s interval (min_every) on a 1 s step: a save at every step
    policy = saverules.loads('version = 1\n[[rules]]\nkind = "adaptive"\nmax_overhead = "50%"\nmin_every = "1s"\n')
    sim = policy.simulate(30_000, None, 1.0, None, 100, save_seconds=0.25)
    assert not sim.complete and len(sim.saves) == 100
    assert sim.save_count is None and sim.fired_total is None  # unknown, never a guess
    full = policy.simulate(30_000, None, 1.0, None, None, save_seconds=0.25)
    assert full.complete and full.save_count == 29_999 == len(full.saves)  # from step 2: the clock starts at step 1
    assert full.saves[:100] == sim.saves
