"""`python -m saverules.convert`: every documented mapping, every refusal, ast-only parsing."""
from __future__ import annotations

import json
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from convert_common import converted, run_convert

import saverules
from saverules.importers import hf, lightning, torchtitan
from saverules.importers.draft import Refused
from saverules.importers.pickled import NotTrainingArgs, read_training_args

REPO = Path(__file__).resolve().parents[2]


def hf_json(tmp_path: Path, **fields) -> str:
    base = {"save_strategy": "steps", "save_steps": 500, "save_total_limit": None, "max_steps": -1,
            "num_train_epochs": 3.0, "save_on_each_node": False, "load_best_model_at_end": False,
            "metric_for_best_model": None, "greater_is_better": None}
    base.update(fields)
    path = tmp_path / "args.json"
    path.write_text(json.dumps(base))
    return str(path)


def rules(policy: saverules.Policy) -> list[dict]:
    return [r.model_dump(exclude_none=True, mode="json") for r in policy.rules]


# -- Hugging Face -------------------------------------------------------------------------------


def test_hf_steps_limit_and_max_steps(tmp_path):
    policy = converted(tmp_path, "--from-hf", hf_json(tmp_path, save_steps=40, save_total_limit=3, max_steps=130))
    assert rules(policy) == [{"kind": "every_steps", "every": 40}]
    assert policy.final and policy.run.total_steps == 130
    assert policy.retention.keep_last == 3 and policy.retention.keep_best is None
    assert policy.simulate(130).saved_steps == [40, 80, 120, 130]


def test_hf_save_steps_share_resolves_as_the_trainer_does(tmp_path):
    # 100 * 0.07 is 7.000000000000001 in floating point: the Trainer saves every 8 steps, not 7
    policy = converted(tmp_path, "--from-hf", hf_json(tmp_path, save_steps=0.07, max_steps=100))
    assert rules(policy) == [{"kind": "every_steps", "every": 8}]
    rc, text, _, _ = run_convert(tmp_path, "--from-hf", hf_json(tmp_path, save_steps=0.25, max_steps=100))
    assert rc == 0 and "every = 25" in text and "ceil(100 x 0.25) = 25" in text


def test_hf_share_of_epochs_uses_steps_per_epoch(tmp_path):
    policy = converted(tmp_path, "--from-hf", hf_json(tmp_path, save_steps=0.5, num_train_epochs=2.5),
                       "--steps-per-epoch", "40")
    assert policy.run.total_steps == 100 and rules(policy) == [{"kind": "every_steps", "every": 50}]


def test_hf_epoch_and_no_strategies(tmp_path):
    policy = converted(tmp_path, "--from-hf", hf_json(tmp_path, save_strategy="epoch", max_steps=100),
                       "--steps-per-epoch", "30")
    assert rules(policy) == [{"kind": "epoch_end", "every": 1}]
    assert policy.simulate(100, 30).saved_steps == [30, 60, 90, 100]
    rc, text, report, _ = run_convert(tmp_path, "--from-hf", hf_json(tmp_path, save_strategy="no", max_steps=100))
    assert rc == 0 and "[[rules]]" not in text and "saves nothing" in text
    assert "step 100 (final): saved by the policy, not by TrainingArguments" in report


@pytest.mark.parametrize("metric,greater,name,mode", [
    (None, None, "eval_loss", "min"), ("accuracy", None, "eval_accuracy", "max"),
    ("eval_loss", True, "eval_loss", "max"), ("bleu", False, "eval_bleu", "min"),
])
def test_hf_best_metric_and_direction(tmp_path, metric, greater, name, mode):
    policy = converted(tmp_path, "--from-hf", hf_json(
        tmp_path, save_steps=10, max_steps=50, save_total_limit=2, load_best_model_at_end=True,
        metric_for_best_model=metric, greater_is_better=greater))
    assert policy.retention.keep_best.metric == name and policy.retention.keep_best.mode == mode
    assert policy.retention.keep_best.n == 1 and policy.retention.keep_last == 2
    best = converted(tmp_path, "--from-hf", hf_json(tmp_path, save_strategy="best", max_steps=50,
                                                    metric_for_best_model=metric, greater_is_better=greater))
    assert rules(best) == [{"kind": "improved", "metric": name, "mode": mode, "min_delta": 0.0, "top": 1}]


def test_hf_limit_one_keeps_two_and_says_why(tmp_path):
    rc, text, report, _ = run_convert(tmp_path, "--from-hf", hf_json(tmp_path, save_steps=40, save_total_limit=1,
                                                                      max_steps=130))
    assert rc == 0 and "keep_last = 2" in text and "save_total_limit = 1 keeps 1 checkpoint" in text
    assert "kept at the end: TrainingArguments 130; the policy 120, 130" in report


def test_hf_interval_longer_than_the_run_is_left_out(tmp_path):
    policy = converted(tmp_path, "--from-hf", hf_json(tmp_path, save_steps=500, max_steps=130))
    assert policy.rules == () and policy.simulate(130).saved_steps == [130]


@pytest.mark.parametrize("fields,named", [
    ({"save_on_each_node": True}, "save_on_each_node"),
    ({"save_strategy": "sometimes"}, "save_strategy"),
    ({"save_steps": 0}, "save_steps"),
    ({"save_steps": 2.5}, "save_steps"),
    ({"save_total_limit": "3"}, "save_total_limit"),
    ({"greater_is_better": "yes", "load_best_model_at_end": True}, "greater_is_better"),
    ({"save_steps": 0.1}, "save_steps"),  # a share with no known run length
])
def test_hf_refusals_name_the_setting(tmp_path, fields, named):
    rc, text, _, err = run_convert(tmp_path, "--from-hf", hf_json(tmp_path, **fields))
    assert rc == 2 and text == ""
    assert f"  {named}: " in err and err.startswith("error: TrainingArguments: cannot convert")


def test_hf_refuses_both_bad_settings_at_once(tmp_path):
    rc, _, _, err = run_convert(tmp_path, "--from-hf", hf_json(tmp_path, save_on_each_node=True, save_steps=-1))
    assert rc == 2 and "cannot convert 2 settings" in err and "save_on_each_node" in err and "save_steps" in err


def test_hf_unreadable_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert run_convert(tmp_path, "--from-hf", str(bad))[0] == 2
    rc, _, _, err = run_convert(tmp_path, "--from-hf", str(tmp_path / "missing.json"))
    assert rc == 2 and "cannot read" in err and "missing.json" in err


class _Payload:
    """Pickles to a call of os.system: loading the file with pickle would run it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.marker}",))


def _torch_style_archive(path: Path, payload: bytes) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("training_args/data.pkl", payload)
        archive.writestr("training_args/version", "3\n")


def test_training_args_bin_is_read_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    # a TrainingArguments-shaped pickle whose state hides a call of os.system
    payload = pickle.dumps(_Payload(marker), protocol=2)
    # wrap: GLOBAL transformers.training_args TrainingArguments, NEWOBJ, state dict, BUILD
    state = {"save_strategy": "steps", "save_steps": 7, "max_steps": 21, "trap": "@"}
    data = pickle.dumps(state, protocol=2)
    head = b"\x80\x02ctransformers.training_args\nTrainingArguments\nq\x00)\x81q\x01"
    body = data[2:-1]  # the dict, without PROTO and STOP
    trap = payload[2:-1]
    body = body.replace(pickle.dumps("@", protocol=2)[2:-1], trap)
    blob = head + body + b"b."
    _torch_style_archive(tmp_path / "training_args.bin", blob)
    name, fields = read_training_args((tmp_path / "training_args.bin").read_bytes())
    assert name == "transformers.training_args.TrainingArguments" and fields["save_steps"] == 7
    policy = converted(tmp_path, "--from-hf", str(tmp_path / "training_args.bin"))
    assert policy.simulate(21).saved_steps == [7, 14, 21]
    assert not marker.exists()
    with pytest.raises(NotTrainingArgs, match="not of transformers' TrainingArguments"):
        read_training_args(payload)
    assert not marker.exists()


# -- Lightning ----------------------------------------------------------------------------------


def test_lightning_steps_save_last_adds_the_final_step(tmp_path):
    rc, text, report, _ = run_convert(
        tmp_path, "--from-lightning", "ModelCheckpoint(every_n_train_steps=40, save_last=True)", "--total-steps", "130")
    assert rc == 0
    assert "step 130 (final): saved by the policy, not by ModelCheckpoint" in report
    assert "ModelCheckpoint          saves   3: 40, 80, 120" in report
    policy = saverules.loads(text)
    assert rules(policy) == [{"kind": "every_steps", "every": 40}] and policy.retention.keep_last == 2


@pytest.mark.parametrize("call,expected_rules,keep_last", [
    ("ModelCheckpoint()", [{"kind": "epoch_end", "every": 1}], 2),
    ("ModelCheckpoint(every_n_epochs=3, save_top_k=-1)", [{"kind": "epoch_end", "every": 3}], None),
    ("ModelCheckpoint(every_n_train_steps=25, save_top_k=-1)", [{"kind": "every_steps", "every": 25}], None),
    ("ModelCheckpoint(every_n_train_steps=25, save_top_k=0, save_last='link')",
     [{"kind": "every_steps", "every": 25}], 2),
    ("lightning.pytorch.callbacks.ModelCheckpoint(train_time_interval=timedelta(minutes=30))",
     [{"kind": "every_time", "every": "30m"}], 2),
    ("ModelCheckpoint(train_time_interval=datetime.timedelta(hours=1, seconds=30), save_on_train_epoch_end=False)",
     [{"kind": "every_time", "every": "3630s"}], 2),
])
def test_lightning_mappings(tmp_path, call, expected_rules, keep_last):
    policy = converted(tmp_path, "--from-lightning", call, "--total-steps", "300", "--steps-per-epoch", "20")
    assert rules(policy) == expected_rules
    assert (policy.retention.keep_last if policy.retention else None) == keep_last


def test_lightning_monitor_keeps_the_best(tmp_path):
    policy = converted(tmp_path, "--from-lightning",
                       'ModelCheckpoint(every_n_train_steps=40, save_top_k=2, monitor="val_acc", mode="max", '
                       'save_last=True, dirpath="ckpt", filename="{step}")', "--total-steps", "130")
    kb = policy.retention.keep_best
    assert (kb.metric, kb.mode, kb.n) == ("val_acc", "max", 2) and policy.retention.keep_last == 2


@pytest.mark.parametrize("call,named", [
    ("ModelCheckpoint(every_n_train_steps=10, every_n_epochs=1)", "every_n_train_steps, every_n_epochs"),
    ("ModelCheckpoint(save_top_k=3)", "save_top_k"),
    ("ModelCheckpoint(save_top_k=0)", "save_top_k"),
    ("ModelCheckpoint(save_top_k=-2)", "save_top_k"),
    ("ModelCheckpoint(every_n_train_steps=0)", "every_n_train_steps / every_n_epochs"),
    ("ModelCheckpoint(every_n_train_steps=2.5)", "every_n_train_steps"),
    ('ModelCheckpoint(mode="median")', "mode"),
    ("ModelCheckpoint(save_last=2)", "save_last"),
    ("ModelCheckpoint(train_time_interval=30)", "train_time_interval"),
    ("ModelCheckpoint(train_time_interval=timedelta(30))", "train_time_interval"),
    ("ModelCheckpoint(every_n_train_step=10)", "every_n_train_step"),
    ("ModelCheckpoint('ckpt')", "positional arguments"),
    ("ModelCheckpoint(**opts)", "**kwargs"),
    ("ModelCheckpoint(every_n_train_steps=N)", "every_n_train_steps"),
    ("ModelCheckpoint(every_n_train_steps=10 +", "--from-lightning"),
    ("EarlyStopping(monitor='val_loss')", "--from-lightning"),
])
def test_lightning_refusals_name_the_argument(tmp_path, call, named):
    rc, text, _, err = run_convert(tmp_path, "--from-lightning", call)
    assert rc == 2 and text == "" and f"  {named}: " in err, err


@pytest.mark.parametrize("template", [
    '__import__("os").system("touch {m}")',
    'ModelCheckpoint(monitor=__import__("os").system("touch {m}"))',
    'ModelCheckpoint(every_n_train_steps=(lambda: __import__("os").system("touch {m}"))())',
    'ModelCheckpoint(train_time_interval=timedelta(seconds=__import__("os").system("touch {m}")))',
    'ModelCheckpoint(dirpath=f"{{__import__(\'os\').system(\'touch {m}\')}}")',
])
def test_lightning_code_is_refused_and_nothing_runs(tmp_path, template):
    marker = tmp_path / "ran"
    proc = subprocess.run([sys.executable, "-m", "saverules.convert", "--from-lightning",
                           template.format(m=marker)], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 2 and proc.stdout == "" and "cannot convert" in proc.stderr
    assert not marker.exists()


def test_lightning_parse_uses_ast_only():
    # literal values are read; names and calls are not resolved
    assert lightning.parse("ModelCheckpoint(every_n_train_steps=40, monitor='x', save_last=None)") == {
        "every_n_train_steps": 40, "monitor": "x", "save_last": None}
    with pytest.raises(Refused) as exc:
        lightning.parse("ModelCheckpoint(every_n_train_steps=int('40'))")
    assert exc.value.problems[0][0] == "every_n_train_steps"


# -- torchtitan ---------------------------------------------------------------------------------


def titan(tmp_path: Path, checkpoint: str, steps: int | None = 1000) -> str:
    path = tmp_path / "train.toml"
    path.write_text(("[training]\nsteps = %d\n" % steps if steps else "") + "[checkpoint]\n" + checkpoint)
    return str(path)


def test_torchtitan_documented_semantics(tmp_path):
    # enable_first_step_checkpoint saves step 1, interval saves its multiples, the last step is always saved,
    # keep_latest_k keeps the newest k
    policy = converted(tmp_path, "--from-torchtitan", titan(tmp_path, (
        "enable_checkpoint = true\nfolder = 'checkpoint'\ninterval = 300\nkeep_latest_k = 2\n"
        "enable_first_step_checkpoint = true\nlast_save_model_only = true\nasync_mode = 'async'\n")))
    sim = policy.simulate(policy.run.total_steps)
    assert policy.run.total_steps == 1000
    assert sim.saved_steps == [1, 300, 600, 900, 1000] and sim.kept == [900, 1000]


def test_torchtitan_defaults_and_keep_all(tmp_path):
    policy = converted(tmp_path, "--from-torchtitan", titan(tmp_path, "enable_checkpoint = true\nkeep_latest_k = 0\n",
                                                             steps=1200))
    sim = policy.simulate(1200)
    assert policy.retention is None and sim.saved_steps == [500, 1000, 1200] and sim.kept == sim.saved_steps
    rc, _, report, _ = run_convert(tmp_path, "--from-torchtitan", titan(tmp_path, "enable_checkpoint = true\n"))
    assert rc == 0 and "no differences" in report  # default interval 500, keep_latest_k 10


@pytest.mark.parametrize("checkpoint,named", [
    ("interval = 10\n", "checkpoint.enable_checkpoint"),
    ("enable_checkpoint = true\ninterval = 0\n", "checkpoint.interval"),
    ("enable_checkpoint = true\nkeep_latest_k = 1\n", "checkpoint.keep_latest_k"),
    ("enable_checkpoint = true\nkeep_latest_k = -3\n", "checkpoint.keep_latest_k"),
    ("enable_checkpoint = true\ninterval_type = 'seconds'\n", "checkpoint.interval_type"),
    ("enable_checkpoint = true\nload_only = true\n", "checkpoint.load_only"),
    ("enable_checkpoint = true\ncreate_seed_checkpoint = true\n", "checkpoint.create_seed_checkpoint"),
    ("enable_checkpoint = true\nlast_save_in_hf = true\n", "checkpoint.last_save_in_hf"),
    ("enable_checkpoint = true\nexport_dtype = 'bfloat16'\n", "checkpoint.export_dtype"),
    ("enable_checkpoint = true\nenable_first_step_checkpoint = 1\n", "checkpoint.enable_first_step_checkpoint"),
    ("enable_checkpoint = true\nintervall = 100\n", "checkpoint.intervall"),
])
def test_torchtitan_refusals_name_the_key(tmp_path, checkpoint, named):
    rc, text, _, err = run_convert(tmp_path, "--from-torchtitan", titan(tmp_path, checkpoint))
    assert rc == 2 and text == "" and f"  {named}: " in err, err


def test_torchtitan_without_a_checkpoint_table(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text("[training]\nsteps = 10\n")
    with pytest.raises(Refused, match=r"no \[checkpoint\] table"):
        torchtitan.convert(torchtitan.read(str(path)), "t.toml")


# -- the command --------------------------------------------------------------------------------


def test_policy_to_stdout_report_to_stderr(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "saverules.convert", "--from-lightning",
                           "ModelCheckpoint(every_n_train_steps=40)", "--total-steps", "130"],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 0
    assert saverules.loads(proc.stdout).simulate(130).saved_steps == [40, 80, 120, 130]
    assert "step 130 (final): saved by the policy, not by ModelCheckpoint" in proc.stderr


def test_without_a_run_length_nothing_is_compared(tmp_path):
    rc, text, report, _ = run_convert(tmp_path, "--from-lightning", "ModelCheckpoint(every_n_train_steps=40)")
    assert rc == 0 and "[run]" not in text and "not compared: the run's length is unknown" in report


def test_hf_module_reads_json_objects_only(tmp_path):
    path = tmp_path / "list.json"
    path.write_text("[1, 2]")
    with pytest.raises(Refused, match="not an object"):
        hf.read(str(path))
