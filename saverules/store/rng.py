"""Capture and restore every random generator a training loop is likely to use, as safe types."""
from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import torch

from .errors import type_name, warn


def rng_state() -> dict:
    """The state of every random generator the training loop is likely to use, as safe types.

    Covers Python's ``random``, torch's CPU generator, every CUDA device's
    generator when CUDA is available, and numpy's global generator when numpy
    is importable.  Put the result in the checkpointed state and give it back
    to :func:`restore_rng_state` after :meth:`Checkpointer.load_latest`.
    """
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": [int(version), [int(x) for x in internal], gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    try:
        import numpy
    except ImportError:  # pragma: no cover - numpy is optional
        numpy = None  # type: ignore[assignment]  # None marks "no numpy"; checked below
    if numpy is not None:
        np_state = numpy.random.get_state(legacy=False)
        state["numpy"] = {
            "bit_generator": str(np_state["bit_generator"]),
            "key": [int(x) for x in np_state["state"]["key"]],
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        }
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Put back generator states captured by :func:`rng_state` (entries that are absent are skipped)."""
    if not isinstance(state, Mapping):
        raise TypeError(f"restore_rng_state expects the dict rng_state() returned, got {type_name(state)}")
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((int(version), tuple(int(x) for x in internal), gauss))
    if "torch" in state:
        torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = list(state["cuda"])
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            warn(
                f"saverules: the checkpoint holds RNG states for {len(cuda_states)} CUDA devices but "
                f"{torch.cuda.device_count()} are visible; CUDA generators were not restored"
            )
    if "numpy" in state:
        import numpy

        s = state["numpy"]
        numpy.random.set_state(
            {
                "bit_generator": s["bit_generator"],
                "state": {"key": numpy.asarray(s["key"], dtype=numpy.uint32), "pos": int(s["pos"])},
                "has_gauss": int(s["has_gauss"]),
                "gauss": float(s["gauss"]),
            }
        )
