"""The safetensors format: weights split out, ties kept, every dtype written by our own writer."""
from __future__ import annotations

import collections
import json
import os

import torch
from store_common import (
    TiedNet,
    policy,
    tensors_equal,
)

import saverules.torch as st
from saverules import Progress
from saverules.store.formats import safetensors_file
from saverules.torch import (
    Checkpointer,
)

# --------------------------------------------------------------------------
# Formats
# --------------------------------------------------------------------------


def test_safetensors_format_splits_weights_and_keeps_ties(tmp_path):
    from safetensors import safe_open

    torch.manual_seed(0)
    net = TiedNet()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.tensor([1, 2, 3])).sum().backward()
    opt.step()
    base = torch.arange(10.0)
    ema = {"w": torch.randn(4), "first": base[:5], "second": base[5:], "strided": base[::3]}
    pol = policy(fmt="safetensors")
    ck = Checkpointer(pol, tmp_path)
    ck.save(Progress(1), {"model": net, "optimizer": opt, "ema": _Holder(ema), "step_count": 1})
    d = tmp_path / "step-00000001"
    assert sorted(os.listdir(d)) == ["manifest.json", "model.safetensors", "state.pt"]
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.emb.weight" in keys and "model.out.weight" not in keys  # the tie is stored once
    assert {"ema.first", "ema.second", "ema.strided", "ema.w"} <= keys
    assert "model.norm.num_batches_tracked" in keys
    payload = torch.load(d / "state.pt", weights_only=True)
    assert payload["objects"]["model"] is None and "state" in payload["objects"]["optimizer"]
    m = json.loads((d / "manifest.json").read_text())
    assert m["storage_format"] == "safetensors" and set(m["files"]) == {"state.pt", "model.safetensors"}

    torch.manual_seed(1)
    net2 = TiedNet()
    opt2 = torch.optim.SGD(net2.parameters(), lr=0.1, momentum=0.9)
    holder = _Holder(None)
    Checkpointer(pol, tmp_path).load_latest({"model": net2, "optimizer": opt2, "ema": holder, "step_count": 0})
    assert tensors_equal(net.state_dict(), net2.state_dict())
    assert net2.out.weight is net2.emb.weight
    assert tensors_equal(opt.state_dict(), opt2.state_dict())
    assert tensors_equal(holder.sd, ema)
    assert holder.sd["first"].untyped_storage().data_ptr() != holder.sd["second"].untyped_storage().data_ptr()


def test_safetensors_writer_round_trips_every_dtype_and_shape(tmp_path):
    import io

    from safetensors import safe_open
    from safetensors.torch import load, load_file

    g = torch.Generator().manual_seed(3)
    weights = {
        "f64": torch.randn(3, 2, dtype=torch.float64, generator=g),
        "f32": torch.randn(5, generator=g),
        "f16": torch.randn(2, 2, generator=g).half(),
        "bf16": torch.randn(7, generator=g).bfloat16(),
        "i64": torch.arange(-3, 3),
        "i32": torch.arange(4, dtype=torch.int32).reshape(2, 2),
        "i16": torch.tensor([-7, 9], dtype=torch.int16),
        "i8": torch.tensor([-128, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "f8": torch.tensor([0.5, -2.0]).to(torch.float8_e4m3fn),
        "strided": torch.arange(12.0).reshape(3, 4).t(),
        "grad": torch.ones(2, requires_grad=True),
    }
    buf = io.BytesIO()
    safetensors_file.write(buf, weights, {"format": "pt"})
    data = buf.getvalue()
    header_len = int.from_bytes(data[:8], "little")
    assert header_len % 8 == 0
    back = load(data)
    assert back.keys() == weights.keys()
    for k, t in weights.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape, k
        raw = lambda x: x.detach().contiguous().reshape(-1).view(torch.uint8)  # noqa: E731 - bitwise compare
        assert torch.equal(raw(back[k]), raw(t)), k
    (tmp_path / "w.safetensors").write_bytes(data)
    with safe_open(str(tmp_path / "w.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert torch.equal(load_file(str(tmp_path / "w.safetensors"))["bf16"], weights["bf16"])


class _Holder:
    """An object with state_dict/load_state_dict around a plain dict of tensors."""

    def __init__(self, sd):
        self.sd = sd

    def state_dict(self):
        return self.sd

    def load_state_dict(self, sd):
        self.sd = sd


def test_safetensors_state_dict_metadata_survives(tmp_path):
    net = TiedNet()
    Checkpointer(policy(fmt="safetensors"), tmp_path).save(Progress(1), {"model": net})
    payload = st.read_checkpoint(Checkpointer(policy(fmt="safetensors"), tmp_path).latest(), "cpu")
    sd = payload.objects["model"]
    assert type(sd) is collections.OrderedDict
    assert sd._metadata == net.state_dict()._metadata
    assert list(sd) == list(net.state_dict())
