"""Retention in the store: what it keeps, what it deletes, and what it re-hashes first."""
from __future__ import annotations

from pathlib import Path

import pytest
from store_common import (
    EVERY_1_KEEP_2,
    EVERY_2,
    checkpoint_dirs,
    hidden_entries,
    policy,
    policy_toml,
    small_state,
)

from saverules import Progress
from saverules.store import digest
from saverules.torch import (
    Checkpointer,
    CheckpointWarning,
)

# --------------------------------------------------------------------------
# Retention
# --------------------------------------------------------------------------


def test_retention_keeps_the_last_n(tmp_path):
    ck = Checkpointer(policy(EVERY_1_KEEP_2), tmp_path)
    for s in range(1, 6):
        ck.step(Progress(s), small_state(s))
    assert checkpoint_dirs(tmp_path) == ["step-00000004", "step-00000005"]
    assert hidden_entries(tmp_path) == []


def test_retention_keeps_final_and_best(tmp_path):
    pol = policy(every=1, final=False, keep_last=2, keep_best="loss")
    ck = Checkpointer(pol, tmp_path)
    losses = {1: 5.0, 2: 0.5, 3: 4.0, 4: 3.0, 5: 2.0, 6: 1.0}
    for s in range(1, 7):
        ck.step(Progress(s, metrics={"loss": losses[s]}), small_state(s))
    assert checkpoint_dirs(tmp_path) == ["step-00000002", "step-00000005", "step-00000006"]
    ck.save(Progress(7), small_state(), reason="final")
    for s in (8, 9):
        ck.step(Progress(s), small_state(s))
    assert checkpoint_dirs(tmp_path) == ["step-00000002", "step-00000007", "step-00000008", "step-00000009"]


def test_retention_never_deletes_a_damaged_checkpoint_and_warns_once(tmp_path):
    ck = Checkpointer(policy(EVERY_1_KEEP_2), tmp_path)
    ck.step(Progress(1), small_state())
    with open(tmp_path / "step-00000001" / "state.pt", "r+b") as f:
        f.seek(10)
        byte = f.read(1)
        f.seek(10)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.warns(CheckpointWarning, match="step-00000001.*failed verification"):
        for s in range(2, 5):
            ck.step(Progress(s), small_state(s))
    # The damaged one is not counted: the two newest good ones stay besides it.
    assert checkpoint_dirs(tmp_path) == ["step-00000001", "step-00000003", "step-00000004"]


def test_retention_without_a_table_keeps_everything(tmp_path):
    ck = Checkpointer(policy(EVERY_2), tmp_path)
    for s in range(1, 9):
        ck.step(Progress(s), small_state())
    assert len(checkpoint_dirs(tmp_path)) == 4


def test_retention_keeps_the_checkpoint_just_written(tmp_path):
    # keep_best alone would delete a new checkpoint that is not the best; the store keeps
    # the newest until the next save, so resume always finds the latest state.
    pol = policy(every=1, final=False, keep_last=1, keep_best="loss")
    ck = Checkpointer(pol, tmp_path)
    ck.step(Progress(1, metrics={"loss": 1.0}), small_state())
    ck.step(Progress(2, metrics={"loss": 2.0}), small_state())
    assert checkpoint_dirs(tmp_path) == ["step-00000001", "step-00000002"]
    ck.step(Progress(3, metrics={"loss": 3.0}), small_state())
    assert checkpoint_dirs(tmp_path) == ["step-00000001", "step-00000003"]


def test_retention_rehashes_old_checkpoints_only_when_it_deletes(tmp_path, monkeypatch):
    keep_10 = policy_toml(1, final=False, keep_last=10)
    ck = Checkpointer(policy(keep_10), tmp_path)
    for s in (1, 2, 3):
        ck.step(Progress(s), small_state(s))
    hashed = []
    real_hash = digest.hash_file

    def counting_hash(path, *args, **kwargs):
        name = Path(path).parent.name
        hashed.append("new" if name.startswith(".tmp-") else name)  # "new": the write being verified
        return real_hash(path, *args, **kwargs)

    monkeypatch.setattr(digest, "hash_file", counting_hash)
    # A new process: nothing is cached. Keeping everything needs no re-hash of old checkpoints.
    Checkpointer(policy(keep_10), tmp_path).step(Progress(4), small_state(4))
    assert hashed == ["new"]
    hashed.clear()
    # When retention deletes, the checkpoints it counts are re-hashed first, each once per process.
    ck = Checkpointer(policy(EVERY_1_KEEP_2), tmp_path)
    ck.step(Progress(5), small_state(5))
    assert checkpoint_dirs(tmp_path) == ["step-00000004", "step-00000005"]
    assert sorted(hashed) == ["new"] + [f"step-{s:08d}" for s in (1, 2, 3, 4)]
    hashed.clear()
    ck.step(Progress(6), small_state(6))
    assert checkpoint_dirs(tmp_path) == ["step-00000005", "step-00000006"]
    assert hashed == ["new"]
