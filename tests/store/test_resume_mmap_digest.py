"""A mapped resume (``load_latest(mmap=True)``) checks the digest of every byte before it returns, copies a
plain module's entries from the map straight into its memory while the digest runs beside the copy, and
falls back past a damaged file, saying why, exactly as a read does."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from store_common import EVERY_2, policy, tensors_equal
from test_resume_in_place import make, ptrs, save_steps, snapshot

from saverules.store import digest, resume
from saverules.store.formats import tensorfile
from saverules.store.verify import VerifyCache
from saverules.torch import Checkpointer, CheckpointError, NoValidCheckpointError

EVERY_1 = EVERY_2.replace("every = 2", "every = 1")


def flip(ckpt: Path, part: str) -> None:
    """Flip one byte inside the data of the first entry whose name holds ``part`` (sizes stay right)."""
    path = ckpt / "tensors.safetensors"
    with open(path, "rb") as f:
        start, entries, _ = tensorfile.read_header(path, f)
    name = next(n for n in entries if part in n)
    at = start + entries[name][2] + 3
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0x5A]))


def load(root: Path, state, **kw):
    return Checkpointer(policy(EVERY_1, fmt="tensors"), root).load_latest(state, mmap=True, **kw)


def test_a_mapped_resume_lands_the_model_in_place_and_maps_the_rest(tmp_path):
    held = save_steps(tmp_path, {1: 1})
    model, opt = make(7)
    state = {"model": model, "optimizer": opt, "step": None}
    found = resume.load_latest(tmp_path, VerifyCache(), lambda info: None, "raise", "cpu", True, state)
    assert found is not None
    own = model.state_dict()
    for k, t in found[1].objects["model"].items():  # copied from the map into the parameters' own memory
        assert t.untyped_storage().data_ptr() == own[k].untyped_storage().data_ptr(), k
    assert tensors_equal(snapshot(model, opt)[0], held[1][0])
    moments = [t for s in found[1].objects["optimizer"]["state"].values() for t in s.values() if t.dim() > 0]
    assert moments and all(t.untyped_storage().data_ptr() not in ptrs(model).values() for t in moments)
    model2, opt2 = make(8)
    before = ptrs(model2)
    assert load(tmp_path, {"model": model2, "optimizer": opt2, "step": None}).step == 1
    assert ptrs(model2) == before
    assert tensors_equal(snapshot(model2, opt2), held[1])


@pytest.mark.parametrize("part", [".model.", ".optimizer."])
def test_a_flipped_byte_in_a_mapped_file_falls_back_with_its_reason(tmp_path, part):
    held = save_steps(tmp_path, {1: 1, 2: 2})
    flip(tmp_path / "step-00000002", part)
    model, opt = make(5)
    with pytest.warns(Warning, match=r"step-00000002.*tensors\.safetensors does not match its xxh3_128 digest"):
        got = load(tmp_path, {"model": model, "optimizer": opt, "step": None})
    assert got.step == 1
    assert tensors_equal(snapshot(model, opt), held[1])  # the older checkpoint overwrote every landed byte


def test_the_only_mapped_checkpoint_damaged_raises_naming_the_digest(tmp_path):
    save_steps(tmp_path, {1: 1})
    flip(tmp_path / "step-00000001", ".optimizer.")
    model, opt = make(5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(NoValidCheckpointError, match=r"step-00000001.*digest"):
            load(tmp_path, {"model": model, "optimizer": opt})


def test_a_mapped_start_fresh_never_lands_in_the_model(tmp_path):
    save_steps(tmp_path, {1: 1})
    flip(tmp_path / "step-00000001", ".model.")
    model, opt = make(5)
    mine = snapshot(model, opt)
    with pytest.warns(Warning):
        assert load(tmp_path, {"model": model, "optimizer": opt}, if_none_valid="start_fresh") is None
    assert tensors_equal(snapshot(model, opt), mine)


def test_mapped_and_read_storages_hold_the_same_bytes_and_refuse_the_same_damage(tmp_path):
    save_steps(tmp_path, {1: 1})
    ckpt = tmp_path / "step-00000001"
    path = ckpt / "tensors.safetensors"
    expected = ("xxh3_128", digest.hash_file(path, "xxh3_128")[1])
    model, _ = make(3)
    with open(path, "rb") as f:
        _, entries, _ = tensorfile.read_header(path, f)
    name = next(n for n in entries if ".model." in n)
    target = torch.empty(entries[name][3] - entries[name][2], dtype=torch.uint8).untyped_storage()
    read = tensorfile.read_storages(path, mmap=False, expected=expected)
    mapped = tensorfile.read_storages(path, mmap=True, expected=expected, into=lambda e: {name: target})
    assert mapped[name].data_ptr() == target.data_ptr()
    assert set(read) == set(mapped) == set(entries)
    for n in entries:
        assert bytes(read[n]) == bytes(mapped[n]), n
    flip(ckpt, ".optimizer.")
    for mmap in (False, True):
        with pytest.raises(CheckpointError, match=r"tensors\.safetensors does not match its xxh3_128 digest"):
            tensorfile.read_storages(path, mmap=mmap, expected=expected, into=lambda e: {name: target})
