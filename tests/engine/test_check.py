"""The checker: python -m saverules.check, its output, warnings and exit codes; the JSON Schema."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import tomllib

from saverules import check, schema

REPO = Path(__file__).resolve().parents[2]
RULES = sorted((REPO / "rules").glob("*.toml"))


def run_check(*args, cwd=REPO):
    proc = subprocess.run([sys.executable, "-m", "saverules.check", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=60)
    assert "Traceback" not in proc.stdout + proc.stderr
    return proc


def main(capsys, *args):
    code = check.main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def write(tmp_path, text, name="policy.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_default_policy_prints_the_schedule():
    proc = run_check("rules/default.toml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "rules/default.toml: valid" in out
    assert re.search(r"\n +40,000 +4h26m40s +final, every_steps\(every=5%\), epoch_end, tail\(interval=5%\)\n", out)
    assert "kept     10,000, 20,000, 30,000, 39,997, 39,999, 40,000" in out
    assert "max gap  2,000 steps" in out
    assert "timeline 0 [" in out
    assert "on_signal" in out and "fires on events, not simulated" in out
    assert "warning" not in out


@pytest.mark.parametrize("path", [p for p in RULES if p.name != "minimind-legacy.toml"], ids=lambda p: p.name)
def test_shipped_policies_pass_strict(path):
    proc = run_check(path, "--strict")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "warning" not in proc.stdout


def test_legacy_policy_shows_the_lost_tail_and_fails_strict():
    proc = run_check("rules/minimind-legacy.toml", "--strict")
    assert proc.returncode == 1
    assert ("rules/minimind-legacy.toml:11:1: warning: final = false turns off the guarantee that the last step is "
            "saved: in this run steps 20,001-39,998 (19,998 steps") in proc.stdout
    assert run_check("rules/minimind-legacy.toml").returncode == 0  # warnings alone do not fail without --strict


def test_flags_override_the_run_table(capsys):
    code, out, _ = main(capsys, REPO / "rules/minimind-legacy.toml", "--total-steps", "39998", "--format", "json")
    doc = json.loads(out)["files"][0]
    assert [s["step"] for s in doc["saves"]] == [20000]
    code, out, _ = main(capsys, REPO / "rules/default.toml", "--total-steps", "1000", "--steps-per-epoch", "300",
                        "--step-seconds", "2", "--format", "json")
    assert code == 0
    doc = json.loads(out)["files"][0]
    steps = [s["step"] for s in doc["saves"]]
    assert doc["run"] == {"total_steps": 1000, "steps_per_epoch": 300, "step_seconds": 2.0, "from": "flags"}
    assert {300, 600, 900} <= set(steps)                 # epoch ends
    assert doc["saves"][-1]["reasons"] == ["final", "every_steps(every=5%)", "tail(interval=5%)"]  # 1000 ends no epoch
    assert set(range(50, 951, 50)) <= set(steps)          # 5% of 1000
    assert doc["saves"][-1]["time"] == 2000.0
    assert doc["max_gap_steps"] == max(b - a for a, b in zip([0] + steps, steps))


def test_syntax_error_is_reported_with_file_line_col(tmp_path):
    path = write(tmp_path, 'version = 1\n[[rules]]\nkind = "every_steps"\nevery = = 3\n')
    proc = run_check(path)
    assert proc.returncode == 1
    assert proc.stdout.startswith(f"{path}:4:")
    assert ": error: TOML syntax" in proc.stdout


def test_validation_error_points_at_the_key(tmp_path):
    path = write(tmp_path, 'version = 1\n\n[[rules]]\nkind = "every_steps"\nevery = "5"\n')
    proc = run_check(path)
    assert proc.returncode == 1
    line = proc.stdout.splitlines()[0]
    assert line.startswith(f"{path}:5:1: error: rules[0].every")


def test_unknown_kind_suggests_the_closest(tmp_path):
    path = write(tmp_path, 'version = 1\n[[rules]]\nkind = "every_step"\nevery = 5\n')
    proc = run_check(path)
    assert proc.returncode == 1 and "every_steps" in proc.stdout and ":3:" in proc.stdout


def test_missing_file_is_an_error_not_a_traceback(tmp_path):
    proc = run_check(tmp_path / "nope.toml")
    assert proc.returncode == 1
    assert "nope.toml:1:1: error: cannot read the file" in proc.stdout


@pytest.mark.parametrize("args", [[], ["rules/default.toml", "--total-steps", "0"],
                                  ["rules/default.toml", "--step-seconds", "nan"],
                                  ["rules/default.toml", "--format", "yaml"], ["rules/default.toml", "--bogus"]])
def test_bad_usage_exits_2(args):
    proc = run_check(*args)
    assert proc.returncode == 2
    assert "error" in proc.stderr


def test_rule_that_never_fires_is_a_warning_with_its_line(tmp_path, capsys):
    path = write(tmp_path, 'version = 1\n[run]\ntotal_steps = 100\n\n[[rules]]\nkind = "at_steps"\nsteps = [500]\n')
    code, out, _ = main(capsys, path)
    assert code == 0
    assert f"{path}:5:1: warning: rules[0] at_steps(steps=[500]) never fires in this run of 100 steps" in out
    assert main(capsys, path, "--strict")[0] == 1


def test_interval_longer_than_the_run_is_a_warning(tmp_path, capsys):
    path = write(tmp_path, 'version = 1\n[run]\ntotal_steps = 1000\nstep_seconds = 1.0\n'
                           '[[rules]]\nkind = "every_steps"\nevery = 5000\n'
                           '[[rules]]\nkind = "every_time"\nevery = "2h"\n')
    code, out, _ = main(capsys, path, "--format", "json")
    doc = json.loads(out)["files"][0]
    messages = [(w["line"], w["message"]) for w in doc["warnings"]]
    assert (7, "rules[0] interval 5,000 steps is longer than the run (1,000 steps): it never fires") in messages
    assert any(line == 10 and "interval 2h is longer than the run" in m for line, m in messages)
    assert [s["step"] for s in doc["saves"]] == [1000]      # only the final guarantee saves
    assert doc["saves"][0]["reasons"] == ["final"]


def test_shares_without_a_total_are_a_warning_and_not_simulated(tmp_path, capsys):
    path = write(tmp_path, 'version = 1\n[[rules]]\nkind = "every_steps"\nevery = "10%"\n')
    code, out, _ = main(capsys, path)
    assert code == 0
    assert f"{path}:4:1: warning: rules[0] uses a share of the run, but no total_steps is known" in out
    assert "not simulated: no run length" in out
    code, out, _ = main(capsys, path, "--total-steps", "50")
    assert code == 0 and "warning" not in out
    assert re.search(r"\n +50 +final, every_steps\(every=10%\)\n", out)
    assert re.search(r"\n +5 +every_steps\(every=10%\)\n", out)


def test_retention_leaving_only_the_final_checkpoint_is_a_warning(tmp_path, capsys):
    path = write(tmp_path, 'version = 1\n[run]\ntotal_steps = 100\n[[rules]]\nkind = "every_steps"\nevery = 10\n'
                           '\n[retention]\nkeep_last = 1\n')
    code, out, _ = main(capsys, path)
    assert f"{path}:8:1: warning: retention leaves only the final checkpoint" in out
    path.write_text(path.read_text().replace("keep_last = 1", "keep_last = 2"))
    assert "warning" not in main(capsys, path)[1]


def test_event_driven_rules_are_listed_not_warned(tmp_path, capsys):
    path = write(tmp_path, 'version = 1\n[run]\ntotal_steps = 100\n'
                           '[[rules]]\nkind = "improved"\nmetric = "loss"\n'
                           '[[rules]]\nkind = "any"\nrules = [{ kind = "on_signal" }, { kind = "at_steps", steps = [1000] }]\n'
                           '[[rules]]\nkind = "every_time"\nevery = "1h"\n')
    code, out, _ = main(capsys, path, "--strict")
    assert code == 0, out
    assert "rules[0] improved(metric=\"loss\") fires on events, not simulated" in out
    assert "rules[1] any(on_signal, at_steps(steps=[1000])) fires on events, not simulated" in out
    assert "rules[2] every_time(every=1h) reads the training clock, not simulated" in out


def test_long_schedules_are_elided_with_counts_and_all_lists_them(capsys):
    code, out, _ = main(capsys, REPO / "rules/default.toml")
    assert "14 more saves (every_steps(every=5%) x11, epoch_end x1, tail(interval=5%) x3)" in out
    code, out, _ = main(capsys, REPO / "rules/default.toml", "--all")
    assert "more saves" not in out
    assert out.count("every_steps(every=5%)") == 20


def test_several_files_and_one_bad_one(tmp_path, capsys):
    bad = write(tmp_path, "version = 2\n")
    code, out, _ = main(capsys, REPO / "rules/default.toml", bad, "--format", "json")
    doc = json.loads(out)
    assert code == 1 and doc["ok"] is False
    assert [f["valid"] for f in doc["files"]] == [True, False]
    assert doc["files"][1]["errors"][0]["line"] == 1
    assert "version" in doc["files"][1]["errors"][0]["message"]


def test_timeline_marks_every_save():
    sim = __import__("saverules").loads("version = 1\n[[rules]]\nkind = \"every_steps\"\nevery = 25\n").simulate(100)
    assert check._timeline(sim, width=4) == "||||"
    assert check._timeline(sim, width=8) == ".|.|.|.|"
    assert check._timeline(sim, width=200) == "".join("|" if s % 25 == 0 else "." for s in range(1, 101))


def test_import_saverules_and_check_do_not_import_torch():
    code = "import sys, saverules, saverules.check, saverules.schema; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


# -- JSON Schema ------------------------------------------------------------------------------------


def test_schema_file_is_up_to_date():
    assert (REPO / "rules" / "schema.json").read_text() == schema.render(), (
        "rules/schema.json is stale: python -m saverules.schema > rules/schema.json")


@pytest.mark.parametrize("path", RULES, ids=lambda p: p.name)
def test_shipped_policies_satisfy_the_schema(path):
    jsonschema.validate(tomllib.loads(path.read_text()), schema.policy_schema())
    assert path.read_text().startswith("#:schema ./schema.json")


@pytest.mark.parametrize("text", [
    'version = 1\n[[rules]]\nkind = "every_steps"\nevery = 0\n',
    'version = 1\n[[rules]]\nkind = "evry_steps"\nevery = 5\n',
    'version = 1\n[[rules]]\nkind = "every_time"\nevery = 30\n',
    'version = 1\n[[rules]]\nkind = "every_steps"\nevery = 5\ncolour = "red"\n',
    'final = true\n',
])
def test_schema_rejects_what_the_loader_rejects(text):
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(tomllib.loads(text), schema.policy_schema())
    with pytest.raises(__import__("saverules").PolicyError):
        __import__("saverules").loads(text)


def test_schema_command_prints_json():
    proc = subprocess.run([sys.executable, "-m", "saverules.schema"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    assert json.loads(proc.stdout)["properties"]["version"] == {"const": 1, "title": "Version"}


# -- check always answers -----------------------------------------------------------------

MAX_STEPS = (1 << 63) - 1


def test_total_steps_beyond_2_63_minus_1_is_an_argument_error():
    for value in ("99999999999999999999999", str(MAX_STEPS + 1), "9" * 5000):
        proc = run_check("rules/default.toml", "--total-steps", value)
        assert proc.returncode == 2
        assert "argument --total-steps: must be at most 9,223,372,036,854,775,807 (2^63-1)" in proc.stderr


def test_run_total_beyond_2_63_minus_1_is_an_error_at_the_key(tmp_path):
    path = write(tmp_path, f'version = 1\n[run]\ntotal_steps = {MAX_STEPS + 1}\n[[rules]]\nkind = "final"\n')
    proc = run_check(path)
    assert proc.returncode == 1
    assert f"{path}:3:1: error: run.total_steps: must be at most 9,223,372,036,854,775,807 (2^63-1)" in proc.stdout


def test_the_longest_run_of_the_default_policy_is_counted_exactly(capsys):
    code, out, _ = main(capsys, REPO / "rules/default.toml", "--total-steps", MAX_STEPS, "--format", "json")
    assert code == 0
    doc = json.loads(out)["files"][0]
    assert doc["complete"] is False and len(doc["saves"]) == 10_000
    fired = doc["fired_total"]
    assert fired["epoch_end"] == MAX_STEPS // 20_000 and fired["final"] == 1
    assert fired["every_steps(every=5%)"] == 19  # 5% rounds up: the 20th multiple is past the last step
    assert doc["last_saves"][-1] == {"step": MAX_STEPS, "time": MAX_STEPS * 0.4,
                                     "reasons": ["final", "tail(interval=5%)"]}
    # every save counted once: epoch ends, every_steps and the tail never coincide here
    assert doc["save_count"] == sum(fired.values()) - 1  # final and the last tail save are one save
    code, text, _ = main(capsys, REPO / "rules/default.toml", "--total-steps", MAX_STEPS)
    assert f"saves    {doc['save_count']:,}: counted; the first 10,000 are listed (to step 200,019,999)" in text
    assert "not listed (a simulation lists at most 10,000)" in text
    assert "in steps 1-200,019,999 (not known beyond)" in text


def test_a_billion_billion_one_step_epochs_are_counted(tmp_path, capsys):
    path = write(tmp_path, 'version = 1\n[run]\ntotal_steps = 1_000_000_000_000_000_000\nsteps_per_epoch = 1\n'
                           '[[rules]]\nkind = "epoch_end"\n')
    code, out, _ = main(capsys, path, "--format", "json")
    doc = json.loads(out)["files"][0]
    assert code == 0 and doc["save_count"] == 10**18
    assert doc["fired_total"] == {"epoch_end": 10**18, "final": 1}
    assert [s["step"] for s in doc["saves"]] == list(range(1, 10_001))
    assert doc["timeline"].startswith("#~") and set(doc["timeline"][1:]) == {"~"}


def test_saves_that_cannot_be_counted_are_said_to_be_unknown(tmp_path, capsys):
    # every_time fires by the clock since the last save, whatever else saves: only
    # simulating each save says where the next one is
    path = write(tmp_path, 'version = 1\n[run]\ntotal_steps = 100_000_000\nstep_seconds = 1.0\n'
                           '[[rules]]\nkind = "every_time"\nevery = "10s"\n[[rules]]\nkind = "every_steps"\nevery = 13\n')
    code, out, _ = main(capsys, path)
    assert code == 0
    assert "saves    more than 10,000: the first 10,000 are listed" in out
    assert "the rest cannot be counted for this policy without simulating each" in out
    assert "never fires" not in out  # unknown is not "never"
    code, out, _ = main(capsys, path, "--format", "json")
    doc = json.loads(out)["files"][0]
    assert doc["save_count"] is None and doc["fired_total"] is None and doc["complete"] is False


def test_ten_thousand_rules_are_checked(tmp_path):
    sys.path.insert(0, str(REPO))
    from benchmarks.bench_check import mixed_rules

    path = write(tmp_path, mixed_rules(10_000))
    proc = run_check(path, "--format", "json")
    doc = json.loads(proc.stdout)["files"][0]
    assert proc.returncode == 0 and doc["valid"] and len(doc["saves"]) == 10_000 and not doc["complete"]


def test_check_stays_within_half_a_gibibyte_of_address_space(tmp_path):
    """The inputs at the limits run under RLIMIT_AS: a run that tried to hold every save,
    or a file read whole, would fail with MemoryError."""
    sys.path.insert(0, str(REPO))
    from benchmarks.bench_check import at_the_size_limit, mixed_rules, one_epoch_rule

    files = [write(tmp_path, mixed_rules(10_000), "many.toml"), write(tmp_path, one_epoch_rule(10**18), "ep.toml"),
             write(tmp_path, at_the_size_limit(), "big.toml")]
    huge = tmp_path / "huge.toml"
    with open(huge, "wb") as f:
        f.truncate(4 << 30)  # 4 GiB of zeros, sparse: never read whole
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (512 << 20, 512 << 20)); "
            "from saverules.check import main; sys.exit(main(sys.argv[1:]))")
    for args in ([*files], ["rules/default.toml", "--total-steps", str(MAX_STEPS)], [str(huge)]):
        proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                              cwd=REPO, timeout=120)
        assert "MemoryError" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert proc.returncode == (1 if args == [str(huge)] else 0), proc.stdout[-2000:]
    assert "the limit is 1,048,576 bytes (1 MiB)" in proc.stdout


def test_one_step_run_reads_right(capsys):
    code, out, _ = main(capsys, REPO / "rules/default.toml", "--total-steps", "1")
    assert "  run      1 step, less than one epoch of 20,000 (no epoch ends), 0.4 s/step" in out
    assert "  max gap  1 step (0.4s of training)" in out
    assert "1 steps" not in out and "1 epoch of" not in out
    assert "every epoch, but 0 epochs end in this run" in out
    code, out, _ = main(capsys, REPO / "rules/default.toml", "--total-steps", "50000")
    assert "50,000 steps, 2 epochs of 20,000 and 10,000 steps of one that does not end" in out


def test_epoch_end_without_an_epoch_length_is_not_simulated(tmp_path, capsys):
    path = write(tmp_path, 'version = 1\nfinal = false\n[run]\ntotal_steps = 1\n[[rules]]\nkind = "epoch_end"\n')
    code, out, _ = main(capsys, path, "--format", "json")
    doc = json.loads(out)["files"][0]
    assert doc["saves"] == []  # no epoch ended in a 1-step run without steps_per_epoch
    (note,) = doc["notes"]
    assert note["message"] == ("rules[0] epoch_end fires on events, not simulated: epoch ends are simulated only "
                               "with --steps-per-epoch or [run] steps_per_epoch")
    assert not any("never fires" in w["message"] for w in doc["warnings"])
    code, out, _ = main(capsys, path, "--steps-per-epoch", "1", "--format", "json")
    assert [s["step"] for s in json.loads(out)["files"][0]["saves"]] == [1]


def test_a_run_that_stops_mid_epoch_ends_no_epoch_at_its_last_step(tmp_path, capsys):
    path = write(tmp_path, 'version = 1\nfinal = false\n[run]\ntotal_steps = 350\nsteps_per_epoch = 100\n'
                           '[[rules]]\nkind = "epoch_end"\n')
    code, out, _ = main(capsys, path, "--format", "json")
    doc = json.loads(out)["files"][0]
    assert [s["step"] for s in doc["saves"]] == [100, 200, 300]
    assert any("steps 301-350 (50 steps)" in w["message"] for w in doc["warnings"])


def test_bom_and_kind_errors_through_the_command(tmp_path, capsys):
    bom = tmp_path / "bom.toml"
    bom.write_bytes(b'\xef\xbb\xbfversion = 1\n[[rules]]\nkind = "every_steps"\nevery = 10\n')
    code, out, _ = main(capsys, bom, "--total-steps", "20")
    assert code == 0 and "valid, 1 rule" in out
    path = write(tmp_path, "version = 1\n[[rules]]\nkind = 5\n")
    code, out, _ = main(capsys, path)
    assert code == 1
    assert f"{path}:3:1: error: rules[0].kind: kind must be a string, got an integer 5; write kind = \"...\"" in out
    assert "unknown rule kind '5'" not in out
