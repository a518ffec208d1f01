"""What a checkpoint may hold, and the capture of a training state into a :class:`Payload`.

Every value is checked before anything is written: tensors (dense,
strided), ``int``, ``float``, ``bool``, ``str``, ``bytes``, ``None``,
``torch.Size``/``dtype``/``device`` and lists, tuples and dicts of those.
Anything else is refused with a :class:`StateTypeError` naming the entry.
"""
from __future__ import annotations

import collections
import copy as _copy
import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

from .errors import StateTooDeepError, StateTypeError, type_name
from .snapshot import Snapshot
from .structure import MAX_DEPTH

_SCALAR_TYPES = frozenset({int, float, bool, str, bytes, type(None)})
_KEY_TYPES = frozenset({int, float, bool, str, type(None)})
_TORCH_LEAF_TYPES = frozenset({torch.Size, torch.dtype, torch.device})
TENSOR_TYPES = frozenset({torch.Tensor, torch.nn.Parameter})


@dataclasses.dataclass
class Payload:
    """The training state of one checkpoint, as formats encode and decode it.

    ``objects`` maps names to the ``state_dict()`` of objects that have one;
    ``values`` maps names to plain values; ``decider`` is the decider's state
    and ``clock`` the training clock at the save.
    """

    step: int
    objects: dict[str, Any]
    values: dict[str, Any]
    decider: Any
    clock: float | None


def _hint(value: Any) -> str:
    mod = type(value).__module__ or ""
    if mod.startswith("numpy"):
        return "; convert numpy values with .tolist(), .item() or torch.from_numpy(...)"
    if isinstance(value, (set, frozenset)):
        return "; store a sorted list instead"
    return (
        "; a checkpoint stores tensors, int, float, bool, str, bytes, None and lists, tuples and dicts "
        "of those (objects with state_dict()/load_state_dict() are saved through their state_dict)"
    )


def checked(value: Any, where: str, snap: Snapshot | None, depth: int = 0) -> Any:
    """Check that ``value`` holds only safe types; return a snapshot copy when ``snap`` is given.

    Containers may nest :data:`~saverules.store.structure.MAX_DEPTH` levels deep
    (``depth`` counts them); a deeper state raises :class:`StateTooDeepError`.
    """
    t = type(value)
    if t in _SCALAR_TYPES or t in _TORCH_LEAF_TYPES:
        return value
    if t in TENSOR_TYPES:
        if value.layout != torch.strided or value.is_quantized:
            raise StateTypeError(
                f"{where}: a {value.layout} tensor cannot be checkpointed; convert it with .to_dense() "
                "or .dequantize() first"
            )
        if value.device.type == "meta":
            raise StateTypeError(f"{where}: a tensor on the meta device has no data to checkpoint")
        if snap is None:
            return value
        return snap.tensor(value.detach())
    if isinstance(value, torch.Tensor):
        raise StateTypeError(
            f"{where}: tensor subclass {type_name(value)} cannot be checkpointed safely; store a plain tensor"
        )
    if (t is dict or t is collections.OrderedDict or t is list or t is tuple) and depth >= MAX_DEPTH:
        raise StateTooDeepError(
            f"{where}: the state nests deeper than {MAX_DEPTH} levels of dicts, lists and tuples, which a "
            "checkpoint may not hold (its readers refuse such files); store it flatter, for example as a "
            "list of rows or as a tensor"
        )
    if t is dict or t is collections.OrderedDict:
        out: dict | None = t() if snap is not None else None
        for k, v in value.items():
            if type(k) not in _KEY_TYPES:
                raise StateTypeError(
                    f"{where}: dict key {k!r} of type {type_name(k)} is not allowed; use str or int keys"
                )
            item = checked(v, f"{where}[{k!r}]", snap, depth + 1)
            if out is not None:
                out[k] = item
        meta = getattr(value, "_metadata", None) if t is collections.OrderedDict else None
        if meta is not None:
            meta = checked(meta, f"{where}._metadata", None)
            if out is not None:
                out._metadata = _copy.deepcopy(meta)  # type: ignore[attr-defined]  # torch keeps version info on a state dict
        return out if out is not None else value
    if t is list or t is tuple:
        items = [checked(v, f"{where}[{i}]", snap, depth + 1) for i, v in enumerate(value)]
        if snap is None:
            return value
        return items if t is list else tuple(items)
    raise StateTypeError(f"{where}: {type_name(value)} is not a type a checkpoint may hold{_hint(value)}")


def has_state_dict(obj: Any) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))


def capture(state: Mapping[str, Any], step: int, decider_state: Any, clock: float | None,
            snap: Snapshot | None) -> Payload:
    """Check ``state`` and gather it into a Payload (copied into ``snap`` when given)."""
    if not isinstance(state, Mapping):
        raise StateTypeError(f"state must be a dict of names to objects and values, got {type_name(state)}")
    objects: dict[str, Any] = {}
    values: dict[str, Any] = {}
    for name, obj in state.items():
        if not isinstance(name, str):
            raise StateTypeError(f"state keys must be strings, got {name!r}")
        if has_state_dict(obj):
            objects[name] = checked(obj.state_dict(), f"state[{name!r}].state_dict()", snap)
        else:
            values[name] = checked(obj, f"state[{name!r}]", snap)
    decider = checked(_copy.deepcopy(decider_state), "decider.state_dict()", None)
    if snap is not None:
        snap.finish()
    return Payload(step=int(step), objects=objects, values=values, decider=decider, clock=clock)
