"""Every format's round trip, and the "tensors" format's file: dtypes, views, damage, safety.

Round trips go through the real store (Checkpointer.save, then load_latest
in a new Checkpointer) and, for the tensors format, through the format
interface directly with Hypothesis-generated states.
"""
from __future__ import annotations

import collections
import json
import os
import pickle
import struct
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as hs
from store_common import checkpoint_dirs, hidden_entries, policy

from saverules import Progress
from saverules.store import (
    Checkpointer,
    CheckpointError,
    CheckpointVerifyError,
    CheckpointWarning,
    NoValidCheckpointError,
    StateTypeError,
    formats,
    verify,
    writer,
)
from saverules.store.formats import tensorfile
from saverules.store.formats.tensors_format import TENSORS_FILE
from saverules.store.state import Payload

FORMATS = ["tensors", "torch", "safetensors"]


def raw(t: torch.Tensor) -> bytes:
    """The bytes of a tensor's elements in order (bitwise, for every dtype, NaN payloads included)."""
    return t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()


def same(a, b, where="state") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert (a.dtype, tuple(a.shape)) == (b.dtype, tuple(b.shape)), where
        assert raw(a) == raw(b), where
        assert a.requires_grad == b.requires_grad and type(a) is type(b), where
    elif isinstance(a, dict):
        assert type(a) is type(b) and list(a) == list(b), where
        for k in a:
            same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}[{i}]")
    else:
        assert type(a) is type(b) and (a == b or (a != a and b != b)), where


def dtypes():
    names = ["float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
             "complex64", "complex128", "float8_e4m3fn", "float8_e5m2", "uint16", "uint32", "uint64"]
    return [getattr(torch, n) for n in names if hasattr(torch, n)]


def filled(dtype: torch.dtype, shape, seed: int) -> torch.Tensor:
    """A tensor of ``dtype`` whose bytes are random (so any bit pattern of the dtype)."""
    numel = 1
    for d in shape:
        numel *= d
    nbytes = numel * torch.empty(0, dtype=dtype).element_size()
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g)
    if dtype == torch.bool:
        return (data % 2).bool().reshape(shape)
    return data.view(dtype).reshape(shape)


class Holder:
    def __init__(self, sd):
        self.sd = sd

    def state_dict(self):
        return self.sd

    def load_state_dict(self, sd):
        self.sd = sd


def table_state():
    base = torch.arange(24.0).reshape(4, 6)
    values = {f"dt_{str(d).replace('torch.', '')}": filled(d, (3, 2), i) for i, d in enumerate(dtypes())}
    values.update({
        "zero_d": torch.tensor(3.5),
        "zero_d_int": torch.tensor(7),
        "empty": torch.zeros(0, 4),
        "empty_int": torch.zeros(2, 0, dtype=torch.int64),
        "transposed": base.t(),
        "strided": base[:, ::2],
        "row": base[1],
        "base": base,
        "grad": torch.ones(3, requires_grad=True),
        "nested": {"list": [torch.tensor([1, 2]), 3, "x", None, b"\x00\xff"],
                   "tuple": (torch.tensor([True]), 2.5, float("inf")), 4: {"deep": torch.ones(1)}},
        "plain": {"size": torch.Size([2, 3]), "dtype": torch.bfloat16, "device": torch.device("cpu")},
    })
    return values


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_dtype_view_and_nesting_round_trips(tmp_path, fmt):
    values = table_state()
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    state = {"model": model, "optimizer": opt, "values": values, "ema": Holder({"w": torch.randn(3)})}
    Checkpointer(policy(fmt=fmt), tmp_path).save(Progress(1), state)

    model2 = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.1)
    back = {"model": model2, "optimizer": opt2, "values": None, "ema": Holder(None)}
    assert Checkpointer(policy(fmt=fmt), tmp_path).load_latest(back).step == 1
    same(model.state_dict(), model2.state_dict(), "model")
    same(opt.state_dict(), opt2.state_dict(), "optimizer")  # nested: state -> param id -> step / moments
    same(values, back["values"], "values")
    same(state["ema"].sd, back["ema"].sd, "ema")
    got = back["values"]  # (plain values stay out of the safetensors format's weights file)
    assert got["transposed"].stride() == values["transposed"].stride()
    ptr = got["base"].untyped_storage().data_ptr()
    assert all(got[k].untyped_storage().data_ptr() == ptr for k in ("transposed", "strided", "row"))
    got["base"][1, 0] = -1.0  # still views of one another, as they were
    assert got["row"][0] == -1.0 and got["transposed"][0, 1] == -1.0


def test_tied_weights_stay_tied_in_the_tensors_format(tmp_path):
    from store_common import TiedNet

    net = TiedNet()
    Checkpointer(policy(fmt="tensors"), tmp_path).save(Progress(1), {"model": net})
    header = json.loads(_header(tmp_path / "step-00000001" / TENSORS_FILE))
    assert sum(1 for k in header if k.endswith("emb.weight") or k.endswith("out.weight")) == 1  # stored once
    net2 = TiedNet()
    Checkpointer(policy(fmt="tensors"), tmp_path).load_latest({"model": net2})
    assert net2.out.weight is net2.emb.weight and torch.equal(net2.emb.weight, net.emb.weight)


def test_meta_tensors_are_refused_with_a_clear_error(tmp_path):
    ck = Checkpointer(policy(fmt="tensors"), tmp_path)
    with pytest.raises(StateTypeError, match=r"state\['w'\]: a tensor on the meta device has no data"):
        ck.save(Progress(1), {"w": torch.empty(3, device="meta")})
    d = tmp_path / "direct"
    d.mkdir()
    payload = Payload(1, {}, {"w": torch.empty(2, device="meta")}, None, 0.0)
    with pytest.raises(StateTypeError, match="meta device"):
        formats.get("tensors").encode(payload, formats.Output(d, writer.write_file))
    assert checkpoint_dirs(tmp_path) == ["direct"] and hidden_entries(tmp_path) == []


# -- the format interface, with generated states ------------------------------------------------

_DT = hs.sampled_from(dtypes())
_SHAPES = hs.lists(hs.integers(0, 4), min_size=0, max_size=3)


@hs.composite
def tensors(draw):
    dtype, shape, seed = draw(_DT), draw(_SHAPES), draw(hs.integers(0, 1000))
    t = filled(dtype, shape, seed)
    kind = draw(hs.sampled_from(["plain", "transpose", "slice", "expand"]))
    if kind == "transpose" and t.dim() >= 2:
        t = t.transpose(0, 1)
    elif kind == "slice" and t.dim() >= 1 and t.shape[0] > 1:
        t = t[1:]
    elif kind == "expand" and t.dim() == 1 and t.shape[0] == 1:
        t = t.expand(3)
    return t


leaves = hs.one_of(tensors(), hs.integers(-2**63, 2**63 - 1), hs.floats(allow_nan=True), hs.text(max_size=5),
                   hs.binary(max_size=5), hs.none(), hs.booleans())
trees = hs.recursive(
    leaves,
    lambda c: hs.one_of(hs.lists(c, max_size=3), hs.lists(c, max_size=3).map(tuple),
                        hs.dictionaries(hs.one_of(hs.text(max_size=4), hs.integers(-5, 5)), c, max_size=3),
                        hs.dictionaries(hs.text(max_size=4), c, max_size=3).map(collections.OrderedDict)),
    max_leaves=8,
)


def _encode_decode(directory: Path, values, mmap: bool):
    fmt = formats.get("tensors")
    directory.mkdir()
    payload = Payload(7, {"opt": {"state": {0: {"exp_avg": torch.ones(2)}}}}, values, {"v": 1}, 1.5)
    enc = fmt.encode(payload, formats.Output(directory, writer.write_file))
    assert set(enc.files) == {"state.pt", TENSORS_FILE}
    source = formats.Source(directory, 7, enc.files, enc.metadata)
    assert fmt.check_index(source)
    return fmt.decode(source, "cpu", mmap=mmap)


@settings(max_examples=40)
@given(values=hs.dictionaries(hs.text(min_size=1, max_size=4), trees, max_size=4), mmap=hs.booleans(),
       share=hs.booleans())
def test_any_state_round_trips_through_the_tensors_format(tmp_path_factory, values, mmap, share):
    if share:  # two views of one storage next to the rest
        base = torch.arange(6, dtype=torch.int16)
        values = dict(values, a=base[:4], b=base[2:])
    back = _encode_decode(tmp_path_factory.mktemp("fmt") / "ck", values, mmap)
    same(values, back.values)
    assert back.step == 7 and back.clock == 1.5 and back.decider == {"v": 1}
    if share:
        assert back.values["a"].untyped_storage().data_ptr() == back.values["b"].untyped_storage().data_ptr()


def test_a_file_of_safetensors_dtypes_opens_with_safetensors(tmp_path):
    from safetensors import safe_open

    values = {"w": torch.randn(3, 4), "b": torch.arange(5), "h": torch.ones(2, dtype=torch.bfloat16)}
    _encode_decode(tmp_path / "ck", values, False)
    with safe_open(str(tmp_path / "ck" / TENSORS_FILE), "pt") as f:
        loaded = {k: f.get_tensor(k) for k in f.keys()}
    assert {raw(t) for t in loaded.values()} >= {raw(t) for t in values.values()}


def test_entries_start_at_a_multiple_of_their_element_size(tmp_path):
    values = {"a": torch.ones(3, dtype=torch.int8), "b": torch.ones(1, dtype=torch.float64),
              "c": torch.ones(3, dtype=torch.float16), "d": torch.ones(1, dtype=torch.complex128)}
    _encode_decode(tmp_path / "ck", values, True)
    path = tmp_path / "ck" / TENSORS_FILE
    with open(path, "rb") as f:
        start, entries, _ = tensorfile.read_header(path, f)
    assert start % 64 == 0
    for dtype, _, begin, _ in entries.values():
        assert (start + begin) % torch.empty(0, dtype=dtype).element_size() == 0


# -- damage ------------------------------------------------------------------------------------


def _header(path: Path) -> bytes:
    data = path.read_bytes()
    return data[8: 8 + int.from_bytes(data[:8], "little")]


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _data_offset(path: Path) -> int:
    return 8 + len(_header(path)) + 3


def _header_offset(path: Path) -> int:
    return 8 + _header(path).index(b'"shape":[') + len('"shape":[')  # a digit of a shape


DAMAGE = {
    "flipped data byte": lambda p: _flip(p, _data_offset(p)),
    "flipped header byte": lambda p: _flip(p, _header_offset(p)),
    "truncated": lambda p: os.truncate(p, p.stat().st_size - 5),
}


def _state(v: float):
    return {"w": torch.full((64, 64), v), "opt": {"m": torch.full((10,), v)}, "n": int(v)}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damage_to_a_committed_tensors_file_is_caught_on_resume(tmp_path, damage):
    ck = Checkpointer(policy(fmt="tensors", text="version = 1\nfinal = false\n"), tmp_path)
    ck.save(Progress(1), _state(1.0))
    ck.save(Progress(2), _state(2.0))
    path = tmp_path / "step-00000002" / TENSORS_FILE
    DAMAGE[damage](path)
    # the shallow check (sizes and structure) sees truncation and a damaged header; the digest check
    # (what a resume uses) sees every damage
    shallow = verify.inspect_checkpoint(path.parent, verify=False)
    assert shallow.ok == (damage == "flipped data byte")
    assert not verify.inspect_checkpoint(path.parent, verify=True).ok
    back = {"w": None, "opt": None, "n": None}
    with pytest.warns(CheckpointWarning, match="step-00000002.*falling back"):
        p = Checkpointer(policy(fmt="tensors", text="version = 1\nfinal = false\n"), tmp_path).load_latest(back)
    assert p.step == 1 and back["n"] == 1 and torch.equal(back["w"], torch.full((64, 64), 1.0))


# Which save-time verify mode claims to catch which damage done between writing and the check.
CLAIMS = {
    "none": set(),
    "hash": {"flipped header byte", "truncated"},
    "device": {"flipped data byte", "flipped header byte", "truncated"},
    "load": {"flipped data byte", "flipped header byte", "truncated"},
}


@pytest.mark.parametrize("mode", list(CLAIMS))
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damage_before_the_check_is_caught_by_every_mode_that_claims_it(tmp_path, monkeypatch, mode, damage):
    real = writer.write_file

    def write_then_damage(path, producer, *args):
        entry = real(path, producer, *args)
        if path.endswith(TENSORS_FILE):
            DAMAGE[damage](Path(path))  # the file now holds other bytes than were written
        return entry

    monkeypatch.setattr(writer, "write_file", write_then_damage)
    ck = Checkpointer(policy(fmt="tensors", text="version = 1\nfinal = false\n"), tmp_path, verify=mode)
    if damage in CLAIMS[mode]:
        with pytest.raises(CheckpointVerifyError, match="not committed"):
            ck.save(Progress(1), _state(1.0))
        assert checkpoint_dirs(tmp_path) == [] and hidden_entries(tmp_path) == []
    else:
        with warnings.catch_warnings(record=True):  # retention may already see a cut file
            warnings.simplefilter("always")
            ck.save(Progress(1), _state(1.0))  # not what this mode checks at save time...
        monkeypatch.undo()
        with pytest.warns(CheckpointWarning, match="falling back"):  # ...but a resume never takes it,
            with pytest.raises(NoValidCheckpointError, match="none of them can be resumed"):  # nor starts over
                Checkpointer(policy(fmt="tensors"), tmp_path).latest()


# -- safety --------------------------------------------------------------------------------------


class Boom:
    def __reduce__(self):
        return (os.system, ("echo owned > /dev/null",))


def test_a_planted_structure_file_is_refused_unread(tmp_path):
    from saverules.store import UnsafeCheckpointError

    ck = Checkpointer(policy(fmt="tensors"), tmp_path)
    ck.save(Progress(1), _state(1.0))
    d = tmp_path / "step-00000001"
    structure = torch.load(d / "state.pt", weights_only=True)
    structure["tree"] = ["V", Boom()]
    torch.save(structure, d / "state.pt", pickle_module=pickle)
    m = json.loads((d / "manifest.json").read_text())
    import xxhash

    data = (d / "state.pt").read_bytes()
    m["files"]["state.pt"] = {"size": len(data), "xxh3_128": xxhash.xxh3_128(data).hexdigest()}
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UnsafeCheckpointError, match="refused to load"):
        Checkpointer(policy(fmt="tensors"), tmp_path).load_latest({"w": None, "opt": None, "n": None})


@pytest.mark.parametrize("header, why", [
    ({"__metadata__": {"format": "saverules-tensors"}, "x": {"dtype": "PYOBJ", "shape": [1], "data_offsets": [0, 1]}},
     "unknown dtype"),
    ({"__metadata__": {"format": "saverules-tensors"}, "x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}},
     "has 4 bytes for its shape"),
    ({"__metadata__": {"format": "saverules-tensors"}, "x": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}},
     "truncated"),
    ({"x": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}, "not a saverules tensors file"),
])
def test_a_malformed_header_is_a_clear_error(tmp_path, header, why):
    text = json.dumps(header).encode()
    path = tmp_path / TENSORS_FILE
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"\x01")
    with pytest.raises(CheckpointError, match=why):
        tensorfile.read_storages(path)


def test_mmap_load_gives_the_same_state(tmp_path):
    state = _state(3.0)
    Checkpointer(policy(fmt="tensors"), tmp_path).save(Progress(1), state)
    for mmap in (False, True):
        back = {"w": None, "opt": None, "n": None}
        Checkpointer(policy(fmt="tensors"), tmp_path).load_latest(back, mmap=mmap)
        same(state, back)
        back["w"][0, 0] = 9.0  # copy-on-write: the file is not changed
    assert Checkpointer(policy(fmt="tensors"), tmp_path).latest().verified is True
    with pytest.raises(ValueError, match="mmap must be True or False"):
        Checkpointer(policy(fmt="tensors"), tmp_path).load_latest({}, mmap="yes")


def test_a_resume_reads_the_tensor_file_once_and_checks_its_digest_as_it_reads(tmp_path, monkeypatch):
    from saverules.store import digest

    state = _state(4.0)
    Checkpointer(policy(fmt="tensors"), tmp_path).save(Progress(1), state)
    reread = []
    real = digest.hash_file
    monkeypatch.setattr(digest, "hash_file", lambda path, *a, **k: reread.append(Path(path).name) or real(path, *a, **k))
    ck = Checkpointer(policy(fmt="tensors"), tmp_path)
    back = {"w": None, "opt": None, "n": None}
    assert ck.load_latest(back).step == 1
    same(state, back)
    assert reread == ["state.pt"]  # the structure before unpickling it; the data only by the reader
    info = ck.latest()  # the checks made while reading count as a verification
    assert info.verified is True and reread == ["state.pt"]


def test_an_empty_slice_past_its_empty_storage_round_trips(tmp_path):
    # t[1:] of a (2, 0) tensor has storage offset 1 over a storage of 0 bytes: valid, and holding nothing.
    t = torch.zeros((2, 0), dtype=torch.float64)[1:]
    assert t.storage_offset() == 1 and t.untyped_storage().nbytes() == 0
    back = _encode_decode(tmp_path / "ck", {"e": t}, False)
    assert back.values["e"].shape == (1, 0) and back.values["e"].dtype == torch.float64
