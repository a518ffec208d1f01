"""Which of the caller's tensors a resume may read (or, mapped, copy) a checkpoint's bytes straight into.

``load_state_dict`` of a plain ``torch.nn.Module`` copies every saved tensor
into the parameter or buffer of the same name.  When the saved tensor has
that tensor's dtype, shape and strides and its entry in
``tensors.safetensors`` is that tensor's whole storage, the read can land in
the parameter's own memory instead: the decoded tensor is then a view of
that memory, and the ``copy_`` of ``load_state_dict`` finds source and
destination identical and copies nothing.  The result is the same bytes in
the same place, with one pass over memory fewer and no fresh buffer.

Only modules whose loading is exactly that copy qualify: no subclass
overrides of ``state_dict``, ``load_state_dict``, ``_save_to_state_dict`` or
``_load_from_state_dict`` anywhere in the tree, and no state-dict hooks that
could rename or transform a tensor.  Everything else (optimizers, tied
weights, tensors on another device, a mismatch of any kind) is read into
fresh memory as before.

A read that lands in place writes the model's memory before the file's
digest is known; :func:`saverules.store.resume.load_latest` only asks for it
when a failed digest cannot leave that memory in use: the walk goes on to an
older checkpoint, whose restore overwrites every parameter (a strict
``load_state_dict``), or ``load_latest`` raises.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

_M = torch.nn.Module


def on_cpu(map_location: Any) -> bool:
    """Whether tensors decoded with ``map_location`` stay in CPU memory as read."""
    if map_location is None:
        return True
    if isinstance(map_location, (str, torch.device)):
        try:
            return torch.device(map_location).type == "cpu"
        except (RuntimeError, ValueError):
            return False
    return False


def plain_module(obj: Any) -> bool:
    """Whether ``obj.load_state_dict`` is exactly a copy of each saved tensor into the tensor of its name."""
    if not isinstance(obj, _M):
        return False
    cls = type(obj)
    if cls.load_state_dict is not _M.load_state_dict or cls.state_dict is not _M.state_dict:
        return False
    for sub in obj.modules():
        t = type(sub)
        if t._load_from_state_dict is not _M._load_from_state_dict or t._save_to_state_dict is not _M._save_to_state_dict:
            return False
        if sub._load_state_dict_pre_hooks or sub._state_dict_hooks or sub._state_dict_pre_hooks:
            return False
    return True


def _items(node: Any) -> list | None:
    """The [key, child] items of a dict node of the structure, or None when ``node`` is not one."""
    if isinstance(node, list) and len(node) >= 2 and node[0] in ("D", "O") and isinstance(node[1], list):
        return node[1]
    return None


def _tensor_index(node: Any) -> int | None:
    if isinstance(node, list) and len(node) == 2 and node[0] == "T" and type(node[1]) is int:
        return node[1]
    return None


def targets(tree: Any, refs: list, entries: Mapping[str, tuple[torch.dtype, list[int], int, int]],
            into: Mapping[str, Any]) -> dict[str, torch.UntypedStorage]:
    """{entry name: storage to read it into} for the plain modules of ``into`` (see the module docstring).

    ``tree`` and ``refs`` are the structure file's tree and tensor references,
    ``entries`` the parsed header of ``tensors.safetensors``.  Anything that
    does not match exactly is left out (and read into fresh memory).
    """
    users: dict[str, int] = {}
    for ref in refs:
        if isinstance(ref, list) and ref and isinstance(ref[0], str):
            users[ref[0]] = users.get(ref[0], 0) + 1
    top = dict(item for item in (_items(tree) or []) if isinstance(item, list) and len(item) == 2)
    objects = _items(top.get("objects"))
    out: dict[str, torch.UntypedStorage] = {}
    seen: dict[int, str | None] = {}
    for item in objects or []:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)):
            continue
        obj = into.get(item[0])
        saved = _items(item[1])
        if saved is None or obj is None or not plain_module(obj):
            continue
        own = obj.state_dict()
        for pair in saved:
            i = _tensor_index(pair[1]) if isinstance(pair, list) and len(pair) == 2 else None
            if i is None or not 0 <= i < len(refs) or not isinstance(pair[0], str):
                continue
            t = own.get(pair[0])
            ref = refs[i]
            if not isinstance(t, torch.Tensor) or not isinstance(ref, list) or len(ref) != 7:
                continue
            name = ref[0]
            entry = entries.get(name) if isinstance(name, str) else None
            st = t.untyped_storage()
            if (entry is None or users.get(name) != 1 or t.device.type != "cpu" or t.layout != torch.strided
                    or ref[1] != str(t.dtype).replace("torch.", "") or ref[2] != 0 or t.storage_offset() != 0
                    or ref[3] != list(t.shape) or ref[4] != list(t.stride()) or not t.is_contiguous()
                    or st.nbytes() != entry[3] - entry[2] or st.nbytes() != t.numel() * t.element_size()
                    or st.nbytes() == 0):
                continue
            key = st.data_ptr()
            if key in seen:  # one storage behind two names (tied here, not in the checkpoint): read neither in place
                prev = seen[key]
                if prev is not None:
                    del out[prev]
                seen[key] = None
                continue
            seen[key] = name
            out[name] = st
    return out
