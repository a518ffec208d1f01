"""The safetensors layout: an 8-byte little-endian header length, a JSON header, then raw tensor bytes.

:func:`write` streams each tensor's bytes from its own memory (no copy of
the whole file is built, unlike ``safetensors.torch.save``).
"""
from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import CheckpointError

_CODES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
    "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
}

#: torch dtype -> the safetensors code, for the dtypes this torch has.
DTYPE_CODES: dict[torch.dtype, str] = {
    getattr(torch, name): code for name, code in _CODES.items() if hasattr(torch, name)
}
DTYPES = frozenset(DTYPE_CODES)


def write(f, weights: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """Write ``weights`` in the safetensors layout, streaming each tensor's bytes from its own memory.

    The layout: an 8-byte little-endian header length, a JSON header (padded
    with spaces to a multiple of 8) giving each tensor's dtype, shape and byte
    range, then the bytes of the tensors back to back.
    """
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    order = []
    for name, t in weights.items():
        if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
            raise CheckpointError("the safetensors format needs a little-endian machine")
        nbytes = t.numel() * t.element_size()
        header[name] = {
            "dtype": DTYPE_CODES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
        order.append((t, nbytes))
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    f.write(len(text).to_bytes(8, "little"))
    f.write(text)
    for t, nbytes in order:
        if not nbytes:
            continue
        if t.device.type != "cpu":
            t = t.to("cpu")
        flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
        f.write(flat.numpy().data)
