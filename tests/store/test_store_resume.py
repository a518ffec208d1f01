"""Resume never silently starts over, and the store's smaller promises: final checkpoints of
extended runs, closed checkpointers, a store path that is a file, warnings that point at the
caller, and a clean scan."""
from __future__ import annotations

import gc
import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from store_common import checkpoint_dirs, policy, run_ls

import saverules
from saverules import Progress
from saverules.torch import (
    Checkpointer,
    CheckpointError,
    CheckpointWarning,
    CheckpointWriteError,
    NoValidCheckpointError,
    scan,
)


def small_state(value: float):
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.fill_(value)
    return {"model": model, "value": value}


def saves(directory: Path, steps, pol=None, total=None):
    ck = Checkpointer(pol or policy(), directory)
    for s in steps:
        ck.save(Progress(s, total_steps=total, time=float(s)), small_state(float(s)))
    ck.close()


def truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


# --------------------------------------------------------------------------
# No valid checkpoint: an error, unless a fresh start is asked for
# --------------------------------------------------------------------------


def test_a_store_whose_checkpoints_are_all_damaged_raises_and_lists_each(tmp_path):
    saves(tmp_path, (1, 2, 3, 4))
    for s in (1, 2, 3):
        truncate(tmp_path / f"step-{s:08d}" / "state.pt")
    os.unlink(tmp_path / "step-00000004" / "manifest.json")
    ck = Checkpointer(policy(), tmp_path)
    with pytest.warns(CheckpointWarning, match="skipping checkpoint"), pytest.raises(NoValidCheckpointError) as info:
        ck.load_latest(small_state(0.0))
    err = info.value
    text = str(err)
    assert f"{tmp_path} holds 4 checkpoints and none of them can be resumed" in text
    for s in (1, 2, 3):
        assert f"step-{s:08d}: state.pt has" in text and "truncated" in text
    assert "step-00000004: manifest.json is missing" in text
    assert 'if_none_valid="start_fresh"' in text and "python -m saverules.ls" in text
    assert [name for name, _ in err.rejected] == [f"step-{s:08d}" for s in (1, 2, 3, 4)]
    assert isinstance(err, CheckpointError)
    assert checkpoint_dirs(tmp_path) == [f"step-{s:08d}" for s in (1, 2, 3, 4)]  # nothing was touched


def test_latest_says_the_same(tmp_path):
    saves(tmp_path, (1,))
    truncate(tmp_path / "step-00000001" / "state.pt")
    with pytest.warns(CheckpointWarning), pytest.raises(NoValidCheckpointError, match="step-00000001: state.pt has"):
        Checkpointer(policy(), tmp_path, read_only=True).latest()


def test_start_fresh_is_an_explicit_choice(tmp_path):
    saves(tmp_path, (1, 2))
    for s in (1, 2):
        truncate(tmp_path / f"step-{s:08d}" / "state.pt")
    ck = Checkpointer(policy(), tmp_path)
    state = small_state(7.0)
    with pytest.warns(CheckpointWarning) as record:
        assert ck.load_latest(state, if_none_valid="start_fresh") is None
    assert "starting from scratch as if_none_valid='start_fresh' asks" in str(record[-1].message)
    assert state["value"] == 7.0  # untouched
    with pytest.warns(CheckpointWarning, match="not counted by retention"):
        ck.save(Progress(1), state)  # and the fresh run saves alongside the damaged ones
    assert checkpoint_dirs(tmp_path) == ["step-00000001", "step-00000002"]


def test_an_empty_store_is_a_fresh_start_without_a_word(tmp_path):
    ck = Checkpointer(policy(), tmp_path / "new")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ck.load_latest(small_state(0.0)) is None


def test_if_none_valid_is_checked(tmp_path):
    ck = Checkpointer(policy(), tmp_path)
    with pytest.raises(ValueError, match="if_none_valid must be 'raise' or 'start_fresh'"):
        ck.load_latest(small_state(0.0), if_none_valid="restart")


# --------------------------------------------------------------------------
# An extended run pins only its own final checkpoint
# --------------------------------------------------------------------------

FINAL_KEEP_1 = """
version = 1
[[rules]]
kind = "every_steps"
every = 2
[retention]
keep_last = 1
"""


def test_an_extended_run_unpins_the_old_final(tmp_path):
    pol = saverules.loads(FINAL_KEEP_1)
    ck = Checkpointer(pol, tmp_path, total_steps=4)
    for s in range(1, 5):
        ck.step(Progress(s, total_steps=4), small_state(float(s)))
    ck.close()
    assert checkpoint_dirs(tmp_path) == ["step-00000004"]
    # Extended twice: 4 -> 8 -> 12. Each extension's final replaces the previous one.
    for total in (8, 12):
        ck = Checkpointer(pol, tmp_path, total_steps=total)
        start = ck.load_latest(small_state(0.0))
        for s in range(start.step + 1, total + 1):
            ck.step(Progress(s, total_steps=total), small_state(float(s)))
        ck.close()
        assert checkpoint_dirs(tmp_path) == [f"step-{total:08d}"], total
    proc = run_ls(tmp_path, "--json")
    kept = [c["kept_by"] for c in json.loads(proc.stdout)["checkpoints"]]
    assert kept == [["newest", "final", "keep_last"]]


def test_ls_does_not_pin_the_final_of_an_earlier_run(tmp_path, capsys):
    pol = saverules.loads(FINAL_KEEP_1.replace("keep_last = 1", "keep_last = 2"))
    ck = Checkpointer(pol, tmp_path, total_steps=4)
    assert ck.step(Progress(4, total_steps=4), small_state(4.0)).reasons[0] == "final"
    ck.close()
    ck = Checkpointer(pol, tmp_path, total_steps=8)
    ck.load_latest(small_state(0.0))
    assert ck.step(Progress(6, total_steps=8), small_state(6.0)).save  # the extended run's first save
    ck.close()
    from saverules import ls

    capsys.readouterr()
    assert ls.main([str(tmp_path), "--json"]) == 0
    kept = {c["step"]: c["kept_by"] for c in json.loads(capsys.readouterr().out)["checkpoints"]}
    assert kept == {4: ["keep_last"], 6: ["newest", "keep_last"]}


# --------------------------------------------------------------------------
# Misuse gets a clear error
# --------------------------------------------------------------------------


def test_step_after_close_raises(tmp_path):
    ck = Checkpointer(policy(), tmp_path)
    ck.step(Progress(1), small_state(1.0))
    ck.close()
    ck.close()  # closing twice is fine
    for call in (lambda: ck.step(Progress(2), small_state(2.0)), lambda: ck.save(Progress(3), small_state(3.0))):
        with pytest.raises(CheckpointError, match="closed"):
            call()
    assert [i.step for i in ck.list()] == []  # reading still works (step 1 was not a save)
    assert ck.latest() is None


def test_a_context_manager_closes(tmp_path):
    with Checkpointer(policy(), tmp_path) as ck:
        ck.step(Progress(2), small_state(2.0))
    with pytest.raises(CheckpointError, match="closed"):
        ck.step(Progress(4), small_state(4.0))


def test_a_store_path_that_is_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "ckpt").write_text("not a directory")
    for on_error in ("raise", "warn"):
        with pytest.raises(CheckpointWriteError) as info:
            Checkpointer(policy(), tmp_path / "ckpt", on_error=on_error)
        text = str(info.value)
        assert f"{tmp_path / 'ckpt'} is a file, not a directory" in text
        assert "EEXIST" not in text and "File exists" not in text
    with pytest.raises(CheckpointWriteError, match="is a file, not a directory"):
        Checkpointer(policy(), tmp_path / "ckpt" / "below")


def test_store_warnings_point_at_the_callers_line(tmp_path):
    saves(tmp_path, (2, 4))
    truncate(tmp_path / "step-00000004" / "state.pt")
    ck = Checkpointer(policy(), tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ck.load_latest({"model": torch.nn.Linear(3, 2), "extra": 1})  # no "extra" in the checkpoint: a warning too
    assert len(caught) >= 2
    for w in caught:
        assert w.filename == __file__, (w.filename, str(w.message))


def test_scanning_a_store_leaves_no_iterator_open(tmp_path):
    saves(tmp_path, (2,))
    unfinished = tmp_path / "step-00000009"
    unfinished.mkdir()
    (unfinished / "state.pt").write_bytes(b"x")  # a checkpoint without a manifest
    (unfinished / "zz-more").write_bytes(b"x")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        infos = scan(tmp_path, verify=False)
        gc.collect()
    assert [i.name for i in infos] == ["step-00000002", "step-00000009"]
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []
