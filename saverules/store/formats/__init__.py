"""Formats: how the state of one checkpoint becomes files in a directory, and files become a state again.

The store owns everything around a format: the temporary directory, the
fsyncs and renames of the commit, the manifest, digests, verification and
retention.  A format only encodes and decodes.

The interface
-------------
A format is an object with:

``name``
    The value of ``[storage].format`` and of the manifest's
    ``storage_format``; a checkpoint is decoded by the format it names.

``check_available() -> None``
    Raise ``ValueError`` saying what to install when a dependency is
    missing (called when a :class:`~saverules.store.Checkpointer` is made).

``encode(payload, out) -> Encoded``
    Write ``payload`` (a :class:`~saverules.store.state.Payload`) as files
    into the temporary directory ``out.dir``.  A file the store should write
    goes through ``out.write(name, fill, tensors)``: ``fill(fileobj)`` writes
    the bytes, the store digests them as they pass and fsyncs the file, and
    the entry (size, digest) comes back.  Files written by other means, such
    as every rank of a job writing its own shard through
    ``torch.distributed.checkpoint``, are put straight into ``out.dir`` and
    listed with the entry ``None``: the store fsyncs and digests them after
    ``encode`` returns.  ``Encoded.files`` lists every file (flat names, no
    directories); ``Encoded.metadata`` is a small JSON object the manifest
    keeps under ``format_metadata`` and hands back to ``decode``.

``decode(source, map_location, mmap=False) -> Payload``
    Read a committed checkpoint back (``mmap``: map the files rather than
    read them, where the format can).  A format whose ``digests_while_decoding``
    is True checks every file's size and digest (``source.files``) against
    the bytes it reads and raises ``CheckpointError`` on a mismatch; a resume
    then skips the separate digest pass over its files.  Otherwise the store
    checks the digests before ``decode`` is called.  ``source`` gives the directory, the
    manifest's step, its file entries and the format metadata.  Nothing read
    from a file may run code: torch files go through
    :func:`saverules.store.formats.torchfile.load` (``weights_only``), other
    files are parsed as data.  Failures raise
    :class:`~saverules.store.errors.CheckpointError` (or
    :class:`~saverules.store.errors.UnsafeCheckpointError`), never anything else.

``check_index(source) -> bool``
    What ``verify="hash"`` runs on a checkpoint just written, before it is
    committed (the store has already compared every file's size on disk
    with the bytes written): re-read the format's index (headers, the small
    structure file) and check it is exactly what was written, raising
    :class:`~saverules.store.errors.CheckpointError` when it is not.  Return
    False when the format has no index to check: the store then re-reads
    every file in full and compares its digest.

``check_loads(source) -> None``
    What ``verify="load"`` runs on a checkpoint just written, before it is
    committed: load every file back as a resume would, raising
    :class:`~saverules.store.errors.CheckpointError` when one does not.

``encode`` runs in the writer (a background thread for asynchronous saves)
on memory the store keeps alive and unchanged until it returns.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError

#: A file's manifest entry: ``{"size": bytes, ALGORITHM: hex}`` (see :mod:`saverules.store.digest`).
FileEntry = dict[str, Any]


@dataclasses.dataclass
class Encoded:
    """What :meth:`Format.encode` wrote: every file (entry, or None for the store to digest) and metadata."""

    files: dict[str, FileEntry | None]
    metadata: dict[str, Any] | None = None


@dataclasses.dataclass(frozen=True)
class Source:
    """A checkpoint directory to decode: its files and what the manifest says of them."""

    dir: Path
    step: int
    files: Mapping[str, FileEntry]
    metadata: Mapping[str, Any] | None = None

    @classmethod
    def of(cls, path: Path, manifest: Mapping[str, Any]) -> Source:
        return cls(Path(path), int(manifest["step"]), manifest["files"], manifest.get("format_metadata"))


class Output:
    """The temporary directory a format writes one checkpoint into.

    ``stage`` names what is being done (for the error message when it fails).
    """

    def __init__(self, directory: Path, write_file: Callable[[str, Any], FileEntry]):
        self.dir = Path(directory)
        self._write_file = write_file
        self.stage = "write the files"

    def write(self, name: str, fill: Callable[[Any], None], tensors: Sequence[torch.Tensor] = ()) -> FileEntry:
        """Create ``name``, let ``fill(fileobj)`` write it, fsync it; its entry (size, digest)."""
        from ..writer import Producer

        if not name or "/" in name or "\\" in name or name.startswith("."):
            raise CheckpointError(f"saverules: a format may only write plain file names, not {name!r}")
        self.stage = f"write {name}"
        return self._write_file(str(self.dir / name), Producer(fill, tensors))


class Format:
    """The base of every format (see the module docstring for the contract)."""

    name: str = ""
    digests_while_decoding: bool = False
    #: True: ``decode`` takes ``into=`` (the caller's state) and may read tensors into its memory.
    lands_in_place: bool = False

    def check_available(self) -> None:
        return None

    def encode(self, payload, out: Output) -> Encoded:  # pragma: no cover - abstract
        raise NotImplementedError

    def decode(self, source: Source, map_location: Any, mmap: bool = False):  # pragma: no cover - abstract
        raise NotImplementedError

    def check_index(self, source: Source) -> bool:
        return False

    def check_loads(self, source: Source) -> None:
        self.decode(source, "cpu")


_REGISTRY: dict[str, Format] = {}


def register(fmt: Format) -> Format:
    _REGISTRY[fmt.name] = fmt
    return fmt


def names() -> Sequence[str]:
    return tuple(_REGISTRY)


def get(name: str | None) -> Format:
    """The format called ``name`` (checkpoints without a ``storage_format`` were written as "torch")."""
    fmt = _REGISTRY.get(name or "torch")
    if fmt is None:
        raise CheckpointError(
            f"saverules: this checkpoint was written in the format {name!r}, which this saverules does not read "
            f"(it reads {', '.join(map(repr, _REGISTRY))}); upgrade saverules"
        )
    return fmt


from . import safetensors_format, tensors_format, torch_format  # noqa: E402

register(tensors_format.TensorsFormat())
register(torch_format.TorchFormat())
register(safetensors_format.SafetensorsFormat())

from ..sharded import format as _dcp  # noqa: E402  (torch.distributed.checkpoint is imported only when used)

register(_dcp.DcpFormat())


def read(info: Any, map_location: Any = "cpu", mmap: bool = False, into: Mapping[str, Any] | None = None):
    """Decode the committed checkpoint ``info`` (a CheckpointInfo) with the format its manifest names.

    ``into``: the caller's state, for a format whose ``lands_in_place`` is
    True to read tensors straight into (see :mod:`saverules.store.formats.in_place`).
    """
    fmt = get(info.format)
    source = Source.of(info.path, info.manifest)
    if into is not None and fmt.lands_in_place:
        # a format that lands in place (TensorsFormat) takes `into`; the base signature does not
        return fmt.decode(source, map_location, mmap=mmap, into=into)  # type: ignore[call-arg]
    return fmt.decode(source, map_location, mmap=mmap)
