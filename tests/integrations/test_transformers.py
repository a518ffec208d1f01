"""saverules.transformers.SaverulesCallback on the real Hugging Face Trainer (CPU, a tiny model)."""
from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hf_common import make_trainer, weights
from integ_procs import REPO, env, held, kill_held, result

import saverules
from saverules.integrations import manifest as fm
from saverules.integrations.manifest import ManifestWarning
from saverules.transformers import ConflictingSettingsError, SaverulesCallback, last_good_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:DeprecationWarning")

EVERY_40 = 'version = 1\n[[rules]]\nkind = "every_steps"\nevery = 40\n'


def policy(text):
    return saverules.loads(text)


def saved_dirs(out):
    return sorted(int(p.name.split("-")[1]) for p in Path(out).iterdir() if p.name.startswith("checkpoint-"))


def manifest(path):
    return json.loads((Path(path) / fm.DIR_MANIFEST).read_text())


def train(out, text, **kw):
    cb = SaverulesCallback(policy(text))
    trainer = make_trainer(out, [cb], **kw)
    trainer.train()
    return trainer, cb


# -- schedule parity with the Trainer's own saving -------------------------------------------


@pytest.mark.parametrize("own, rule, shape", [
    (dict(save_strategy="steps", save_steps=40), 'kind = "every_steps"\nevery = 40', dict(max_steps=130)),
    (dict(save_strategy="steps", save_steps=0.25), 'kind = "every_steps"\nevery = "25%"', dict(max_steps=130)),
    (dict(save_strategy="epoch"), 'kind = "epoch_end"', dict(max_steps=-1, num_train_epochs=3)),
], ids=["save_steps=40", "save_steps=0.25", "epoch"])
def test_same_steps_as_the_trainers_own_saving(tmp_path, own, rule, shape):
    make_trainer(tmp_path / "own", **own, **shape).train()
    expected = saved_dirs(tmp_path / "own")
    trainer, cb = train(tmp_path / "policy", f"version = 1\n[[rules]]\n{rule}\n", **shape)
    assert saved_dirs(tmp_path / "policy") == expected == cb.saved_steps
    assert expected[-1] == trainer.state.global_step  # the final step, 130 with max_steps=130
    if "save_steps" in own:
        assert expected == ([40, 80, 120, 130] if own["save_steps"] == 40 else [33, 66, 99, 130])
    else:
        assert expected == [8, 16, 24]  # 64 points, batches of 8: 8 steps an epoch
    for step in expected:  # every checkpoint verifies and says why it was saved
        info = fm.inspect(tmp_path / "policy" / f"checkpoint-{step}", verify=True)
        assert info.ok and info.verified and info.step == step and info.reasons


# -- retention on disk --------------------------------------------------------------------------


def test_retention_keep_last_keep_every_and_keep_best_on_an_eval_metric(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="saverules")
    text = ('version = 1\n[[rules]]\nkind = "every_steps"\nevery = 10\n'
            '[retention]\nkeep_last = 2\nkeep_every = 30\n'
            '[retention.keep_best]\nmetric = "eval_loss"\nmode = "max"\n')
    trainer, cb = train(tmp_path, text, max_steps=80, eval_steps=10)
    evals = {e["step"]: e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e}
    assert sorted(evals) == list(range(10, 81, 10))
    worst = max(evals, key=lambda s: (evals[s], -s))
    assert worst not in (70, 80, 30, 60), "the data should make keep_best keep a checkpoint nothing else keeps"
    assert saved_dirs(tmp_path) == sorted({70, 80} | {30, 60} | {worst})
    for step in saved_dirs(tmp_path):
        assert manifest(tmp_path / f"checkpoint-{step}")["metrics"]["eval_loss"] == pytest.approx(evals[step])
    removed = sorted(set(range(10, 81, 10)) - set(saved_dirs(tmp_path)))
    assert sorted(int(n.split("-")[1]) for n in cb.removed) == removed
    for step in removed:
        assert any(f"removed checkpoint-{step} " in r.getMessage() and "keep_last = 2" in r.getMessage()
                   for r in caplog.records)
    assert any(r.getMessage() == "saved step 80: final, every_steps(every=10)" for r in caplog.records)


# -- resume ---------------------------------------------------------------------------------------


def test_resume_after_sigkill_makes_the_uninterrupted_runs_saves_and_weights(tmp_path):
    pfile = tmp_path / "policy.toml"
    pfile.write_text(EVERY_40 + '[[rules]]\nkind = "every_time"\nevery = "1h"\n')
    reference, ref_cb = train(tmp_path / "ref", pfile.read_text())
    assert ref_cb.saved_steps == [40, 80, 120, 130]

    out = tmp_path / "killed"
    kill_held("hf", out, pfile, 86)  # SIGKILL at the start of step 86: step 80 is the newest save
    assert saved_dirs(out) == [40, 80]
    resume = last_good_checkpoint(out)
    assert resume == str(out / "checkpoint-80")
    state = json.loads((out / "checkpoint-80" / "trainer_state.json").read_text())
    rides = state["stateful_callbacks"]["SaverulesCallback"]["attributes"]["saverules_state"]
    assert rides["decider"]["last_save_step"] == 80 and rides["clock"] > 0

    cb = SaverulesCallback(str(pfile))
    trainer = make_trainer(out, [cb])
    trainer.train(resume_from_checkpoint=resume)
    assert cb.saved_steps == [120, 130]
    assert saved_dirs(out) == saved_dirs(tmp_path / "ref") == [40, 80, 120, 130]
    a, b = weights(out / "checkpoint-130"), weights(tmp_path / "ref" / "checkpoint-130")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the training clock continued from the saved step's reading
    assert manifest(out / "checkpoint-120")["time"] >= rides["clock"]


def test_truncated_newest_checkpoint_is_skipped_with_a_warning(tmp_path):
    _, cb = train(tmp_path, EVERY_40)
    newest = tmp_path / "checkpoint-130" / "model.safetensors"
    with open(newest, "r+b") as f:
        f.truncate(newest.stat().st_size // 2)
    unfinished = tmp_path / "checkpoint-140"  # written by the Trainer, never described by a manifest
    unfinished.mkdir()
    (unfinished / "model.safetensors").write_bytes(b"half")
    with pytest.warns(ManifestWarning) as caught:
        assert last_good_checkpoint(tmp_path) == str(tmp_path / "checkpoint-120")
    text = " ".join(str(w.message) for w in caught)
    assert "checkpoint-130" in text and "truncated" in text and "checkpoint-140" in text

    listing = subprocess.run([sys.executable, "-m", "saverules.ls", str(tmp_path)], env=env(), cwd=REPO,
                             capture_output=True, text=True)
    assert listing.returncode == 1
    assert "FAILED checkpoint-130: model.safetensors has" in listing.stdout
    assert "checkpoint-120" in listing.stdout and "yes" in listing.stdout


def test_ls_lists_and_verifies_without_importing_torch(tmp_path):
    train(tmp_path, EVERY_40 + "[retention]\nkeep_last = 2\n")
    code = ("import sys, saverules.ls as ls\nrc = ls.main([sys.argv[1], '--json'])\n"
            "assert 'torch' not in sys.modules, 'listing imported torch'\nsys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env(), cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)["checkpoints"]
    assert [(r["step"], r["verified"], r["kept_by"]) for r in rows] == [
        (120, True, ["keep_last"]), (130, True, ["newest", "final", "keep_last"])]


# -- preemption ------------------------------------------------------------------------------------


def test_sigterm_saves_the_next_step_and_the_process_exits_0(tmp_path):
    pfile = tmp_path / "policy.toml"
    pfile.write_text(EVERY_40 + '[[rules]]\nkind = "on_signal"\nsignals = ["SIGTERM"]\n')
    out = tmp_path / "run"
    proc = held("hf", out, pfile, 61, "--release", str(out / "go"))
    proc.send_signal(signal.SIGTERM)
    (out / "go").write_text("")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert saved_dirs(out) == [40, 61]
    assert manifest(out / "checkpoint-61")["reasons"] == ['on_signal(signals=["SIGTERM"])']
    assert result(out)["global_step"] == 61  # stopped cleanly after the save
    assert last_good_checkpoint(out) == str(out / "checkpoint-61")


# -- DDP under torchrun ----------------------------------------------------------------------------


def test_torchrun_two_ranks_take_the_same_decisions_and_only_rank_0_writes(tmp_path):
    pfile = tmp_path / "policy.toml"
    pfile.write_text(EVERY_40 + "[retention]\nkeep_last = 3\n")
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tests" / "helpers" / "integ_child.py"), "hf", str(out), str(pfile)]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = result(out, 0), result(out, 1)
    assert r0["saved"] == r1["saved"] == [40, 80, 120, 130]
    assert r0["collectives"] == r1["collectives"] == 0  # a step-only policy never communicates
    assert r0["removed"] == ["checkpoint-40"] and r1["removed"] == []
    assert saved_dirs(out) == [80, 120, 130]
    for step in (80, 120, 130):  # each rank's rng file is in the manifest: it was written before it
        info = fm.inspect(out / f"checkpoint-{step}")
        assert info.verified, info.error
        assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(manifest(out / f"checkpoint-{step}")["files"])
    assert proc.stderr.count("saved step 130: final") == 1  # logged by rank 0 only


# -- settings and options ---------------------------------------------------------------------------


def test_conflicting_trainer_settings_raise_with_what_to_change(tmp_path):
    cb = SaverulesCallback(policy(EVERY_40))
    with pytest.raises(ConflictingSettingsError, match='save_strategy="no"') as e:
        make_trainer(tmp_path, [cb], save_strategy="steps", save_steps=40)
    assert "every_steps" in str(e.value)
    with pytest.raises(ConflictingSettingsError, match="keep_last = 2"):
        make_trainer(tmp_path, [SaverulesCallback(policy(EVERY_40))], save_total_limit=2)
    with pytest.raises(ConflictingSettingsError, match="Pass the policy as a path"):
        make_trainer(tmp_path, [SaverulesCallback(policy(EVERY_40))], restore_callback_states_from_checkpoint=True)


def test_restore_callback_states_from_checkpoint_rebuilds_the_callback_with_its_state(tmp_path):
    pfile = tmp_path / "policy.toml"
    pfile.write_text(EVERY_40)
    out = tmp_path / "run"
    make_trainer(out, [SaverulesCallback(str(pfile))], max_steps=90).train()
    trainer = make_trainer(out, [SaverulesCallback(str(pfile))], restore_callback_states_from_checkpoint=True)
    trainer.train(resume_from_checkpoint=last_good_checkpoint(out))
    (rebuilt,) = [c for c in trainer.callback_handler.callbacks if isinstance(c, SaverulesCallback)]
    assert rebuilt.saved_steps == [120, 130] and saved_dirs(out) == [40, 80, 90, 120, 130]


def test_bad_options_are_rejected_in_the_constructor(tmp_path):
    with pytest.raises(TypeError, match=r"unknown option 'sync_second' \(did you mean 'sync_seconds'\?\)"):
        SaverulesCallback(policy(EVERY_40), sync_second=2)
    with pytest.raises(ValueError, match="sync_seconds must be a positive number"):
        SaverulesCallback(policy(EVERY_40), sync_seconds=0)
    with pytest.raises(ValueError, match="SIGNOPE"):
        SaverulesCallback(policy(EVERY_40), signals=["SIGNOPE"])
    with pytest.raises(TypeError, match="stop_on_sigterm must be true or false"):
        SaverulesCallback(policy(EVERY_40), stop_on_sigterm="yes")
    with pytest.raises(TypeError, match="takes a saverules.Policy or the path"):
        SaverulesCallback(42)
    with pytest.raises(saverules.PolicyError, match="missing.toml:1:1: error: cannot read the file"):
        SaverulesCallback(str(tmp_path / "missing.toml"))


def test_resuming_with_a_changed_policy_warns_and_decides_from_the_saved_step(tmp_path):
    train(tmp_path, EVERY_40, max_steps=80)
    cb = SaverulesCallback(policy('version = 1\n[[rules]]\nkind = "every_steps"\nevery = 30\n'))
    trainer = make_trainer(tmp_path, [cb])
    with pytest.warns(UserWarning, match="step 80.*was written under a different policy"):
        trainer.train(resume_from_checkpoint=last_good_checkpoint(tmp_path))
    assert cb.saved_steps == [90, 120, 130]


def test_importing_saverules_imports_no_framework():
    code = ("import sys, saverules, saverules.integrations.common, saverules.integrations.manifest, saverules.ls\n"
            "loaded = [m for m in ('torch', 'transformers', 'lightning') if m in sys.modules]\n"
            "assert not loaded, loaded\n")
    proc = subprocess.run([sys.executable, "-c", code], env=env(), cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_ls_still_reads_a_store_whose_directories_are_named_like_the_trainers(tmp_path):
    from saverules.store import Checkpointer

    store_policy = policy(EVERY_40 + '[storage]\nname = "checkpoint-{step}"\n')
    model = torch.nn.Linear(2, 1)
    with Checkpointer(store_policy, dir=tmp_path) as ckpt:
        for step in range(1, 81):
            ckpt.step(saverules.Progress(step, total_steps=80), {"model": model})
    assert not fm.is_framework_dir(tmp_path)
    listing = subprocess.run([sys.executable, "-m", "saverules.ls", str(tmp_path), "--json"], env=env(), cwd=REPO,
                             capture_output=True, text=True)
    assert listing.returncode == 0, listing.stderr
    assert [(c["name"], c["verified"]) for c in json.loads(listing.stdout)["checkpoints"]] == [
        ("checkpoint-40", True), ("checkpoint-80", True)]


def test_improved_on_an_eval_metric_saves_the_evaluations_that_beat_the_best(tmp_path):
    text = 'version = 1\n[[rules]]\nkind = "improved"\nmetric = "eval_loss"\nmode = "min"\nmin_delta = 0.3\n'
    trainer, cb = train(tmp_path, text, max_steps=60, eval_steps=5)
    evals = [(e["step"], e["eval_loss"]) for e in trainer.state.log_history if "eval_loss" in e]
    expected, best = [], None
    for step, value in evals:
        if best is None or best - value > 0.3:
            expected.append(step)
            best = value
    expected = sorted(set(expected) | {60})  # and the final step
    assert {step for step, _ in evals} - set(expected), "the data should leave some evaluations unsaved"
    assert cb.saved_steps == saved_dirs(tmp_path) == expected
