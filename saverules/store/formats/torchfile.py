"""``state.pt``: the torch file that holds a payload, written with ``torch.save`` and read only with
``torch.load(weights_only=True)``.

Only files that are torch zip archives are handed to ``torch.load`` (whose
fallback for other files is the legacy pickle path); a file that asks to
unpickle anything but tensors and plain values is refused with
:class:`UnsafeCheckpointError`.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, UnsafeCheckpointError
from ..state import Payload

#: ``state.pt`` holds a dict tagged with this name and version.
PAYLOAD_NAME = "saverules-state"
PAYLOAD_VERSION = 1

_ZIP_MAGIC = b"PK\x03\x04"


def _unsafe_detail(text: str) -> str | None:
    """The line of a weights-only refusal that names the object the file asked for, if any."""
    for line in text.splitlines():
        if "GLOBAL" in line or "global" in line:
            return line.strip()
    return None


def load(path: Path, map_location: Any, mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)``, refusing anything that is not a torch zip archive."""
    try:
        with open(path, "rb") as f:
            magic = f.read(len(_ZIP_MAGIC))
    except OSError as exc:
        raise CheckpointError(f"saverules: cannot read {path}: {exc.strerror or exc}") from exc
    if magic != _ZIP_MAGIC:
        raise CheckpointError(f"saverules: cannot read {path}: it is not a torch.save zip archive (damaged?)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        detail = _unsafe_detail(str(exc))
        if detail is not None:
            raise UnsafeCheckpointError(
                f"saverules: refused to load {path}: it asks to unpickle an object that is not a tensor or a "
                f"plain value ({detail}). Loading it would run code from the file, which saverules never does; "
                "if you wrote this file yourself, store only the safe types listed in docs/checkpoints.md"
            ) from None
        raise CheckpointError(f"saverules: cannot read {path}: {exc}") from exc
    except Exception as exc:  # a damaged zip archive, wrong format...
        raise CheckpointError(f"saverules: cannot read {path}: {exc}") from exc


def payload_dict(payload: Payload, objects: dict[str, Any], layout: dict[str, Any] | None) -> dict[str, Any]:
    """What ``state.pt`` holds: the payload with ``objects`` (some may be moved to other files, see ``layout``)."""
    return {
        "format": PAYLOAD_NAME,
        "format_version": PAYLOAD_VERSION,
        "step": int(payload.step),
        "objects": objects,
        "values": payload.values,
        "decider": payload.decider,
        "clock": payload.clock,
        "safetensors": layout,
    }


def read_payload_dict(path: Path, step: int, map_location: Any, mmap: bool = False) -> dict[str, Any]:
    """Load ``state.pt`` and check it is a saverules state file of ``step``."""
    data = load(path, map_location, mmap=mmap)
    if not isinstance(data, dict) or data.get("format") != PAYLOAD_NAME:
        raise CheckpointError(f"saverules: {path} is not a saverules state file")
    if data.get("step") != step:
        raise CheckpointError(f"saverules: {path} holds step {data.get('step')}, the manifest says {step}")
    return data


def as_payload(data: dict[str, Any]) -> Payload:
    return Payload(step=data["step"], objects=dict(data.get("objects") or {}), values=dict(data.get("values") or {}),
                   decider=data.get("decider"), clock=data.get("clock"))
