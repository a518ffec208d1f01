"""One judgement of a checkpoint everywhere (issue 16, items 4, 5 and 6).

A ``tensors.safetensors`` whose header is forged, with the manifest's digest
recomputed to match, is refused the same way by ``load_latest``, ``ls``,
``Checkpointer.latest()``, ``list()`` and retention.  Every case uses real
files written by a real Checkpointer and ``ls`` in a real subprocess.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from store_common import REPO, policy

from saverules import Progress
from saverules.store.structure import MAX_DEPTH
from saverules.torch import Checkpointer, CheckpointWarning, StateTypeError, inspect_checkpoint

TENSORS = "tensors.safetensors"


def small_state(value: float) -> dict:
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.fill_(value)
        model.bias.fill_(-value)
    return {"model": model, "value": value}


def three_saves(directory: Path) -> None:
    ck = Checkpointer(policy(fmt="tensors"), directory)
    for s in (1, 2, 3):
        ck.save(Progress(s, time=float(s)), small_state(float(s)))
    ck.close()


def rehash(d: Path, name: str) -> None:
    m = json.loads((d / "manifest.json").read_text())
    data = (d / name).read_bytes()
    m["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (d / "manifest.json").write_text(json.dumps(m))


def split(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def write(path: Path, header: bytes, body: bytes, length: int | None = None) -> None:
    header += b" " * (-(8 + len(header)) % 64)
    n = len(header) if length is None else length
    path.write_bytes(n.to_bytes(8, "little") + header + body)


def entries(header: dict) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def claims_a_petabyte(path: Path) -> None:
    header, body = split(path)
    write(path, json.dumps(header).encode(), body, length=10**15)


def claims_a_petabyte_entry(path: Path) -> None:
    header, body = split(path)
    last = entries(header)[-1]
    header[last] = {"dtype": "U8", "shape": [10**15], "data_offsets": [header[last]["data_offsets"][0],
                                                                        header[last]["data_offsets"][0] + 10**15]}
    write(path, json.dumps(header).encode(), body)


def overlaps(path: Path) -> None:
    header, body = split(path)
    a, b = entries(header)[:2]
    size = header[b]["data_offsets"][1] - header[b]["data_offsets"][0]
    header[b]["data_offsets"] = [header[a]["data_offsets"][0], header[a]["data_offsets"][0] + size]
    write(path, json.dumps(header).encode(), body)


def past_the_file(path: Path) -> None:
    header, body = split(path)
    write(path, json.dumps(header).encode(), body[:-4])


def unknown_dtype(path: Path) -> None:
    header, body = split(path)
    first = entries(header)[0]
    header[first]["dtype"] = "Q7"
    write(path, json.dumps(header).encode(), body)


def not_json(path: Path) -> None:
    header, body = split(path)
    write(path, json.dumps(header).encode()[:-3] + b"]]]", body)


FORGERIES = {
    "petabyte-length": (claims_a_petabyte, "claims"),
    "petabyte-entry": (claims_a_petabyte_entry, "bytes"),
    "overlap": (overlaps, "overlap"),
    "past-the-file": (past_the_file, "bytes"),
    "unknown-dtype": (unknown_dtype, "unknown dtype"),
    "not-json": (not_json, "not valid JSON"),
}


def ls_json(store: Path) -> tuple[int, dict]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "saverules.ls", "--json", str(store)], capture_output=True,
                          text=True, env=env, timeout=120)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, json.loads(proc.stdout)


@pytest.mark.parametrize("forgery", sorted(FORGERIES))
def test_every_reader_refuses_a_forged_tensors_header(tmp_path, forgery):
    store = tmp_path / "store"
    three_saves(store)
    d = store / "step-00000003"
    forge, reason = FORGERIES[forgery]
    forge(d / TENSORS)
    rehash(d, TENSORS)

    for deep in (True, False):
        info = inspect_checkpoint(d, store, verify=deep)
        assert info.verified is False and TENSORS in info.error and reason in info.error, info.error
    rc, data = ls_json(store)
    assert rc == 1
    assert [c["verified"] for c in data["checkpoints"]] == [True, True, False]
    ck = Checkpointer(policy(fmt="tensors"), store, read_only=True)
    with pytest.warns(CheckpointWarning, match=TENSORS):
        assert ck.latest().step == 2
    assert [i.ok for i in ck.list()] == [True, True, False]
    with pytest.warns(CheckpointWarning, match=TENSORS):
        assert Checkpointer(policy(fmt="tensors"), store, read_only=True).load_latest(small_state(0.0)).step == 2
    # retention counts only what verifies: keep_last = 1 keeps step 2 (and never deletes the forged 3)
    writer = Checkpointer(policy(fmt="tensors", extra="[retention]\nkeep_last = 1\n"), store)
    with pytest.warns(CheckpointWarning, match="not counted by retention"):
        writer.save(Progress(4, time=4.0), small_state(4.0))
    writer.close()
    assert sorted(p.name for p in store.iterdir() if p.name.startswith("step-")) == [
        "step-00000003", "step-00000004"]


def test_a_million_empty_entries_are_refused_quickly_by_what_the_structure_names(tmp_path):
    store = tmp_path / "store"
    three_saves(store)
    d = store / "step-00000003"
    header, body = split(d / TENSORS)
    last = entries(header)[-1]
    end = header[last]["data_offsets"][1]
    forged = {k: v for k, v in header.items()}
    text = json.dumps(forged).encode()[:-1]
    extra = b"".join(b',"e%d":{"dtype":"U8","shape":[0],"data_offsets":[%d,%d]}' % (i, end, end)
                     for i in range(1_000_000))
    write(d / TENSORS, text + extra + b"}", body)
    assert (d / TENSORS).stat().st_size > 50_000_000
    rehash(d, TENSORS)
    began = time.monotonic()
    info = inspect_checkpoint(d, store, verify=False)
    assert time.monotonic() - began < 2.0
    assert info.verified is False and "entries state.pt names need at most" in info.error, info.error
    with pytest.warns(CheckpointWarning, match="need at most"):
        assert Checkpointer(policy(fmt="tensors"), store, read_only=True).load_latest(small_state(0.0)).step == 2


def nested(depth: int) -> list:
    x: list = []
    for _ in range(depth):
        x = [x]
    return x


PLACEHOLDER = "saverules-test-placeholder"


def plant_deep_list(path: Path, depth: int) -> None:
    """Replace the string PLACEHOLDER in the pickle of ``path`` by a list nested ``depth`` deep.

    torch.save itself cannot write such a state (it recurses), so the opcodes are written by hand:
    ``depth`` EMPTY_LIST then ``depth - 1`` APPEND leave one list nested ``depth`` deep on the stack.
    """
    with zipfile.ZipFile(path) as z:
        records = [(i, z.read(i.filename)) for i in z.infolist()]
    text = PLACEHOLDER.encode()
    old = b"X" + len(text).to_bytes(4, "little") + text
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for info, data in records:
            if info.filename.endswith("/data.pkl"):
                assert data.count(old) == 1
                data = data.replace(old, b"]" * depth + b"a" * (depth - 1))
            z.writestr(info.filename, data)


@pytest.mark.parametrize("fmt", ["tensors", "torch"])
def test_a_forged_state_nested_20000_deep_falls_back_to_the_older_checkpoint(tmp_path, fmt):
    store = tmp_path / "store"
    ck = Checkpointer(policy(fmt=fmt), store)
    for s in (1, 2):
        ck.save(Progress(s, time=float(s)), {**small_state(float(s)), "note": PLACEHOLDER})
    ck.close()
    d = store / "step-00000002"
    plant_deep_list(d / "state.pt", 20_000)
    rehash(d, "state.pt")
    with pytest.warns(CheckpointWarning, match="deeper than"):
        assert Checkpointer(policy(fmt=fmt), store, read_only=True).load_latest(small_state(0.0)).step == 1
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "saverules.ls", "--load", str(store)], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "deeper than" in proc.stdout + proc.stderr


@pytest.mark.parametrize("on_error", ["raise", "warn"])
def test_saving_a_state_nested_too_deep_is_a_state_type_error_that_follows_on_error(tmp_path, on_error):
    ck = Checkpointer(policy(fmt="tensors"), tmp_path / "store", on_error=on_error)
    state = {"model": torch.nn.Linear(2, 2), "deep": nested(MAX_DEPTH + 300)}
    if on_error == "raise":
        with pytest.raises(StateTypeError, match="nests deeper than"):
            ck.save(Progress(1, time=1.0), state)
    else:
        with pytest.warns(CheckpointWarning, match="nests deeper than"):
            ck.save(Progress(1, time=1.0), state)
    ck.close()
    assert not list((tmp_path / "store").glob("step-*"))


@pytest.mark.parametrize("fmt", ["tensors", "torch", "safetensors"])
def test_a_state_nested_just_within_the_bound_saves_lists_and_loads(tmp_path, fmt):
    store = tmp_path / "store"
    ck = Checkpointer(policy(fmt=fmt), store)
    deep = nested(MAX_DEPTH - 2)  # state[...] is one level, the value the rest
    ck.save(Progress(2, time=2.0), {"model": torch.nn.Linear(2, 2), "deep": deep})
    ck.close()
    assert inspect_checkpoint(store / "step-00000002", store).ok
    state = {"model": torch.nn.Linear(2, 2), "deep": None}
    assert Checkpointer(policy(fmt=fmt), store, read_only=True).load_latest(state).step == 2
    assert state["deep"] == deep
