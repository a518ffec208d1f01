"""A resume of the tensors format reads a plain module's tensors straight into its memory, and stays safe:
the bytes of a checkpoint that fails its digest never survive into the resumed state."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from store_common import EVERY_2, policy, tensors_equal

from saverules import Progress
from saverules.store import resume
from saverules.store.formats import in_place, tensorfile
from saverules.store.verify import VerifyCache
from saverules.torch import Checkpointer, CheckpointError, NoValidCheckpointError

EVERY_1 = EVERY_2.replace("every = 2", "every = 1")


def make(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(5, 16)).sum().backward()
    opt.step()
    return model, opt


def snapshot(model, opt):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {i: {k: v.clone() for k, v in s.items()} for i, s in opt.state_dict()["state"].items()})


def save_steps(root: Path, seeds: dict[int, int]) -> dict[int, tuple]:
    """Save a checkpoint of a different model + optimizer at each step; the state each held."""
    held = {}
    ck = Checkpointer(policy(EVERY_1, fmt="tensors"), root)
    for step, seed in seeds.items():
        model, opt = make(seed)
        ck.save(Progress(step), {"model": model, "optimizer": opt, "step": step})
        held[step] = snapshot(model, opt)
    ck.close()
    return held


def flip_model_byte(ckpt: Path) -> None:
    """Flip one byte inside the first model entry's data of tensors.safetensors (sizes stay right)."""
    path = ckpt / "tensors.safetensors"
    with open(path, "rb") as f:
        start, entries, _ = tensorfile.read_header(path, f)
    name = next(n for n in entries if ".model." in n)
    at = start + entries[name][2] + 5
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0xFF]))


def ptrs(model) -> dict[str, int]:
    return {k: v.data_ptr() for k, v in model.state_dict().items()}


def test_the_read_lands_in_the_modules_memory_and_restores_exactly(tmp_path):
    held = save_steps(tmp_path, {1: 1})
    model, opt = make(7)
    state = {"model": model, "optimizer": opt, "step": None}
    found = resume.load_latest(tmp_path, VerifyCache(), lambda info: None, "raise", "cpu", False, state)
    assert found is not None
    payload = found[1]
    for k, t in payload.objects["model"].items():  # the decoded tensors are views of the parameters' own memory
        assert t.untyped_storage().data_ptr() == model.state_dict()[k].untyped_storage().data_ptr(), k
    assert tensors_equal(snapshot(model, opt)[0], held[1][0])  # the bytes landed before load_state_dict
    model2, opt2 = make(8)
    assert Checkpointer(policy(EVERY_1, fmt="tensors"), tmp_path).load_latest(
        {"model": model2, "optimizer": opt2, "step": None}).step == 1
    assert ptrs(model2) != ptrs(model)
    assert tensors_equal(snapshot(model2, opt2), held[1])


def test_checkpointer_resume_keeps_the_parameters_and_restores_optimizer_and_values(tmp_path):
    held = save_steps(tmp_path, {1: 1})
    model, opt = make(3)
    before = ptrs(model)
    state = {"model": model, "optimizer": opt, "step": None}
    Checkpointer(policy(EVERY_1, fmt="tensors"), tmp_path).load_latest(state)
    assert ptrs(model) == before
    assert state["step"] == 1
    assert tensors_equal(snapshot(model, opt), held[1])


def test_a_flipped_byte_falls_back_and_the_older_checkpoint_overwrites_every_damaged_byte(tmp_path):
    held = save_steps(tmp_path, {1: 1, 2: 2})
    flip_model_byte(tmp_path / "step-00000002")
    model, opt = make(5)
    with pytest.warns(Warning, match=r"step-00000002.*digest"):
        got = Checkpointer(policy(EVERY_1, fmt="tensors"), tmp_path).load_latest(
            {"model": model, "optimizer": opt, "step": None})
    assert got.step == 1
    assert tensors_equal(snapshot(model, opt), held[1])


def test_the_only_checkpoint_damaged_raises(tmp_path):
    save_steps(tmp_path, {1: 1})
    flip_model_byte(tmp_path / "step-00000001")
    model, opt = make(5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(NoValidCheckpointError, match="digest"):
            Checkpointer(policy(EVERY_1, fmt="tensors"), tmp_path).load_latest({"model": model, "optimizer": opt})


def test_start_fresh_reads_into_fresh_memory_so_a_damaged_checkpoint_leaves_the_model_as_it_was(tmp_path):
    save_steps(tmp_path, {1: 1})
    flip_model_byte(tmp_path / "step-00000001")
    model, opt = make(5)
    mine = snapshot(model, opt)
    with pytest.warns(Warning):
        got = Checkpointer(policy(EVERY_1, fmt="tensors"), tmp_path).load_latest(
            {"model": model, "optimizer": opt}, if_none_valid="start_fresh")
    assert got is None
    assert tensors_equal(snapshot(model, opt), mine)


def test_a_fallback_that_does_not_restore_the_model_is_an_error_not_damaged_weights(tmp_path):
    ck = Checkpointer(policy(EVERY_1, fmt="tensors"), tmp_path)
    ck.save(Progress(1), {"other": torch.nn.Linear(2, 2)})
    model, opt = make(1)
    ck.save(Progress(2), {"model": model, "optimizer": opt})
    ck.close()
    flip_model_byte(tmp_path / "step-00000002")
    model, opt = make(5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CheckpointError, match=r"step-00000002 failed while being read.*'model'.*Re-create"):
            Checkpointer(policy(EVERY_1, fmt="tensors"), tmp_path).load_latest({"model": model, "optimizer": opt})


class Renaming(torch.nn.Module):
    """A module whose loading is not a plain copy (it scales what it loads): never read in place."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(4, 4))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict = {k: (v * 2 if k.startswith(prefix) else v) for k, v in state_dict.items()}
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class Tied(torch.nn.Module):
    """Input and output weights tied (one storage behind two names), a plain linear between them."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(11, 6)
        self.mid = torch.nn.Linear(6, 6)
        self.out = torch.nn.Linear(6, 11, bias=False)
        self.out.weight = self.emb.weight


def test_modules_whose_loading_is_not_a_plain_copy_or_that_tie_weights_load_as_before(tmp_path):
    torch.manual_seed(0)
    custom, tied, hooked = Renaming(), Tied(), torch.nn.Linear(3, 3)
    hooked.register_load_state_dict_pre_hook(lambda *a, **k: None)
    ck = Checkpointer(policy(EVERY_1, fmt="tensors"), tmp_path)
    ck.save(Progress(1), {"custom": custom, "tied": tied, "hooked": hooked})
    ck.close()
    assert not in_place.plain_module(custom) and not in_place.plain_module(hooked) and in_place.plain_module(tied)
    saved = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in
             (("custom", custom), ("tied", tied), ("hooked", hooked))}
    torch.manual_seed(1)
    c2, t2, h2 = Renaming(), Tied(), torch.nn.Linear(3, 3)
    h2.register_load_state_dict_pre_hook(lambda *a, **k: None)
    state = {"custom": c2, "tied": t2, "hooked": h2}
    found = resume.load_latest(tmp_path, VerifyCache(), lambda info: None, "raise", "cpu", False, state)
    assert found is not None
    objects = found[1].objects
    for name, mod in state.items():
        for k, t in objects[name].items():
            if name == "tied" and k.startswith("mid."):  # the untied part of a tied model lands in place
                assert t.untyped_storage().data_ptr() == mod.state_dict()[k].untyped_storage().data_ptr(), k
                continue
            assert t.untyped_storage().data_ptr() != mod.state_dict()[k].untyped_storage().data_ptr(), (name, k)
    Checkpointer(policy(EVERY_1, fmt="tensors"), tmp_path).load_latest(state)
    assert tensors_equal(t2.state_dict(), saved["tied"])
    assert t2.out.weight is t2.emb.weight
    assert tensors_equal(h2.state_dict(), saved["hooked"])
    assert tensors_equal(c2.weight.detach(), saved["custom"]["weight"] * 2)  # its own loading ran


def test_a_map_location_other_than_cpu_leaves_the_memory_alone(tmp_path):
    save_steps(tmp_path, {1: 1})
    model, opt = make(5)
    state = {"model": model, "optimizer": opt}
    found = resume.load_latest(tmp_path, VerifyCache(), lambda info: None, "raise", {"cuda:0": "cpu"}, False, state)
    assert found is not None
    for k, t in found[1].objects["model"].items():
        assert t.untyped_storage().data_ptr() != model.state_dict()[k].untyped_storage().data_ptr()
    # (a mapped resume lands in place too: tests/store/test_resume_mmap_digest.py)
