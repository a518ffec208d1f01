"""The training state as ``torch.distributed.checkpoint`` sees it: sharded tensors apart from per-rank values.

Models (``torch.nn.Module``) and optimizers go through
``torch.distributed.checkpoint.state_dict``: ``get_model_state_dict`` /
``get_optimizer_state_dict`` give state dicts keyed by canonical parameter
names whose tensors are this rank's shards (DTensors under FSDP2 or tensor
parallelism, plain tensors otherwise), and the ``set_`` functions load them
back, whatever the sharding at load time.  Each such state dict is split:

* its **tensors** go to DCP, flat, under keys ``<state name>/<path>`` (a
  model's keys are its parameter names: ``model/layers.0.weight``), so a
  checkpoint saved on N ranks loads on M;
* its **structure** (everything else, such as an optimizer's param groups)
  is kept as a skeleton with ``None`` where each tensor was, plus the list of
  those places.

Everything else in the state (plain values, RNG states, schedulers, any
object with ``state_dict()``) belongs to its rank and is stored per rank.
"""
from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeGuard

import torch

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch builds without distributed
    DTensor = None  # type: ignore[assignment,misc]  # rebinding the class: None marks "no DTensor in this build"

#: A tensor's place in a skeleton: the keys and list indices from the top.
Path = tuple[Any, ...]

MODEL, OPTIMIZER = "model", "optimizer"


class ShardedStateError(TypeError):
    """The state cannot be saved through DCP as it is (the message says what to change)."""


def is_dtensor(t: Any) -> TypeGuard[DTensor]:
    return DTensor is not None and isinstance(t, DTensor)


@dataclasses.dataclass
class Sharded:
    """One model's or optimizer's state, split for DCP."""

    kind: str                      # MODEL or OPTIMIZER
    skeleton: Any                  # the state dict with None for every tensor
    slots: list[list[Any]]         # [[path..., key], ...]: where each tensor goes back
    owner: str | None = None    # for an optimizer: the name of its model in the state


def _key_part(k: Any) -> str:
    return str(k)


#: What a ``leaf`` of :func:`_rebuild_containers` answers to have the value looked into.
_DESCEND = object()


def _rebuild_containers(x: Any, path: Path, leaf: Callable[[Any, Path], Any]) -> Any:
    """``x`` copied container by container, with ``leaf(value, path)`` standing for each value it answers for.

    ``leaf`` sees every value first; when it answers :data:`_DESCEND`, dicts
    and OrderedDicts (with their ``_metadata``), lists and tuples are copied
    with each item walked in turn, and any other value is kept as it is.
    """
    done = leaf(x, path)
    if done is not _DESCEND:
        return done
    t = type(x)
    if t is dict or t is collections.OrderedDict:
        out = t()
        for k, v in x.items():
            out[k] = _rebuild_containers(v, path + (k,), leaf)
        meta = getattr(x, "_metadata", None) if t is collections.OrderedDict else None
        if meta is not None:
            out._metadata = meta  # type: ignore[attr-defined]  # torch keeps version info on a state dict
        return out
    if t is list or t is tuple:
        items = [_rebuild_containers(v, path + (i,), leaf) for i, v in enumerate(x)]
        return items if t is list else tuple(items)
    return x


def split(name: str, sd: Any) -> tuple[Any, list[list[Any]], dict[str, torch.Tensor]]:
    """(skeleton, slots, {flat key: tensor}) of one state dict."""
    tensors: dict[str, torch.Tensor] = {}
    slots: list[list[Any]] = []

    def take(x: Any, path: Path) -> Any:
        if not isinstance(x, torch.Tensor):
            return _DESCEND
        key = "/".join([name, *(_key_part(p) for p in path)])
        if key in tensors:
            raise ShardedStateError(
                f"state[{name!r}]: two entries map to the same checkpoint key {key!r} "
                "(keys that differ only in type, such as 0 and '0'); rename one"
            )
        tensors[key] = x
        slots.append([*path, key])
        return None

    skeleton = _rebuild_containers(sd, (), take)
    return skeleton, slots, tensors


def rebuild(skeleton: Any, slots: Sequence[Sequence[Any]], tensors: Mapping[str, torch.Tensor], where: str) -> Any:
    """The state dict again: ``skeleton`` with each slot's tensor put back."""
    at: dict[Path, str] = {tuple(s[:-1]): s[-1] for s in slots}
    missing = [key for key in at.values() if key not in tensors]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise KeyError(f"{where}: the checkpoint lists {', '.join(map(repr, missing[:3]))}{more}, "
                       "which the loaded tensors lack")

    def put_back(x: Any, path: Path) -> Any:
        key = at.get(path)
        return tensors[key] if key is not None else _DESCEND

    return _rebuild_containers(skeleton, (), put_back)


def _params(obj: Any) -> set:
    return {id(p) for p in obj.parameters()}


def owners(state: Mapping[str, Any]) -> dict[str, str]:
    """For every optimizer of ``state``, the name of the model in ``state`` that holds all its parameters."""
    models = {name: _params(obj) for name, obj in state.items() if isinstance(obj, torch.nn.Module)}
    out: dict[str, str] = {}
    for name, obj in state.items():
        if not isinstance(obj, torch.optim.Optimizer):
            continue
        mine = {id(p) for group in obj.param_groups for p in group["params"]}
        found = [m for m, params in models.items() if mine <= params]
        if not found:
            raise ShardedStateError(
                f"state[{name!r}] is an optimizer over parameters that no model in the state holds; "
                "[storage].format = \"dcp\" saves an optimizer through its model "
                "(torch.distributed.checkpoint.state_dict), so put the model in the state as well"
            )
        out[name] = found[0]
    return out


def is_sharded_object(obj: Any) -> bool:
    """Saved through DCP (a model or an optimizer) rather than per rank."""
    return isinstance(obj, (torch.nn.Module, torch.optim.Optimizer))


def get_state(state: Mapping[str, Any]) -> tuple[dict[str, Sharded], dict[str, torch.Tensor]]:
    """Every model and optimizer of ``state`` split for DCP: ({name: Sharded}, {flat key: tensor})."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict, get_state_dict

    own = owners(state)
    layouts: dict[str, Sharded] = {}
    tensors: dict[str, torch.Tensor] = {}
    # A model with a single optimizer: one get_state_dict call (one pass over the parameters) for both.
    single = {m: [o for o, mm in own.items() if mm == m] for m in set(own.values())}
    pairs: dict[str, Any] = {}
    for m, opts in single.items():
        if len(opts) == 1:
            pairs[m], pairs[opts[0]] = get_state_dict(state[m], state[opts[0]])
    for name, obj in state.items():
        if isinstance(obj, torch.nn.Module):
            sd = pairs[name] if name in pairs else get_model_state_dict(obj)
            kind, owner = MODEL, None
        elif isinstance(obj, torch.optim.Optimizer):
            owner = own[name]
            sd = pairs[name] if name in pairs else get_optimizer_state_dict(state[owner], obj)
            kind = OPTIMIZER
        else:
            continue
        skeleton, slots, flat = split(name, sd)
        layouts[name] = Sharded(kind, skeleton, slots, owner)
        tensors.update(flat)
    return layouts, tensors


def templates(state: Mapping[str, Any], names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The flat tensors of the live models and optimizers ``names``: what DCP loads into, in place."""
    layouts, tensors = get_state({n: state[n] for n in _with_owners(state, names)})
    wanted = set(names)
    return {k: t for k, t in tensors.items() if k.split("/", 1)[0] in wanted}


def _with_owners(state: Mapping[str, Any], names: Sequence[str]) -> list[str]:
    own = owners({n: state[n] for n in state if is_sharded_object(state[n])})
    out = list(names)
    for n in names:
        if n in own and own[n] not in out:
            out.append(own[n])
    return out


def set_state(state: Mapping[str, Any], layouts: Mapping[str, Mapping[str, Any]],
              tensors: Mapping[str, torch.Tensor]) -> None:
    """Load rebuilt state dicts into the live models and optimizers of ``state``."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    own = owners({n: o for n, o in state.items() if is_sharded_object(o)})
    for name, lay in layouts.items():
        sd = rebuild(lay["skeleton"], lay["slots"], tensors, f"state[{name!r}]")
        obj = state[name]
        if lay["kind"] == MODEL:
            set_model_state_dict(obj, sd)
        else:
            set_optimizer_state_dict(state[own[name]], obj, sd)


def stage(tensors: Mapping[str, torch.Tensor], copy, is_late=None) -> tuple[dict[str, torch.Tensor],
                                                                           dict[str, torch.Tensor]]:
    """(copies of ``tensors`` made by ``copy(local tensor, tensor)``, the tensors left to the late copy).

    A DTensor's copy keeps its mesh and placements.  The second argument of
    ``copy`` is the tensor whose version counter records changes (a
    DTensor's own: its local shard's does not move when it is trained).
    ``is_late(local tensor, tensor)``, when given, picks tensors to leave
    uncopied: they come back in the second mapping, for :func:`stage` to copy
    in the writer (the late copy).
    """
    out: dict[str, torch.Tensor] = {}
    late: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        spec = t._spec if is_dtensor(t) else None
        local = local_tensor(t).detach()
        if is_late is not None and is_late(local, t):
            late[key] = t
            continue
        staged = copy(local, t)
        out[key] = DTensor(staged, spec, requires_grad=False) if spec is not None else staged
    return out, late


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if is_dtensor(t) else t


def sharding_summary(tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """How the tensors are laid out across ranks: meshes, placements, counts (JSON)."""
    meshes: dict[tuple, dict[str, Any]] = {}
    by_object: dict[int, tuple] = {}  # DeviceMesh.mesh is recomputed on every access: look once per mesh
    plain = 0
    for t in tensors.values():
        if not is_dtensor(t):
            plain += 1
            continue
        mesh = t.device_mesh
        key = by_object.get(id(mesh))
        if key is None:
            ranks = mesh.mesh
            key = (tuple(ranks.shape), tuple(mesh.mesh_dim_names or ()), mesh.device_type, tuple(ranks.flatten().tolist()))
            by_object[id(mesh)] = key
        entry = meshes.setdefault(key, {
            "shape": list(key[0]),
            "dim_names": list(key[1]) if key[1] else None,
            "device_type": key[2],
            "ranks": list(key[3]),
            "tensors": 0,
            "placements": {},
        })
        entry["tensors"] += 1
        p = ", ".join(str(x) for x in t.placements)
        entry["placements"][p] = entry["placements"].get(p, 0) + 1
    return {"meshes": list(meshes.values()), "plain_tensors": plain, "tensors": len(tensors)}


def check_tensors(tensors: Mapping[str, torch.Tensor]) -> None:
    """Refuse tensors DCP cannot store faithfully (meta, sparse, quantized)."""
    for key, t in tensors.items():
        local = local_tensor(t)
        if local.device.type == "meta":
            raise ShardedStateError(f"{key}: a tensor on the meta device has no data to checkpoint")
        if local.layout != torch.strided or local.is_quantized:
            raise ShardedStateError(f"{key}: a {local.layout} tensor cannot be checkpointed; convert it first")
