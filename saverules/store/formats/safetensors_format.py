"""The "safetensors" format: flat ``{name: tensor}`` state dicts in ``model.safetensors``, the rest in ``state.pt``.

Every ``state_dict()`` that is a flat mapping of names to tensors (models,
EMA weights) goes to ``model.safetensors``; tied weights (the same view of
one storage) are stored once and re-tied on load.  The optimizer, plain
values, the decider and the clock stay in a small ``state.pt``, whose
``safetensors`` entry says how to rebuild the state dicts.
"""
from __future__ import annotations

import collections
import copy as _copy
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import CheckpointError
from ..layout import STATE_FILE, WEIGHTS_FILE
from ..state import TENSOR_TYPES, Payload
from ..writer import tensors_in
from . import Encoded, FileEntry, Output, Source, safetensors_file, torchfile
from .torch_format import TorchFormat


def _is_weights_dict(sd: Any) -> bool:
    if type(sd) not in (dict, collections.OrderedDict) or not sd:
        return False
    for k, v in sd.items():
        if type(k) is not str or type(v) not in TENSOR_TYPES:
            return False
        if v.dtype not in safetensors_file.DTYPES or v.layout != torch.strided:
            return False
    return True


def split_weights(objects: dict[str, Any]):
    """Move plain ``{name: tensor}`` state dicts into one safetensors dict.

    Returns (tensors for the .safetensors file, layout to rebuild the state
    dicts, the objects that stay in the torch file).  Entries that are the
    same view of one storage (tied weights) are stored once; different views
    of one storage are copied apart, since safetensors refuses shared memory.
    """
    weights: dict[str, torch.Tensor] = {}
    layout: dict[str, Any] = {}
    rest: dict[str, Any] = {}
    views: dict[tuple, str] = {}
    by_storage: dict[tuple, list[str]] = {}
    used: set = set()
    for name, sd in objects.items():
        if not _is_weights_dict(sd):
            rest[name] = sd
            continue
        keys, stkeys = [], []
        for k, t in sd.items():
            t = t.detach()
            st = t.untyped_storage()
            skey = (st.data_ptr(), st.nbytes(), str(t.device))
            vkey = skey + (t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
            if t.numel() and st.data_ptr() and vkey in views:
                keys.append(k)
                stkeys.append(views[vkey])
                continue
            stk = f"{name}.{k}"
            n = 1
            while stk in used:
                n += 1
                stk = f"{name}.{k}#{n}"
            used.add(stk)
            if t.numel() and st.data_ptr():
                views[vkey] = stk
                by_storage.setdefault(skey, []).append(stk)
            weights[stk] = t
            keys.append(k)
            stkeys.append(stk)
        meta = getattr(sd, "_metadata", None)
        layout[name] = {
            "keys": keys,
            "tensors": stkeys,
            "ordered": type(sd) is collections.OrderedDict,
            "metadata": _copy.deepcopy(meta) if meta is not None else None,
        }
        rest[name] = None
    for stks in by_storage.values():
        if len(stks) > 1:
            for stk in stks:
                weights[stk] = weights[stk].clone(memory_format=torch.contiguous_format)
    for stk, t in weights.items():
        if not t.is_contiguous():
            weights[stk] = t.contiguous()
    return weights, layout, rest


def rebuild_weights(loaded: Mapping[str, torch.Tensor], layout: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for name, lay in layout.items():
        sd = collections.OrderedDict() if lay.get("ordered") else {}
        for k, stk in zip(lay["keys"], lay["tensors"]):
            sd[k] = loaded[stk]
        if lay.get("metadata") is not None and isinstance(sd, collections.OrderedDict):
            sd._metadata = lay["metadata"]  # type: ignore[attr-defined]  # torch keeps version info on a state dict
        out[name] = sd
    return out


def _device(map_location: Any) -> str:
    if map_location is None:
        return "cpu"
    if isinstance(map_location, (str, torch.device)):
        return str(map_location)
    return "cpu"


def attach_weights(source: Source, data: dict[str, Any], map_location: Any) -> None:
    """Read ``model.safetensors`` and put the state dicts that ``data["safetensors"]`` lays out into ``data``."""
    from safetensors.torch import load_file

    wpath = source.dir / WEIGHTS_FILE
    try:
        loaded = load_file(str(wpath), device=_device(map_location))
    except Exception as exc:
        raise CheckpointError(f"saverules: cannot read {wpath}: {exc}") from exc
    try:
        rebuilt = rebuild_weights(loaded, data["safetensors"])
    except KeyError as exc:
        raise CheckpointError(f"saverules: {wpath} lacks tensor {exc}") from None
    data["objects"].update(rebuilt)


class SafetensorsFormat(TorchFormat):
    """The torch format with the model weights moved to ``model.safetensors``."""

    name = "safetensors"

    def check_available(self) -> None:
        try:
            import safetensors.torch  # noqa: F401
        except ImportError:
            raise ValueError(
                "[storage].format = \"safetensors\" needs the safetensors package: pip install safetensors"
            ) from None

    def encode(self, payload: Payload, out: Output) -> Encoded:
        weights, layout, objects = split_weights(payload.objects)
        meta = {"format": "pt", "saverules": str(torchfile.PAYLOAD_VERSION)}
        files: dict[str, FileEntry | None] = {
            WEIGHTS_FILE: out.write(WEIGHTS_FILE, lambda f: safetensors_file.write(f, weights, meta),
                                    list(weights.values())),
        }
        data = torchfile.payload_dict(payload, objects, layout)
        files[STATE_FILE] = out.write(STATE_FILE, lambda f: torch.save(data, f), tensors_in(data))
        return Encoded(files)

    # decode is the torch format's: it attaches the weights a state file points at.

    def check_loads(self, source: Source) -> None:
        super().check_loads(source)
        if WEIGHTS_FILE in source.files:
            from safetensors.torch import load_file

            try:
                load_file(str(source.dir / WEIGHTS_FILE), device="cpu")
            except Exception as exc:
                raise CheckpointError(f"saverules: cannot read {source.dir / WEIGHTS_FILE}: {exc}") from exc
