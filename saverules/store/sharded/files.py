"""The files of a ``torch.distributed.checkpoint`` (DCP) checkpoint: written with digests, read without code.

DCP writes one or more ``__<rank>_<n>.distcp`` files per rank and, on rank 0,
the ``.metadata`` file that says which bytes of which file hold which piece
of which tensor.  This module adapts DCP's own file-system writer and reader
to the store's rules:

* :class:`DigestingWriter` writes every file through the store's file-system
  calls and digests its bytes as they pass (the store's hash worker), fsyncs
  it, and records its entry (size, digest) for the manifest.  DCP's own
  directory handling, planning and layout are unchanged.
* :class:`SafeReader` reads ``.metadata`` with an unpickler that accepts only
  DCP's metadata classes, ``torch.Size`` and dtypes (DCP itself uses plain
  ``pickle.load``, which would run code from a planted file), and
  :class:`SafeLoadPlanner` refuses pickled non-tensor items (DCP loads those
  with ``torch.load(weights_only=False)``).  Tensor data is read by DCP with
  ``torch.load(weights_only=True)``.
* :func:`read_tensors` loads a whole checkpoint's tensors, unsharded, into
  one process, through DCP's conversion planner (what ``dcp_to_torch_save``
  does), for export and checks.
"""
from __future__ import annotations

import io
import os
import pickle
import threading
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint import metadata as _dcp_metadata
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystem

#: The file DCP's coordinator writes last; it indexes every shard.
METADATA_FILE = ".metadata"
#: The suffix of DCP's data files.
DATA_SUFFIX = ".distcp"


class UnsafeMetadata(Exception):
    """``.metadata`` asks to unpickle something that is not DCP metadata."""


def unwrap(exc: BaseException) -> BaseException:
    """The first rank's error inside DCP's ``CheckpointException`` (which wraps every error it meets), or ``exc``."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = failures[min(failures)]
        return inner[0] if isinstance(inner, tuple) else inner
    return exc


# --------------------------------------------------------------------------
# Reading .metadata without running code
# --------------------------------------------------------------------------

def _allowed_globals() -> dict[tuple, Any]:
    allowed: dict[tuple, Any] = {}
    for name in dir(_dcp_metadata):
        obj = getattr(_dcp_metadata, name)
        if isinstance(obj, type) and obj.__module__ == _dcp_metadata.__name__:
            allowed[(obj.__module__, obj.__qualname__)] = obj
    from torch.distributed.checkpoint import filesystem as _fsmod

    allowed[(_fsmod.__name__, "_StorageInfo")] = _fsmod._StorageInfo
    allowed[("torch", "Size")] = torch.Size
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    allowed[("collections", "OrderedDict")] = __import__("collections").OrderedDict
    import pathlib

    for cls in (pathlib.Path, pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePath,
                pathlib.PurePosixPath, pathlib.PureWindowsPath):
        allowed[("pathlib", cls.__name__)] = cls
    for name in dir(torch):
        obj = getattr(torch, name, None)
        if isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
            allowed[("torch", name)] = obj
    return allowed


_ALLOWED: dict[tuple, Any] | None = None


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        global _ALLOWED
        if _ALLOWED is None:
            _ALLOWED = _allowed_globals()
        found = _ALLOWED.get((module, name))
        if found is None:
            raise UnsafeMetadata(f"{module}.{name}")
        return found


def load_metadata(path: os.PathLike) -> Any:
    """DCP's ``Metadata`` from a ``.metadata`` file, refusing any object that is not DCP metadata.

    Raises :class:`UnsafeMetadata` for a forbidden object, ``ValueError`` for
    a file that is not a DCP metadata pickle, ``OSError`` when unreadable.
    """
    with open(path, "rb") as f:
        try:
            md = _MetadataUnpickler(f).load()
        except UnsafeMetadata:
            raise
        except Exception as exc:  # truncated or garbled pickle
            raise ValueError(f"{METADATA_FILE} is not a DCP metadata file ({type(exc).__name__}: {exc})") from None
    if not isinstance(md, _dcp_metadata.Metadata):
        raise ValueError(f"{METADATA_FILE} does not hold DCP metadata")
    return md


class SafeReader(FileSystemReader):
    """DCP's file-system reader with a ``.metadata`` unpickler that runs no code."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        metadata = load_metadata(Path(self.path) / METADATA_FILE)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = _dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _refuse_bytes(read_item: Any) -> None:
    raise UnsafeMetadata(
        f"the checkpoint stores {read_item.dest_index.fqn!r} as a pickled object; saverules reads only tensors "
        "from DCP files (a pickled object could run code)"
    )


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, refusing pickled (non-tensor) items."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        _refuse_bytes(read_item)


class _SafeEmptyPlanner(_EmptyStateDictLoadPlanner):
    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        _refuse_bytes(read_item)


def tensor_keys(metadata: Any) -> dict[str, Any]:
    """``{key: TensorStorageMetadata}`` of every tensor a checkpoint's metadata lists."""
    return {k: v for k, v in metadata.state_dict_metadata.items()
            if isinstance(v, _dcp_metadata.TensorStorageMetadata)}


def read_tensors(path: os.PathLike, keys: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of the DCP checkpoint at ``path`` (or those in ``keys``), unsharded, on the CPU.

    Uses DCP's own conversion planner (the one behind
    ``torch.distributed.checkpoint.format_utils.dcp_to_torch_save``) in this
    process alone, with the safe reader.
    """
    wanted = None if keys is None else list(keys)
    out: dict[str, Any] = {}
    # DCP's public load() only fills keys given to it; its conversion helper calls the loader itself.
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    _load_state_dict(out, storage_reader=SafeReader(os.fspath(path)), planner=_SafeEmptyPlanner(keys=wanted),
                     no_dist=True)
    return out


# --------------------------------------------------------------------------
# Writing with digests
# --------------------------------------------------------------------------

class _DigestingStream(io.RawIOBase):
    """One DCP file being written: bytes go to the file and to a digest; fsynced and recorded on close."""

    def __init__(self, f, digesting, on_close: Callable[[_DigestingStream], None], fsync: Callable[[int], None]):
        super().__init__()
        self._f = f
        self._hf = digesting(f)
        self._on_close = on_close
        self._fsync = fsync
        self._done = False
        self.entry: dict[str, Any] | None = None

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def write(self, data) -> int:
        return self._hf.write(data)

    def tell(self) -> int:
        return self._hf.size

    def fileno(self) -> int:
        return self._f.fileno()

    def flush(self) -> None:
        if not self._done:
            self._hf.flush()

    def close(self) -> None:
        if self._done:
            return
        self._done = True
        try:
            self._hf.push()
            self._f.flush()
            self._fsync(self._f.fileno())
            self.entry = self._hf.entry()
        except BaseException:
            self._hf.drain()
            self._f.close()
            super().close()
            raise
        self._f.close()
        super().close()
        self._on_close(self)


class _DigestingFileSystem(FileSystem):
    def __init__(self, writer: DigestingWriter):
        super().__init__()
        self._writer = writer

    @contextmanager
    def create_stream(self, path, mode: str):
        if "w" not in mode:
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        w = self._writer
        name = os.path.basename(os.fspath(path))
        try:
            f = w._open(os.fspath(path))
            stream = _DigestingStream(f, w._digesting, lambda s: w._record(name, s.entry), w._fsync)
            try:
                yield stream
            except BaseException:
                if not stream._done:
                    stream._done = True
                    stream._hf.drain()
                    f.close()
                raise
            stream.close()
        except OSError as exc:
            if exc.filename is None:  # say which file: the error travels to the other ranks as text
                raise OSError(exc.errno, exc.strerror, os.fspath(path)) from exc
            raise

    def rename(self, path, new_path) -> None:
        self._writer._rename(os.fspath(path), os.fspath(new_path))


class DigestingWriter(FileSystemWriter):
    """DCP's file-system writer, digesting every file as it is written.

    ``open_file(path)`` creates a file for writing, ``digesting(f)`` wraps it
    in an object with ``write``, ``flush``, ``push``, ``drain``, ``size`` and
    ``entry()`` (the manifest entry), ``fsync(fd)`` makes it durable and
    ``rename(src, dst)`` renames: the store passes its own file-system calls.
    After ``dcp.save`` returns, :attr:`entries` maps the name of every file
    this process wrote to its entry.

    ``fail``: an error this rank met before the save; it is raised while
    DCP plans, so that DCP reports it to every rank and they all stop there
    together (a rank that simply left would keep the others waiting).
    """

    def __init__(self, path: os.PathLike, *, open_file: Callable[[str], Any], digesting: Callable[[Any], Any],
                 fsync: Callable[[int], None], rename: Callable[[str, str], None], thread_count: int = 1,
                 fail: BaseException | None = None):
        super().__init__(os.fspath(path), single_file_per_rank=True, sync_files=False, thread_count=thread_count,
                         overwrite=False)
        self.fs = _DigestingFileSystem(self)
        self._open = open_file
        self._digesting = digesting
        self._fsync = fsync
        self._do_rename = rename
        self._lock = threading.Lock()
        self.entries: dict[str, dict[str, Any] | None] = {}
        self._fail = fail

    def prepare_local_plan(self, plan):
        if self._fail is not None:
            raise self._fail
        return super().prepare_local_plan(plan)

    def _record(self, name: str, entry: dict[str, Any] | None) -> None:
        with self._lock:
            self.entries[name] = entry

    def _rename(self, src: str, dst: str) -> None:
        self._do_rename(src, dst)
        old, new = os.path.basename(src), os.path.basename(dst)
        with self._lock:
            if old in self.entries:
                self.entries[new] = self.entries.pop(old)

    def stage(self, state_dict):  # the store stages (snapshots) the state itself
        return state_dict
