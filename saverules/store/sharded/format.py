"""The "dcp" format: every rank writes its shards through ``torch.distributed.checkpoint``.

A checkpoint holds, for a job of N ranks:

* ``__<rank>_<n>.distcp`` from every rank and ``.metadata`` from rank 0: the
  tensors of the models and optimizers, each rank writing its own shards
  (DCP's layout, so a checkpoint saved on N ranks loads on M);
* ``rank-<rank>.pt`` from every rank: what belongs to that rank (plain values,
  RNG states, schedulers and other objects, the decider and the clock) and
  the structure of each model's and optimizer's state dict (see
  :mod:`~saverules.store.sharded.state`), read with ``weights_only``.

This module encodes one rank's part and decodes it; the commit across ranks
(who writes the manifest, when anything becomes visible) is
:mod:`saverules.store.sharded.coordinate`'s.
"""
from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Mapping, MutableMapping
from typing import Any

import torch

from ..errors import CheckpointError, StateTypeError, UnsafeCheckpointError, warn, write_error
from ..formats import Encoded, FileEntry, Format, Output, Source, torchfile
from ..state import Payload, capture, checked
from ..writer import HashingFile, Stable, tensors_in

RANK_FILE = "rank-{rank:05d}.pt"


def rank_file(rank: int) -> str:
    return RANK_FILE.format(rank=rank)


@contextlib.contextmanager
def _quiet():
    """DCP warns that it works "in a single process" whenever there is one; that is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


@dataclasses.dataclass
class ShardedPayload:
    """One rank's state for a sharded save: its own payload, and its shards for DCP."""

    payload: Payload               # per-rank objects and values, decider, clock
    layouts: dict[str, Any]        # {name: {"kind", "skeleton", "slots", "owner"}} of models and optimizers
    tensors: dict[str, torch.Tensor]
    summary: dict[str, Any] | None  # mesh / sharding summary (JSON); None: made from tensors in the writer
    late: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # live tensors, staged by stage_late

    def stage_late(self, snap) -> None:
        """In the writer: copy the tensors of the late copy into ``snap`` (its ``copy_late`` then runs the copies)."""
        from . import state as dcp_state

        if self.late:
            staged, _ = dcp_state.stage(self.late, lambda local, t: snap.tensor(local, record=False))
            self.tensors.update(staged)
            self.late = {}

    @property
    def step(self) -> int:
        return self.payload.step


class _Digesting:
    """The store's hashing file, with what DCP's writer needs of it."""

    def __init__(self, f, stable: Stable):
        self._hf = HashingFile(f, stable)

    def write(self, data) -> int:
        return self._hf.write(data)

    def flush(self) -> None:
        self._hf.flush()

    def push(self) -> None:
        self._hf.push()

    def drain(self) -> None:
        self._hf.drain()

    @property
    def size(self) -> int:
        return self._hf.size

    def entry(self) -> dict[str, Any]:
        return self._hf.entry()  # the store's own form of an entry, as for the files it writes itself


class DcpFormat(Format):
    name = "dcp"
    #: Every rank writes; the store commits through :mod:`saverules.store.sharded.coordinate`.
    sharded = True

    def check_available(self) -> None:
        try:
            import torch.distributed.checkpoint  # noqa: F401
            from torch.distributed.checkpoint.state_dict import get_model_state_dict  # noqa: F401
        except ImportError as exc:
            raise ValueError(
                f"[storage].format = \"dcp\" needs torch.distributed.checkpoint, which this torch lacks ({exc})"
            ) from None

    # -- saving ---------------------------------------------------------------------

    def capture(self, state: Mapping[str, Any], step: int, decider_state: Any, clock: float | None,
                snap) -> ShardedPayload:
        """Check and gather this rank's state (copied into ``snap`` when given), in the training thread."""
        from . import state as dcp_state

        if not isinstance(state, Mapping):
            raise StateTypeError(f"state must be a dict of names to objects and values, got {type(state).__name__}")
        try:
            layouts, tensors = dcp_state.get_state(state)
            dcp_state.check_tensors(tensors)
        except dcp_state.ShardedStateError as exc:
            raise StateTypeError(str(exc)) from None
        plain = {}
        for name, lay in layouts.items():
            plain[name] = {
                "kind": lay.kind,
                "skeleton": checked(lay.skeleton, f"state[{name!r}] (its state dict)", None),
                "slots": lay.slots,
                "owner": lay.owner,
            }
        summary = dcp_state.sharding_summary(tensors) if snap is None else None  # async: in the writer
        late: dict[str, torch.Tensor] = {}
        if snap is not None:  # what only an optimizer's step() changes is staged by the writer (stage_late)
            tensors, late = dcp_state.stage(tensors, snap.tensor, is_late=snap.is_late)
        rest = {n: o for n, o in state.items() if not dcp_state.is_sharded_object(o)}
        payload = capture(rest, step, decider_state, clock, snap)  # finishes the snapshot
        return ShardedPayload(payload, plain, tensors, summary, late)

    # only coordinate.commit encodes a sharded payload, and it passes the rank and the group: the
    # base signature has neither
    def encode(self, sp: ShardedPayload, out: Output, *, rank: int, group: Any) -> Encoded:  # type: ignore[override]
        """Write this rank's files into ``out.dir``: its rank file, then its shards (a collective on ``group``)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

        from ..fs import fs
        from . import files as dcp_files
        from . import state as dcp_state

        data = torchfile.payload_dict(sp.payload, sp.payload.objects, None)
        data["dcp"] = sp.layouts
        files: dict[str, FileEntry | None] = {}
        failure: BaseException | None = None
        try:
            files[rank_file(rank)] = out.write(rank_file(rank), lambda f: torch.save(data, f), tensors_in(data))
        except BaseException as exc:  # the other ranks are entering DCP: join them and fail there, together
            failure = exc
            if isinstance(exc, OSError):
                failure = write_error(exc, sp.step, str(out.dir / rank_file(rank)), f"write {rank_file(rank)}")
        locals_ = [dcp_state.local_tensor(t) for t in sp.tensors.values()]
        stable = Stable(locals_)
        writer = dcp_files.DigestingWriter(
            out.dir, open_file=fs.open_write, digesting=lambda f: _Digesting(f, stable), fsync=fs.fsync,
            rename=fs.rename, fail=failure,
        )
        out.stage = "write the shards (torch.distributed.checkpoint)"
        with _quiet():
            dcp.save(sp.tensors, storage_writer=writer, planner=DefaultSavePlanner(), process_group=group,
                     no_dist=group is None)
        if failure is not None:  # pragma: no cover - dcp.save raised it already
            raise failure
        files.update(writer.entries)
        metadata = None
        if rank == 0:  # the staged DTensors keep their meshes and placements: the same summary
            metadata = {"sharding": sp.summary if sp.summary is not None else dcp_state.sharding_summary(sp.tensors)}
        return Encoded(files, metadata)

    # -- reading ------------------------------------------------------------------

    def read_rank(self, source: Source, rank: int, world: int, map_location: Any) -> tuple[Payload, dict[str, Any]]:
        """This rank's payload and the layouts of the sharded objects.

        A rank that did not exist when the checkpoint was saved (a job that
        grew) reads rank 0's file: its per-rank values start as rank 0's.
        """
        from . import files as dcp_files

        saved = rank if rank < world else 0
        data = torchfile.read_payload_dict(source.dir / rank_file(saved), source.step, map_location)
        mpath = source.dir / dcp_files.METADATA_FILE
        try:  # DCP reads it again; read here first so that a planted one is refused before anything is loaded
            dcp_files.load_metadata(mpath)
        except dcp_files.UnsafeMetadata as exc:
            raise UnsafeCheckpointError(
                f"saverules: refused to load {mpath}: it asks to unpickle {exc}, which is not DCP metadata. "
                "Loading it would run code from the file, which saverules never does"
            ) from None
        except (ValueError, OSError) as exc:
            raise CheckpointError(f"saverules: cannot read {mpath}: {exc}") from None
        layouts = data.get("dcp")
        if not isinstance(layouts, dict):
            raise CheckpointError(f"saverules: {source.dir / rank_file(saved)} is not a rank file of a dcp checkpoint")
        return torchfile.as_payload(data), layouts

    def load_shards(self, source: Source, state: MutableMapping[str, Any], layouts: Mapping[str, Any],
                    group: Any) -> None:
        """Load the shards into the live models and optimizers of ``state`` (a collective on ``group``)."""
        import torch.distributed.checkpoint as dcp

        from . import files as dcp_files
        from . import state as dcp_state

        usable = {}
        for name, lay in layouts.items():
            target = state.get(name)
            if not dcp_state.is_sharded_object(target):
                warn(f"saverules: checkpoint {source.dir} holds the sharded state of {name!r} but the state passed "
                     "to load_latest has no model or optimizer there; it was not restored")
                continue
            usable[name] = lay
        # Every rank must hand DCP the same keys: the layouts come from one checkpoint, the state from one program.
        templates = dcp_state.templates(state, sorted(usable))
        with _quiet():
            dcp.load(templates, storage_reader=dcp_files.SafeReader(str(source.dir)),
                     planner=dcp_files.SafeLoadPlanner(), process_group=group, no_dist=group is None)
        dcp_state.set_state(state, usable, templates)

    def read_object(self, source: Source, name: str) -> Any:
        """One entry of the saved state in this process, unsharded; only its own shards are read.

        ``KeyError`` when the checkpoint has no such entry.
        """
        from . import state as dcp_state

        payload, layouts = self.read_rank(source, 0, 1, "cpu")
        if name not in layouts:
            entries = {**payload.objects, **payload.values}
            if name not in entries:
                raise KeyError(name)
            return entries[name]
        lay = layouts[name]
        tensors = self._read_tensors(source, [slot[-1] for slot in lay["slots"]])
        try:
            return dcp_state.rebuild(lay["skeleton"], lay["slots"], tensors, name)
        except KeyError as exc:
            raise CheckpointError(f"saverules: {source.dir}: {exc.args[0]}") from None

    def entries(self, source: Source) -> list:
        """The names of the saved state's entries (models, optimizers, rank 0's objects and values)."""
        payload, layouts = self.read_rank(source, 0, 1, "cpu")
        return sorted({*layouts, *payload.objects, *payload.values})

    def _read_tensors(self, source: Source, keys=None):
        from . import files as dcp_files

        try:
            return dcp_files.read_tensors(source.dir, keys)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # DCP wraps every error in a CheckpointException (a BaseException)
            inner = dcp_files.unwrap(exc)
            if isinstance(inner, dcp_files.UnsafeMetadata):  # a pickled item (read_rank checked the index)
                raise UnsafeCheckpointError(f"saverules: refused to read {source.dir}: {inner}") from None
            raise CheckpointError(f"saverules: cannot read the shards of {source.dir}: "
                                  f"{type(inner).__name__}: {inner}") from None

    def decode(self, source: Source, map_location: Any, mmap: bool = False) -> Payload:
        """The whole checkpoint in one process: rank 0's payload with every model and optimizer unsharded.

        (``mmap`` is accepted for the interface; DCP reads its files itself.)
        """
        from . import state as dcp_state

        payload, layouts = self.read_rank(source, 0, 1, map_location)
        tensors = self._read_tensors(source)
        for name, lay in layouts.items():
            try:
                payload.objects[name] = dcp_state.rebuild(lay["skeleton"], lay["slots"], tensors, name)
            except KeyError as exc:
                raise CheckpointError(f"saverules: {source.dir}: {exc.args[0]}") from None
        return payload

    def check_index(self, source: Source) -> bool:
        return False  # DCP's files have no index of ours: the store re-reads them

    def check_loads(self, source: Source) -> None:
        self.decode(source, "cpu")

    def check_rank_loads(self, source: Source, rank: int) -> None:
        """What ``verify="load"`` checks of one rank's part before the commit: its rank file, and rank 0 the index."""
        from . import files as dcp_files

        torchfile.load(source.dir / rank_file(rank), "cpu", mmap=True)
        if rank == 0:
            try:
                dcp_files.load_metadata(source.dir / dcp_files.METADATA_FILE)
            except (dcp_files.UnsafeMetadata, ValueError, OSError) as exc:
                raise CheckpointError(f"saverules: {source.dir / dcp_files.METADATA_FILE} does not load: {exc}") from None
