"""Stores written by earlier versions of saverules still load, bit for bit.

tests/fixtures/store-v1-{torch,safetensors} were written by the format
version 1 writer (tests/fixtures/make_store_v1.py); expected.json beside each
holds the state the writer saw, as exact numbers.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

import saverules
from saverules.torch import Checkpointer, restore_rng_state, scan

FIXTURES = Path(__file__).resolve().parents[1] / "helpers" / "fixtures"

POLICY = """
version = 1
final = false
[[rules]]
kind = "every_steps"
every = 1
[storage]
format = "{fmt}"
"""


def tensor_of(spec) -> torch.Tensor:
    dtype = getattr(torch, spec["dtype"].replace("torch.", ""))
    return torch.tensor(spec["values"], dtype=dtype).reshape(spec["shape"])


def assert_same(loaded, spec, where=""):
    if isinstance(loaded, torch.Tensor):
        want = tensor_of(spec)
        assert loaded.dtype == want.dtype and loaded.shape == want.shape, where
        assert torch.equal(loaded, want), where
    elif isinstance(loaded, dict):
        assert sorted(map(str, loaded)) == sorted(spec), where
        for k, v in loaded.items():
            assert_same(v, spec[str(k)], f"{where}[{k!r}]")
    else:
        assert loaded == spec, where


def fresh_model():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return model, torch.optim.AdamW(model.parameters(), lr=0.01)


@pytest.mark.parametrize("written_as", ["torch", "safetensors"])
@pytest.mark.parametrize("read_as", ["torch", "safetensors"])
def test_a_version_1_store_loads(tmp_path, written_as, read_as):
    store = tmp_path / "store"
    shutil.copytree(FIXTURES / f"store-v1-{written_as}", store)  # a store is written into when opened
    expected = json.loads((store / "expected.json").read_text())
    infos = scan(store)
    assert [(i.step, i.verified, i.format) for i in infos] == [(1, True, written_as), (2, True, written_as)]

    model, opt = fresh_model()
    state = {"model": model, "optimizer": opt, "position": None, "note": None, "rng": None}
    ck = Checkpointer(saverules.loads(POLICY.format(fmt=read_as)), store)
    progress = ck.load_latest(state)
    assert progress.step == 2 and progress.metrics is not None and "loss" in progress.metrics
    want = expected["2"]
    assert_same(model.state_dict(), want["model"], "model")
    assert_same(opt.state_dict()["state"], want["optimizer_state"], "optimizer")
    assert state["position"] == want["position"] and state["note"] == want["note"]
    restore_rng_state(state["rng"])
    assert torch.rand(3).tolist() == want["draws_after_rng"]["torch"]
    assert [random.random() for _ in range(3)] == want["draws_after_rng"]["python"]

    # The resumed store goes on saving next to the old checkpoints, in the format of the day.
    ck.step(saverules.Progress(3), state)
    ck.close()
    assert [i.step for i in scan(store) if i.ok] == [1, 2, 3]


def test_a_damaged_version_1_checkpoint_falls_back_to_the_previous_one(tmp_path):
    store = tmp_path / "store"
    shutil.copytree(FIXTURES / "store-v1-torch", store)
    path = store / "step-00000002" / "state.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    model, opt = fresh_model()
    state = {"model": model, "optimizer": opt, "position": None, "note": None, "rng": None}
    with pytest.warns(saverules.torch.CheckpointWarning, match="does not match its sha256"):
        progress = Checkpointer(saverules.loads(POLICY.format(fmt="torch")), store).load_latest(state)
    assert progress.step == 1
    assert_same(model.state_dict(), json.loads((store / "expected.json").read_text())["1"]["model"], "model")
