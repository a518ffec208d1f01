"""saverules.lightning.SaverulesCheckpoint on the real Lightning Trainer (CPU, a tiny model)."""
from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from integ_procs import REPO, env, held, kill_held, result, run
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_common import fit, loader

import saverules
from saverules.integrations import manifest as fm
from saverules.integrations.manifest import ManifestWarning
from saverules.lightning import ConflictingSettingsError, SaverulesCheckpoint

pytestmark = [pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`"),
              pytest.mark.filterwarnings("ignore:.*LeafSpec.*is deprecated")]

EVERY_40 = 'version = 1\n[[rules]]\nkind = "every_steps"\nevery = 40\n'


def saved_files(d):
    return sorted(int(p.name.split("-")[1].split(".")[0]) for p in Path(d).glob("step-*.ckpt"))


def ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def manifest(path):
    return json.loads(fm.manifest_path(path).read_text())


def test_the_policy_saves_step_130_which_model_checkpoint_does_not(tmp_path):
    own = ModelCheckpoint(dirpath=tmp_path / "own", every_n_train_steps=40, save_top_k=-1, save_last=True)
    fit(tmp_path, [own])
    names = sorted(p.name for p in (tmp_path / "own").iterdir())
    assert names == ["epoch=119-step=120.ckpt", "epoch=39-step=40.ckpt", "epoch=79-step=80.ckpt", "last.ckpt"]
    assert ckpt(tmp_path / "own" / "last.ckpt")["global_step"] == 120  # steps 121-130 are lost
    assert not (tmp_path / "own" / "last.ckpt").is_symlink()  # and step 120 was written twice

    cb = SaverulesCheckpoint(saverules.loads(EVERY_40), dirpath=tmp_path / "policy")
    trainer, _ = fit(tmp_path, [cb])
    assert trainer.global_step == 130
    assert saved_files(tmp_path / "policy") == cb.saved_steps == [40, 80, 120, 130]
    for step in (40, 80, 120, 130):
        path = tmp_path / "policy" / f"step-{step:08d}.ckpt"
        assert ckpt(path)["global_step"] == step  # Lightning's own format, ckpt_path= reads it
        info = fm.inspect(path)
        assert info.verified and info.step == step
    assert manifest(tmp_path / "policy" / "step-00000130.ckpt")["reasons"] == ["final"]
    assert not list((tmp_path / "policy").glob(".tmp-*"))


def test_one_decision_per_update_with_accumulation_and_epoch_ends(tmp_path):
    text = 'version = 1\n[[rules]]\nkind = "epoch_end"\n[[rules]]\nkind = "every_steps"\nevery = 3\n'
    cb = SaverulesCheckpoint(saverules.loads(text), dirpath=tmp_path / "c")
    # 32 points in batches of 8, two batches per update: 2 updates an epoch, 4 epochs
    trainer, _ = fit(tmp_path, [cb], n=32, batch=8, accumulate_grad_batches=2, max_steps=-1, max_epochs=4)
    assert trainer.global_step == 8
    assert cb.saved_steps == saved_files(tmp_path / "c") == [2, 3, 4, 6, 8]
    assert manifest(tmp_path / "c" / "step-00000003.ckpt")["reasons"] == ["every_steps(every=3)"]
    assert manifest(tmp_path / "c" / "step-00000006.ckpt")["reasons"] == ["epoch_end", "every_steps(every=3)"]
    assert "final" in manifest(tmp_path / "c" / "step-00000008.ckpt")["reasons"]


def test_retention_keep_last_keep_every_and_keep_best_on_a_validation_metric(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="saverules")
    text = ('version = 1\n[[rules]]\nkind = "every_steps"\nevery = 10\n'
            '[retention]\nkeep_last = 2\nkeep_every = 30\n'
            '[retention.keep_best]\nmetric = "val_loss"\nmode = "max"\n')
    cb = SaverulesCheckpoint(saverules.loads(text), dirpath=tmp_path / "c")
    fit(tmp_path, [cb], max_steps=80, val=True, check_val_every_n_epoch=10, limit_val_batches=1)
    vals = {int(p.name[5:13]): manifest(p)["metrics"]["val_loss"] for p in (tmp_path / "c").glob("step-*.ckpt")}
    kept = saved_files(tmp_path / "c")
    worst = max(vals, key=lambda s: vals[s])
    assert worst not in (30, 60, 70, 80), "the data should make keep_best keep a checkpoint nothing else keeps"
    assert kept == sorted({70, 80, 30, 60, worst})
    removed = sorted(set(range(10, 81, 10)) - set(kept))
    assert sorted(int(n[5:13]) for n in cb.removed) == removed
    for step in removed:
        assert any(f"removed step-{step:08d}.ckpt" in r.getMessage() for r in caplog.records)
    x, y = next(iter(loader(16, 16, seed=1)))
    for step in kept:  # the manifest records the validation of the saved weights (run after the save)
        weights = ckpt(tmp_path / "c" / f"step-{step:08d}.ckpt")["state_dict"]
        loss = torch.nn.functional.mse_loss(x @ weights["linear.weight"].T.squeeze(-1) + weights["linear.bias"], y)
        assert vals[step] == pytest.approx(float(loss), rel=1e-5)


def test_resume_after_sigkill_makes_the_uninterrupted_runs_saves_and_weights(tmp_path):
    pfile = tmp_path / "policy.toml"
    pfile.write_text(EVERY_40 + '[[rules]]\nkind = "every_time"\nevery = "1h"\n')
    ref = SaverulesCheckpoint(str(pfile), dirpath=tmp_path / "ref")
    fit(tmp_path / "r", [ref])
    assert ref.saved_steps == [40, 80, 120, 130]

    out = tmp_path / "killed"
    kill_held("lightning", out, pfile, 86)
    assert saved_files(out / "ckpts") == [40, 80]
    resume = SaverulesCheckpoint.last_good(out / "ckpts")
    assert resume == str(out / "ckpts" / "step-00000080.ckpt")
    rides = ckpt(resume)["callbacks"]["SaverulesCheckpoint"]
    assert rides["decider"]["last_save_step"] == 80 and rides["clock"] > 0

    cb = SaverulesCheckpoint(str(pfile), dirpath=out / "ckpts")
    fit(out, [cb], ckpt_path=resume)
    assert cb.saved_steps == [120, 130]
    assert saved_files(out / "ckpts") == saved_files(tmp_path / "ref") == [40, 80, 120, 130]
    a = ckpt(out / "ckpts" / "step-00000130.ckpt")["state_dict"]
    b = ckpt(tmp_path / "ref" / "step-00000130.ckpt")["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert manifest(out / "ckpts" / "step-00000120.ckpt")["time"] >= rides["clock"]


def test_truncated_newest_checkpoint_is_skipped_with_a_warning(tmp_path):
    cb = SaverulesCheckpoint(saverules.loads(EVERY_40), dirpath=tmp_path / "c")
    fit(tmp_path, [cb])
    newest = tmp_path / "c" / "step-00000130.ckpt"
    with open(newest, "r+b") as f:
        f.truncate(newest.stat().st_size - 10)
    (tmp_path / "c" / "step-00000140.ckpt").write_bytes(b"no manifest")
    with pytest.warns(ManifestWarning) as caught:
        resume = SaverulesCheckpoint.last_good(tmp_path / "c")
    assert resume == str(tmp_path / "c" / "step-00000120.ckpt")
    text = " ".join(str(w.message) for w in caught)
    assert "step-00000130.ckpt" in text and "truncated" in text and "step-00000140.ckpt" in text
    listing = subprocess.run([sys.executable, "-m", "saverules.ls", str(tmp_path / "c")], env=env(), cwd=REPO,
                             capture_output=True, text=True)
    assert listing.returncode == 1 and "FAILED step-00000130.ckpt" in listing.stdout
    again = SaverulesCheckpoint(saverules.loads(EVERY_40), dirpath=tmp_path / "c")
    fit(tmp_path, [again], ckpt_path=resume)
    assert again.saved_steps == [130] and fm.inspect(newest).verified  # the damaged file was replaced


def test_sigterm_saves_the_next_step_and_the_process_exits_0(tmp_path):
    pfile = tmp_path / "policy.toml"
    pfile.write_text(EVERY_40 + '[[rules]]\nkind = "on_signal"\nsignals = ["SIGTERM"]\n')
    out = tmp_path / "run"
    proc = held("lightning", out, pfile, 61, "--release", str(out / "go"))
    proc.send_signal(signal.SIGTERM)
    (out / "go").write_text("")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert saved_files(out / "ckpts") == [40, 61]
    assert manifest(out / "ckpts" / "step-00000061.ckpt")["reasons"] == ['on_signal(signals=["SIGTERM"])']
    assert ckpt(out / "ckpts" / "step-00000061.ckpt")["global_step"] == 61
    assert result(out)["saved"] == [40, 61]  # and the run stopped there


def test_ddp_two_processes_take_the_same_decisions_and_only_rank_0_writes(tmp_path):
    pfile = tmp_path / "policy.toml"
    pfile.write_text(EVERY_40 + "[retention]\nkeep_last = 3\n")
    out = tmp_path / "ddp"
    proc = run("lightning", out, pfile, "--ddp", timeout=150)
    r0, r1 = result(out, 0), result(out, 1)
    assert r0["saved"] == r1["saved"] == [40, 80, 120, 130]
    assert r0["collectives"] == r1["collectives"] == 0  # no per-batch collective for a step-only policy
    assert r0["removed"] == ["step-00000040.ckpt"] and r1["removed"] == []
    names = sorted(p.name for p in (out / "ckpts").iterdir())
    assert names == [".saverules", "policy.toml"] + sorted(
        n for s in (80, 120, 130) for n in (f"step-{s:08d}.ckpt", f"step-{s:08d}.ckpt{fm.SIDECAR_SUFFIX}"))
    assert all(fm.inspect(out / "ckpts" / f"step-{s:08d}.ckpt").verified for s in (80, 120, 130))
    assert proc.stderr.count("saved step 130: final") == 1


def test_a_second_checkpoint_callback_is_a_conflict(tmp_path):
    cb = SaverulesCheckpoint(saverules.loads(EVERY_40), dirpath=tmp_path / "c")
    with pytest.raises(ConflictingSettingsError, match="every_n_train_steps -> every_steps"):
        fit(tmp_path, [cb, ModelCheckpoint(dirpath=tmp_path / "own", every_n_train_steps=40)])
    assert not (tmp_path / "own").exists() and not saved_files(tmp_path / "c")


def test_bad_options_are_rejected_in_the_constructor(tmp_path):
    policy = saverules.loads(EVERY_40)
    with pytest.raises(TypeError, match=r"unknown option 'every_n_train_steps'"):
        SaverulesCheckpoint(policy, every_n_train_steps=40)
    with pytest.raises(TypeError, match="dirpath=...\\) takes a directory path"):
        SaverulesCheckpoint(policy, dirpath=3)
    with pytest.raises(ValueError, match="sync_seconds must be a positive number"):
        SaverulesCheckpoint(policy, sync_seconds=float("nan"))


def test_early_stopping_saves_the_step_it_stops_at(tmp_path):
    from lightning.pytorch.callbacks import EarlyStopping

    cb = SaverulesCheckpoint(saverules.loads(EVERY_40), dirpath=tmp_path / "c")
    # val_loss falls, so mode="max" stops at the second validation (step 14); no every_steps save before it
    stop = EarlyStopping(monitor="val_loss", mode="max", patience=0, check_on_train_epoch_end=False)
    trainer, _ = fit(tmp_path, [stop, cb], val=True, check_val_every_n_epoch=7)
    assert trainer.global_step == 14 and trainer.should_stop
    assert cb.saved_steps == saved_files(tmp_path / "c") == [14]
    assert manifest(tmp_path / "c" / "step-00000014.ckpt")["reasons"] == ["final"]


def test_keyboard_interrupt_saves_what_the_final_rule_says(tmp_path):
    import lightning.pytorch as L

    class Interrupt(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 50:
                raise KeyboardInterrupt  # as Ctrl-C during step 51

    cb = SaverulesCheckpoint(saverules.loads(EVERY_40), dirpath=tmp_path / "c")
    previous = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):  # Lightning's own handling: a graceful shutdown, then exit 1
            fit(tmp_path, [Interrupt(), cb])
    finally:
        signal.signal(signal.SIGINT, previous)  # Lightning ignores SIGINT after the first one
    assert cb.saved_steps == saved_files(tmp_path / "c") == [40, 50]
    assert manifest(tmp_path / "c" / "step-00000050.ckpt")["reasons"] == ["final"]
    assert ckpt(tmp_path / "c" / "step-00000050.ckpt")["global_step"] == 50


def test_a_save_that_cannot_be_written_raises_and_leaves_no_partial_file(tmp_path):
    import resource
    import warnings

    import lightning.pytorch as L

    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    xfsz = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG

    class FillTheDisk(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 41:  # after the save of step 40: no file may grow past 1 KiB
                resource.setrlimit(resource.RLIMIT_FSIZE, (1024, limit[1]))

    cb = SaverulesCheckpoint(saverules.loads(EVERY_40), dirpath=tmp_path / "c")
    try:
        with pytest.raises(OSError):
            fit(tmp_path, [FillTheDisk(), cb])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, xfsz)
    names = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert names == ["policy.toml", "step-00000040.ckpt", f"step-00000040.ckpt{fm.SIDECAR_SUFFIX}"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", ManifestWarning)
        assert SaverulesCheckpoint.last_good(tmp_path / "c") == str(tmp_path / "c" / "step-00000040.ckpt")
