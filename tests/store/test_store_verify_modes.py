"""Verification modes: what each `verify=` mode re-reads before a checkpoint is committed."""
from __future__ import annotations

from pathlib import Path

import pytest
from store_common import (
    checkpoint_dirs,
    hidden_entries,
    policy,
    small_state,
)

import saverules.torch as st
from saverules import Progress
from saverules.store import digest
from saverules.store.formats import torchfile
from saverules.torch import (
    Checkpointer,
)

# --------------------------------------------------------------------------
# Verification modes
# --------------------------------------------------------------------------


@pytest.mark.parametrize("fmt, expected", [
    # mode: (files re-read in full with their digest compared, from the device?, state files loaded)
    ("torch", {"none": ([], False, 0), "hash": (["state.pt"], False, 0),
               "device": (["state.pt"], True, 0), "load": (["state.pt"], True, 1)}),
    ("tensors", {"none": ([], False, 0), "hash": (["state.pt"], False, 0),  # the data file: size and header
                 "device": (["state.pt", "tensors.safetensors"], True, 0),
                 "load": (["state.pt", "tensors.safetensors"], True, 1)}),
])
def test_verify_modes(tmp_path, monkeypatch, fmt, expected):
    reread, loads = [], []
    real_hash, real_load = digest.hash_file, torchfile.load

    def counting_hash(path, algo="sha256", from_device=False):
        reread.append((Path(path).name, from_device))
        return real_hash(path, algo, from_device)

    def counting_load(*a, **k):
        loads.append(1)
        return real_load(*a, **k)

    monkeypatch.setattr(digest, "hash_file", counting_hash)
    monkeypatch.setattr(torchfile, "load", counting_load)
    for mode, (files, device, n_loads) in expected.items():
        reread.clear(), loads.clear()
        ck = Checkpointer(policy(fmt=fmt), tmp_path / mode, verify=mode)
        ck.save(Progress(1), small_state())
        if fmt == "tensors" and mode == "load":  # decoding checks the structure's digest before unpickling it
            reread.remove(("state.pt", False))
        assert sorted(reread) == sorted((f, device) for f in files), mode
        assert len(loads) == n_loads, mode
        assert ck.latest().step == 1


def test_a_file_that_does_not_read_back_is_not_committed(tmp_path, monkeypatch):
    ck = Checkpointer(policy(), tmp_path)
    ck.save(Progress(2), small_state())
    monkeypatch.setattr(digest, "hash_file", lambda path, *a, **k: (0, "0" * 64))
    with pytest.raises(st.CheckpointVerifyError, match="did not read back"):
        ck.save(Progress(4), small_state())
    monkeypatch.undo()
    assert checkpoint_dirs(tmp_path) == ["step-00000002"] and hidden_entries(tmp_path) == []
