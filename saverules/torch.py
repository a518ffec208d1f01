"""A crash-safe checkpoint store for PyTorch training loops.

:class:`Checkpointer` asks the policy's decider on every step, and when the
answer is "save" it writes the training state so that the save cannot be lost
half-way: every checkpoint is written into a hidden temporary directory,
fsynced, and renamed into place; ``manifest.json`` (sizes and sha256 of every
file) is written last, so a directory without a valid manifest is never taken
for a checkpoint.  On resume the newest checkpoint is verified and the store
falls back to the previous good one, with a warning, when it is damaged.

Files are read with ``torch.load(weights_only=True)``: a checkpoint can only
hold tensors, numbers, strings, bytes, ``None`` and lists / tuples / dicts of
those, and no code from a checkpoint ever runs.  See docs/checkpoints.md for
the on-disk format and the guarantees.

This is the only module of the library (apart from the reference training
loop) that imports torch; ``import saverules`` does not.
"""
from __future__ import annotations

import atexit
import bisect
import collections
import copy as _copy
import ctypes
import dataclasses
import errno as _errno
import hashlib
import json
import logging
import math
import mmap
import os
import pickle
import queue
import random
import secrets
import shutil
import sys
import threading
import time as _time
import warnings
import weakref
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Mapping, MutableMapping, Optional, Sequence, Tuple, Union

import torch

try:
    import numpy as _np
except ImportError:  # pragma: no cover - numpy ships with torch wheels; without it chunks are hashed in step
    _np = None

from .progress import Checkpoint, Decision, Progress

__all__ = [
    "Checkpointer",
    "CheckpointInfo",
    "CheckpointError",
    "CheckpointWriteError",
    "CheckpointVerifyError",
    "UnsafeCheckpointError",
    "StateTypeError",
    "CheckpointWarning",
    "rng_state",
    "restore_rng_state",
    "scan",
    "inspect_checkpoint",
    "MANIFEST",
    "STATE_FILE",
    "WEIGHTS_FILE",
    "POLICY_FILE",
    "FORMAT_VERSION",
]

log = logging.getLogger("saverules.torch")
log.addHandler(logging.NullHandler())  # warnings reach the user through `warnings`; logs only when configured

#: File names inside a checkpoint directory and in the store's root.
MANIFEST = "manifest.json"
STATE_FILE = "state.pt"
WEIGHTS_FILE = "model.safetensors"
POLICY_FILE = "policy.toml"

#: ``manifest.json`` identifies itself with these two fields.
FORMAT_NAME = "saverules-checkpoint"
FORMAT_VERSION = 1
#: ``state.pt`` holds a dict tagged with this name.
PAYLOAD_NAME = "saverules-state"

_TMP_PREFIX = ".tmp-"   # a checkpoint being written
_OLD_PREFIX = ".old-"   # a checkpoint being replaced by one of the same name
_DEL_PREFIX = ".del-"   # a checkpoint being deleted by retention
_HIDDEN_PREFIXES = (_TMP_PREFIX, _OLD_PREFIX, _DEL_PREFIX)

_MAX_MANIFEST_BYTES = 16 << 20
_CHUNK = 4 << 20
_PARALLEL_HASH_MIN = 1 << 20

_VERIFY_CHOICES = ("hash", "load", "none")
_ON_ERROR_CHOICES = ("raise", "warn")

#: Temporary directories this process is writing right now (never cleaned up).
_INFLIGHT: set = set()
_INFLIGHT_LOCK = threading.Lock()


# --------------------------------------------------------------------------
# Errors and warnings
# --------------------------------------------------------------------------


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, verified or read."""


class CheckpointWriteError(CheckpointError):
    """Writing a checkpoint failed (disk full, read-only, permission...).

    ``path`` is the file or directory that failed, ``errno`` the OS error
    number (``None`` when the failure was not an OS error).  The partial write
    has been removed and older checkpoints are untouched.
    """

    def __init__(self, message: str, path: Optional[str] = None, errno: Optional[int] = None):
        super().__init__(message)
        self.path = path
        self.errno = errno


class CheckpointVerifyError(CheckpointError):
    """A checkpoint just written did not read back as written."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file needs arbitrary pickled objects; it was refused unread."""


class StateTypeError(TypeError):
    """The training state holds a value a checkpoint may not store."""


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped, a save failed under ``on_error="warn"``..."""


def _warn(message: str) -> None:
    log.warning(message)
    warnings.warn(message, CheckpointWarning, stacklevel=3)


# --------------------------------------------------------------------------
# Safe types
# --------------------------------------------------------------------------

_SCALAR_TYPES = frozenset({int, float, bool, str, bytes, type(None)})
_KEY_TYPES = frozenset({int, float, bool, str, type(None)})
_TORCH_LEAF_TYPES = frozenset({torch.Size, torch.dtype, torch.device})
_TENSOR_TYPES = frozenset({torch.Tensor, torch.nn.Parameter})


def _type_name(value: Any) -> str:
    t = type(value)
    mod = t.__module__
    return t.__qualname__ if mod == "builtins" else f"{mod}.{t.__qualname__}"


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


class _Snapshot:
    """Copies tensors to CPU memory that a background writer may own.

    Tensors sharing one storage are copied once and stay shared.  Buffers of
    the previous snapshot are reused when the sizes match, so a steady state
    copies into memory that is already mapped.
    """

    def __init__(self, pool: Optional[Dict[int, List[torch.Tensor]]] = None):
        self.memo: Dict[tuple, torch.UntypedStorage] = {}
        self.pool = pool if pool is not None else {}
        self.buffers: List[torch.Tensor] = []
        self.pinned = torch.cuda.is_available()
        self.needs_sync = False

    def _buffer(self, nbytes: int, pin: bool) -> torch.Tensor:
        free = self.pool.get(nbytes)
        if free:
            buf = free.pop()
        else:
            buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
        self.buffers.append(buf)
        return buf

    def tensor(self, t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        nbytes = st.nbytes()
        key = (st.data_ptr(), nbytes, t.device)
        new = self.memo.get(key)
        if new is None:
            on_cpu = t.device.type == "cpu"
            pin = self.pinned and not on_cpu
            buf = self._buffer(nbytes, pin)
            if nbytes and on_cpu:
                # One plain memcpy (the GIL is released): steadier than Tensor.copy_, whose
                # worker threads slow to a crawl when other processes hold the cores.
                ctypes.memmove(buf.data_ptr(), st.data_ptr(), nbytes)
            elif nbytes:
                src = torch.empty(0, dtype=torch.uint8, device=t.device).set_(st, 0, (nbytes,), (1,))
                buf.copy_(src, non_blocking=pin)
                self.needs_sync = self.needs_sync or pin
            new = buf.untyped_storage()
            self.memo[key] = new
        out = torch.empty(0, dtype=t.dtype)
        out.set_(new, t.storage_offset(), t.size(), t.stride())
        return out

    def finish(self) -> None:
        if self.needs_sync:
            torch.cuda.synchronize()


def _checked(value: Any, where: str, snap: Optional[_Snapshot]) -> Any:
    """Check that ``value`` holds only safe types; return a snapshot copy when ``snap`` is given."""
    t = type(value)
    if t in _SCALAR_TYPES or t in _TORCH_LEAF_TYPES:
        return value
    if t in _TENSOR_TYPES:
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
            f"{where}: tensor subclass {_type_name(value)} cannot be checkpointed safely; store a plain tensor"
        )
    if t is dict or t is collections.OrderedDict:
        out = t() if snap is not None else None
        for k, v in value.items():
            if type(k) not in _KEY_TYPES:
                raise StateTypeError(
                    f"{where}: dict key {k!r} of type {_type_name(k)} is not allowed; use str or int keys"
                )
            item = _checked(v, f"{where}[{k!r}]", snap)
            if out is not None:
                out[k] = item
        meta = getattr(value, "_metadata", None) if t is collections.OrderedDict else None
        if meta is not None:
            meta = _checked(meta, f"{where}._metadata", None)
            if out is not None:
                out._metadata = _copy.deepcopy(meta)
        return out if out is not None else value
    if t is list or t is tuple:
        items = [_checked(v, f"{where}[{i}]", snap) for i, v in enumerate(value)]
        if snap is None:
            return value
        return items if t is list else tuple(items)
    raise StateTypeError(f"{where}: {_type_name(value)} is not a type a checkpoint may hold{_hint(value)}")


def _has_state_dict(obj: Any) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))


# --------------------------------------------------------------------------
# Random number generators
# --------------------------------------------------------------------------


def rng_state() -> dict:
    """The state of every random generator the training loop is likely to use, as safe types.

    Covers Python's ``random``, torch's CPU generator, every CUDA device's
    generator when CUDA is available, and numpy's global generator when numpy
    is importable.  Put the result in the checkpointed state and give it back
    to :func:`restore_rng_state` after :meth:`Checkpointer.load_latest`.
    """
    version, internal, gauss = random.getstate()
    state: Dict[str, Any] = {
        "python": [int(version), [int(x) for x in internal], gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    try:
        import numpy
    except ImportError:  # pragma: no cover - numpy is optional
        numpy = None
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
        raise TypeError(f"restore_rng_state expects the dict rng_state() returned, got {_type_name(state)}")
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
            _warn(
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


# --------------------------------------------------------------------------
# File-system primitives (one place, so tests can inject failures)
# --------------------------------------------------------------------------


class _FileSystem:
    """Every call the store makes that changes the disk."""

    def mkdir(self, path: str) -> None:
        os.mkdir(path)

    def makedirs(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)

    def open_write(self, path: str):
        return open(path, "xb", buffering=1 << 20)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def fsync_dir(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def rename(self, src: str, dst: str) -> None:
        os.rename(src, dst)

    def rmtree(self, path: str) -> None:
        shutil.rmtree(path)


_fs = _FileSystem()


class _HashWorker:
    """One daemon thread that hashes chunks, in the order they were written, while the caller goes on writing.

    A daemon thread (not a ThreadPoolExecutor, which refuses work once the
    interpreter starts shutting down) so that a write still in flight at exit
    can finish.  hashlib releases the GIL on large buffers, so hashing runs
    on another core while the writer copies bytes into the page cache.
    """

    def __init__(self):
        self._queue: "queue.SimpleQueue" = queue.SimpleQueue()
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()

    def _loop(self) -> None:
        while True:
            stream, data, done = self._queue.get()
            if data is not None and stream.error is None:
                try:
                    stream.h.update(data)
                except BaseException as exc:  # reported to the writer when it waits
                    stream.error = exc
            if done is not None:
                done.set()

    def submit(self, stream: "_HashStream", data, wait: bool = False) -> Optional[threading.Event]:
        """Queue ``data`` for ``stream``; with ``wait``, return an event set once it (and all before it) is hashed."""
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="saverules-hash", daemon=True)
                self._thread.start()
        done = threading.Event() if wait else None
        self._queue.put((stream, data, done))
        return done

    def _after_fork(self) -> None:
        self._queue = queue.SimpleQueue()
        self._thread = None
        self._lock = threading.Lock()


_HASHER = _HashWorker()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_HASHER._after_fork)


class _HashStream:
    """The sha256 of one file, fed in write order by the hash worker."""

    __slots__ = ("h", "error")

    def __init__(self):
        self.h = hashlib.sha256()
        self.error: Optional[BaseException] = None


class _Stable:
    """Memory that stays alive and unchanged until a file has been written and hashed.

    The store knows which CPU tensors a save writes (the caller's tensors,
    which the training thread does not touch during a synchronous save, or
    the async snapshot, which the writer owns).  A chunk that ``torch.save``
    or the safetensors writer hands to ``write`` from inside one of them can
    be hashed later, from the tensor's own memory, so the writer need not
    wait for the hash.  Any other chunk (a temporary copy from a GPU, a
    buffer of torch's own) is only valid during the ``write`` call.
    """

    def __init__(self, tensors):
        spans: Dict[int, Tuple[int, memoryview]] = {}
        if _np is not None:
            for t in tensors:
                if t.device.type != "cpu":
                    continue
                st = t.untyped_storage()
                start, n = st.data_ptr(), st.nbytes()
                if n < _PARALLEL_HASH_MIN or start in spans:
                    continue
                whole = torch.empty(0, dtype=torch.uint8).set_(st, 0, (n,), (1,))
                spans[start] = (n, memoryview(whole.numpy()))
        self._starts = sorted(spans)
        self._spans = spans

    def view(self, data) -> Optional[memoryview]:
        """A view of the same bytes from memory the store keeps alive, or None."""
        if not self._starts:
            return None
        try:
            addr = _np.frombuffer(data, dtype=_np.uint8).ctypes.data
        except (TypeError, ValueError):
            return None
        n = memoryview(data).nbytes
        i = bisect.bisect_right(self._starts, addr) - 1
        if i < 0:
            return None
        start = self._starts[i]
        size, whole = self._spans[start]
        if addr + n > start + size:
            return None
        return whole[addr - start: addr - start + n]


_NO_STABLE = _Stable(())


class _HashingFile:
    """A write-only file object that computes sha256 and size of what goes through it.

    The hash is computed on the hash worker thread.  Chunks from memory that
    the save keeps alive (:class:`_Stable`) are queued by reference and the
    writer moves on at once; small chunks are gathered into a copy and queued
    a megabyte at a time; other large chunks are queued and waited for before
    ``write`` returns (their memory is only valid during the call).
    """

    def __init__(self, f, stable: _Stable = _NO_STABLE):
        self._f = f
        self._stream = _HashStream()
        self._small = bytearray()
        self._stable = stable
        self._finished = False
        self.size = 0

    def write(self, data) -> int:
        n = memoryview(data).nbytes
        if n < _PARALLEL_HASH_MIN:
            self._f.write(data)
            self._small += data
            if len(self._small) >= _PARALLEL_HASH_MIN:
                self.push()
        else:
            self.push()
            view = self._stable.view(data)
            if view is not None:
                _HASHER.submit(self._stream, view)
                self._f.write(data)
            else:
                done = _HASHER.submit(self._stream, data, wait=True)
                try:
                    self._f.write(data)
                finally:
                    done.wait()  # the buffer is only valid during this call
                self._check()
        self.size += n
        return n

    def push(self) -> None:
        """Queue the small chunks gathered so far."""
        if self._small:
            _HASHER.submit(self._stream, self._small)
            self._small = bytearray()

    def _check(self) -> None:
        if self._stream.error is not None:
            raise self._stream.error

    def flush(self) -> None:
        self._f.flush()

    def drain(self) -> None:
        """Wait until the worker is done with everything queued for this file (errors are not raised)."""
        _HASHER.submit(self._stream, None, wait=True).wait()

    def finish(self) -> None:
        """Hash everything written so far and wait for it; raise a hashing error."""
        self.push()
        self.drain()
        self._finished = True
        self._check()

    def hexdigest(self) -> str:
        if not self._finished:
            self.finish()
        return self._stream.h.hexdigest()


class _Producer:
    """What fills one file: ``fn(fileobj)``, and the tensors whose memory it writes from."""

    __slots__ = ("fn", "tensors")

    def __init__(self, fn, tensors=()):
        self.fn = fn
        self.tensors = tensors

    def __call__(self, f) -> None:
        self.fn(f)


def _tensors_in(obj: Any) -> List[torch.Tensor]:
    """Every tensor inside nested dicts, lists and tuples."""
    out: List[torch.Tensor] = []
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            out.append(x)
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
    return out


def _write_file(path: str, producer) -> Dict[str, Any]:
    """Create ``path``, let ``producer(fileobj)`` fill it, fsync it; return its size and sha256.

    The sha256 is computed from the bytes handed to the file, on the hash
    worker, while this thread writes and then fsyncs.
    """
    tensors = getattr(producer, "tensors", ())
    stable = _Stable(tensors) if tensors else _NO_STABLE
    with _fs.open_write(path) as f:
        hf = _HashingFile(f, stable)
        try:
            producer(hf)
            hf.push()
            f.flush()
            _fs.fsync(f.fileno())
        except BaseException:
            hf.drain()  # nothing queued may outlive the memory it points into
            raise
        digest = hf.hexdigest()
    return {"size": hf.size, "sha256": digest}


def _hash_file(path: Union[str, Path]) -> Tuple[int, str]:
    """Re-read ``path`` from the file system; return its size and sha256.

    A file inside a temporary directory this process is writing right now
    (the check after a save) is read through a read-only memory map, which
    hashes the cached pages without copying them first.  Every other file is
    read in chunks: a map would turn a file that another process truncates
    meanwhile into a SIGBUS instead of an error.
    """
    with open(path, "rb", buffering=0) as f:
        if os.path.dirname(os.fspath(path)) in _INFLIGHT:
            mapped = _hash_mapped(f)
            if mapped is not None:
                return mapped
        h = hashlib.sha256()
        size = 0
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
            size += n
    return size, h.hexdigest()


def _hash_mapped(f) -> Optional[Tuple[int, str]]:
    size = os.fstat(f.fileno()).st_size
    if not size:
        return None
    try:
        m = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ)
    except (OSError, ValueError):  # a file system without mmap: read it instead
        return None
    try:
        if hasattr(m, "madvise") and hasattr(mmap, "MADV_SEQUENTIAL"):
            m.madvise(mmap.MADV_SEQUENTIAL)
        return size, hashlib.sha256(m).hexdigest()
    finally:
        m.close()


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def _split_hidden(name: str) -> Optional[Tuple[str, str, int]]:
    """``.tmp-<name>-<pid>-<rand>`` -> (prefix, name, pid); None when it is not ours."""
    for prefix in _HIDDEN_PREFIXES:
        if name.startswith(prefix):
            parts = name[len(prefix):].rsplit("-", 2)
            if len(parts) == 3 and parts[1].isdigit() and parts[0]:
                return prefix, parts[0], int(parts[1])
    return None


def _hidden_name(prefix: str, name: str) -> str:
    return f"{prefix}{name}-{os.getpid()}-{secrets.token_hex(4)}"


# --------------------------------------------------------------------------
# Reading the store: manifests, verification, listing
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """One checkpoint directory as the store sees it.

    ``verified`` is True when every file was re-hashed and matched the
    manifest, False when something is wrong (``error`` says what), and None
    when only the manifest and file sizes were checked.  ``time`` is the
    training clock (seconds) at the save, ``utc`` the wall-clock moment.
    """

    path: Path
    name: str
    step: Optional[int] = None
    epoch: Optional[int] = None
    time: Optional[float] = None
    utc: Optional[datetime] = None
    reasons: Tuple[str, ...] = ()
    size: int = 0
    verified: Optional[bool] = None
    error: Optional[str] = None
    final: bool = False
    metrics: Optional[Mapping[str, float]] = None
    policy_digest: Optional[str] = None
    format: Optional[str] = None
    manifest: Optional[Mapping[str, Any]] = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        """Usable: the manifest and files check out (``verified`` is not False)."""
        return self.error is None and self.verified is not False

    def as_checkpoint(self) -> Checkpoint:
        """What retention sees."""
        return Checkpoint(self.step, self.time, self.metrics, self.final)


class _Invalid(Exception):
    pass


def _check_manifest(data: Any) -> Dict[str, Any]:
    if not isinstance(data, dict):
        raise _Invalid("manifest.json is not a JSON object")
    if data.get("format") != FORMAT_NAME:
        raise _Invalid("manifest.json is not a saverules manifest")
    version = data.get("format_version")
    if type(version) is not int or version < 1:
        raise _Invalid("manifest.json has no valid format_version")
    if version > FORMAT_VERSION:
        raise _Invalid(
            f"manifest format version {version} is newer than this saverules reads ({FORMAT_VERSION}); upgrade saverules"
        )
    step = data.get("step")
    if type(step) is not int or step < 0:
        raise _Invalid("manifest.json has no valid step")
    epoch = data.get("epoch")
    if type(epoch) is not int or epoch < 0:
        raise _Invalid("manifest.json has no valid epoch")
    clock = data.get("time")
    if clock is not None and (type(clock) not in (int, float) or not math.isfinite(clock)):
        raise _Invalid("manifest.json has no valid time")
    reasons = data.get("reasons")
    if not isinstance(reasons, list) or not all(isinstance(r, str) for r in reasons):
        raise _Invalid("manifest.json has no valid reasons")
    utc = data.get("utc")
    try:
        moment = datetime.fromisoformat(utc) if isinstance(utc, str) else None
    except ValueError:
        moment = None
    if moment is None:
        raise _Invalid("manifest.json has no valid utc time")
    metrics = data.get("metrics")
    if metrics is not None and not (
        isinstance(metrics, dict) and all(isinstance(k, str) and type(v) in (int, float) for k, v in metrics.items())
    ):
        raise _Invalid("manifest.json has invalid metrics")
    files = data.get("files")
    if not isinstance(files, dict) or STATE_FILE not in files:
        raise _Invalid(f"manifest.json lists no {STATE_FILE}")
    for fname, entry in files.items():
        if (
            not isinstance(fname, str)
            or fname in ("", ".", "..", MANIFEST)
            or "/" in fname
            or "\\" in fname
            or "\0" in fname
        ):
            raise _Invalid(f"manifest.json lists a bad file name {fname!r}")
        if (
            not isinstance(entry, dict)
            or type(entry.get("size")) is not int
            or entry["size"] < 0
            or not isinstance(entry.get("sha256"), str)
            or len(entry["sha256"]) != 64
        ):
            raise _Invalid(f"manifest.json has a bad entry for {fname}")
    return data


def _read_manifest(path: Path) -> Dict[str, Any]:
    mpath = path / MANIFEST
    try:
        with open(mpath, "rb") as f:
            raw = f.read(_MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        raise _Invalid("manifest.json is missing") from None
    except OSError as exc:
        raise _Invalid(f"cannot read manifest.json: {exc.strerror or exc}") from None
    if len(raw) > _MAX_MANIFEST_BYTES:
        raise _Invalid("manifest.json is too large")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise _Invalid(f"manifest.json is damaged ({exc})") from None
    return _check_manifest(data)


def _signature(path: Path, manifest: Optional[Mapping[str, Any]]) -> Optional[tuple]:
    """A cheap fingerprint of the files: when it is unchanged, a past hash check still holds."""
    names = [MANIFEST] + (sorted(manifest["files"]) if manifest else [])
    sig = []
    for fname in names:
        try:
            st = os.stat(path / fname)
        except OSError:
            return None
        sig.append((fname, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))
    return tuple(sig)


def _info_from_manifest(path: Path, root: Path, m: Mapping[str, Any], verified, error) -> CheckpointInfo:
    return CheckpointInfo(
        path=path,
        name=os.path.relpath(path, root),
        step=m["step"],
        epoch=m["epoch"],
        time=float(m["time"]) if m.get("time") is not None else None,
        utc=datetime.fromisoformat(m["utc"]),
        reasons=tuple(m["reasons"]),
        size=sum(int(e["size"]) for e in m["files"].values()),
        verified=verified,
        error=error,
        final=bool(m.get("final", "final" in m["reasons"])),
        metrics=dict(m["metrics"]) if m.get("metrics") is not None else None,
        policy_digest=m.get("policy_digest"),
        format=m.get("storage_format"),
        manifest=m,
    )


def _disk_size(path: Path) -> int:
    total = 0
    try:
        for entry in os.scandir(path):
            try:
                if entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
            except OSError:
                pass
    except OSError:
        pass
    return total


def inspect_checkpoint(path: Union[str, os.PathLike], root: Union[str, os.PathLike, None] = None,
                       verify: bool = True) -> CheckpointInfo:
    """Read one checkpoint directory's manifest and check its files.

    With ``verify`` every file is re-hashed (``verified`` True / False);
    without it only the manifest and the file sizes are checked
    (``verified`` None unless a problem was found).
    """
    path = Path(path)
    root = Path(root) if root is not None else path.parent
    try:
        manifest = _read_manifest(path)
    except _Invalid as exc:
        return CheckpointInfo(path=path, name=os.path.relpath(path, root), size=_disk_size(path),
                              verified=False, error=str(exc))
    for fname, entry in manifest["files"].items():
        fpath = path / fname
        try:
            size = os.stat(fpath).st_size
        except FileNotFoundError:
            return _info_from_manifest(path, root, manifest, False, f"{fname} is missing")
        except OSError as exc:
            return _info_from_manifest(path, root, manifest, False, f"cannot read {fname}: {exc.strerror or exc}")
        if size != entry["size"]:
            return _info_from_manifest(
                path, root, manifest, False, f"{fname} has {size} bytes, the manifest says {entry['size']} (truncated?)"
            )
    if not verify:
        return _info_from_manifest(path, root, manifest, None, None)
    for fname, entry in manifest["files"].items():
        try:
            size, digest = _hash_file(path / fname)
        except OSError as exc:
            return _info_from_manifest(path, root, manifest, False, f"cannot read {fname}: {exc.strerror or exc}")
        if size != entry["size"]:
            return _info_from_manifest(
                path, root, manifest, False, f"{fname} has {size} bytes, the manifest says {entry['size']} (truncated?)"
            )
        if digest != entry["sha256"]:
            return _info_from_manifest(path, root, manifest, False, f"{fname} does not match its sha256 (damaged)")
    return _info_from_manifest(path, root, manifest, True, None)


def _looks_like_checkpoint(path: Path) -> bool:
    """A directory without a manifest that holds checkpoint files (an unfinished or damaged one)."""
    try:
        for entry in os.scandir(path):
            if entry.name == STATE_FILE or entry.name.endswith(".safetensors"):
                return True
    except OSError:
        return False
    return False


def _candidates(root: Path) -> List[Path]:
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return []
    out = []
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            if not entry.is_dir(follow_symlinks=False):
                continue
        except OSError:
            continue
        path = Path(entry.path)
        if os.path.lexists(path / MANIFEST) or _looks_like_checkpoint(path):
            out.append(path)
    return out


def _sort_key(info: CheckpointInfo):
    known = info.step is not None
    return (
        not known,
        info.step if known else 0,
        info.time if info.time is not None else -math.inf,
        info.utc.timestamp() if info.utc is not None else -math.inf,
        info.name,
    )


class _VerifyCache:
    """Remembers hash checks by file fingerprint, so each checkpoint is hashed once."""

    def __init__(self):
        self._lock = threading.Lock()
        self._entries: Dict[str, Tuple[tuple, CheckpointInfo]] = {}

    def get(self, path: Path, root: Path, deep: bool) -> CheckpointInfo:
        shallow = inspect_checkpoint(path, root, verify=False)
        if not deep or shallow.error is not None:
            return shallow
        sig = _signature(path, shallow.manifest)
        key = str(path)
        with self._lock:
            hit = self._entries.get(key)
        if hit is not None and sig is not None and hit[0] == sig:
            return hit[1]
        info = inspect_checkpoint(path, root, verify=True)
        if sig is not None and sig == _signature(path, info.manifest):
            with self._lock:
                self._entries[key] = (sig, info)
        return info

    def put(self, path: Path, info: CheckpointInfo) -> None:
        sig = _signature(path, info.manifest)
        if sig is not None:
            with self._lock:
                self._entries[str(path)] = (sig, info)

    def forget(self, path: Path) -> None:
        with self._lock:
            self._entries.pop(str(path), None)


def scan(dir: Union[str, os.PathLike], verify: bool = True, _cache: Optional[_VerifyCache] = None) -> List[CheckpointInfo]:
    """Every checkpoint directory under ``dir``, oldest first, each with its verification status.

    Directories that hold checkpoint files but no valid manifest are listed
    too (``verified`` False, step None, at the end).
    """
    root = Path(dir)
    infos = []
    for path in _candidates(root):
        if _cache is not None:
            infos.append(_cache.get(path, root, verify))
        else:
            infos.append(inspect_checkpoint(path, root, verify=verify))
    infos.sort(key=_sort_key)
    return infos


# --------------------------------------------------------------------------
# Safetensors layout
# --------------------------------------------------------------------------


def _safetensors_dtypes() -> frozenset:
    names = [
        "float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
        "float8_e4m3fn", "float8_e5m2",
    ]
    return frozenset(getattr(torch, n) for n in names if hasattr(torch, n))


_ST_DTYPES = _safetensors_dtypes()


def _is_weights_dict(sd: Any) -> bool:
    if type(sd) not in (dict, collections.OrderedDict) or not sd:
        return False
    for k, v in sd.items():
        if type(k) is not str or type(v) not in _TENSOR_TYPES:
            return False
        if v.dtype not in _ST_DTYPES or v.layout != torch.strided:
            return False
    return True


def _split_weights(objects: Dict[str, Any]):
    """Move plain ``{name: tensor}`` state dicts into one safetensors dict.

    Returns (tensors for the .safetensors file, layout to rebuild the state
    dicts, the objects that stay in the torch file).  Entries that are the
    same view of one storage (tied weights) are stored once; different views
    of one storage are copied apart, since safetensors refuses shared memory.
    """
    weights: Dict[str, torch.Tensor] = {}
    layout: Dict[str, Any] = {}
    rest: Dict[str, Any] = {}
    views: Dict[tuple, str] = {}
    by_storage: Dict[tuple, List[str]] = {}
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


_ST_CODES = {
    name: code
    for name, code in (
        ("float64", "F64"), ("float32", "F32"), ("float16", "F16"), ("bfloat16", "BF16"), ("int64", "I64"),
        ("int32", "I32"), ("int16", "I16"), ("int8", "I8"), ("uint8", "U8"), ("bool", "BOOL"),
        ("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"),
    )
}


def _write_safetensors(f, weights: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """Write ``weights`` in the safetensors layout, streaming each tensor's bytes from its own memory.

    The layout: an 8-byte little-endian header length, a JSON header (padded
    with spaces to a multiple of 8) giving each tensor's dtype, shape and byte
    range, then the bytes of the tensors back to back.  Unlike
    ``safetensors.torch.save`` no copy of the whole file is built in memory.
    """
    header: Dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    order = []
    for name, t in weights.items():
        if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
            raise CheckpointError("the safetensors format needs a little-endian machine")
        nbytes = t.numel() * t.element_size()
        header[name] = {
            "dtype": _ST_CODES[str(t.dtype).replace("torch.", "")],
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
        f.write(memoryview(flat.numpy()))


def _rebuild_weights(loaded: Mapping[str, torch.Tensor], layout: Mapping[str, Any]) -> Dict[str, Any]:
    out = {}
    for name, lay in layout.items():
        sd = collections.OrderedDict() if lay.get("ordered") else {}
        for k, stk in zip(lay["keys"], lay["tensors"]):
            sd[k] = loaded[stk]
        if lay.get("metadata") is not None and isinstance(sd, collections.OrderedDict):
            sd._metadata = lay["metadata"]
        out[name] = sd
    return out


# --------------------------------------------------------------------------
# Reading checkpoint files
# --------------------------------------------------------------------------


_ZIP_MAGIC = b"PK\x03\x04"


def _unsafe_detail(text: str) -> Optional[str]:
    """The line of a weights-only refusal that names the object the file asked for, if any."""
    for line in text.splitlines():
        if "GLOBAL" in line or "global" in line:
            return line.strip()
    return None


def _torch_load(path: Path, map_location: Any, mmap: bool = False) -> Any:
    # The store writes torch's zip format only. Anything else is not one of its files, and
    # is never handed to torch.load (whose fallback for other files is the legacy pickle path).
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


def _st_device(map_location: Any) -> str:
    if map_location is None:
        return "cpu"
    if isinstance(map_location, (str, torch.device)):
        return str(map_location)
    return "cpu"


def _read_payload(info: CheckpointInfo, map_location: Any) -> Dict[str, Any]:
    payload = _torch_load(info.path / STATE_FILE, map_location)
    if not isinstance(payload, dict) or payload.get("format") != PAYLOAD_NAME:
        raise CheckpointError(f"saverules: {info.path / STATE_FILE} is not a saverules state file")
    if payload.get("step") != info.step:
        raise CheckpointError(
            f"saverules: {info.path / STATE_FILE} holds step {payload.get('step')}, the manifest says {info.step}"
        )
    layout = payload.get("safetensors") or {}
    if layout:
        from safetensors.torch import load_file

        wpath = info.path / WEIGHTS_FILE
        try:
            loaded = load_file(str(wpath), device=_st_device(map_location))
        except Exception as exc:
            raise CheckpointError(f"saverules: cannot read {wpath}: {exc}") from exc
        try:
            rebuilt = _rebuild_weights(loaded, layout)
        except KeyError as exc:
            raise CheckpointError(f"saverules: {wpath} lacks tensor {exc}") from None
        payload["objects"].update(rebuilt)
    return payload


# --------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------

_LIVE: "weakref.WeakSet[Checkpointer]" = weakref.WeakSet()


def _close_all_at_exit() -> None:
    for ckpt in list(_LIVE):
        try:
            ckpt._finish_at_exit()
        except BaseException as exc:  # pragma: no cover - reported, never raised at exit
            print(f"saverules: a checkpoint write failed: {exc}", file=sys.stderr)


atexit.register(_close_all_at_exit)


def _library_version() -> Optional[str]:
    import saverules

    version = getattr(saverules, "__version__", None)
    if version:
        return str(version)
    try:
        from importlib.metadata import version as _v

        return _v("saverules")
    except Exception:
        return None


def _policy_text(policy: Any) -> str:
    """TOML that :func:`saverules.loads` reads back into a policy with the same retention and storage."""
    source = getattr(policy, "source", None)
    if isinstance(source, str) and source and not source.startswith("<"):
        try:
            with open(source, "r", encoding="utf-8") as f:
                text = f.read()
            import saverules

            if saverules.loads(text, source).digest == policy.digest:
                return text
        except Exception:
            pass
    lines = [
        "# Written by saverules.torch: the policy was not loaded from a file, so only the parts",
        "# that `python -m saverules.ls` needs (retention and storage) are recorded here.",
        f"# digest of the full policy: {policy.digest}",
        "version = 1",
    ]
    ret = getattr(policy, "retention", None)
    if ret is not None:
        lines.append("")
        lines.append("[retention]")
        lines.append(f"keep_last = {int(ret.keep_last)}")
        if ret.keep_every is not None:
            lines.append(f"keep_every = {int(ret.keep_every)}")
        if ret.keep_best is not None:
            kb = ret.keep_best
            lines.append("")
            lines.append("[retention.keep_best]")
            lines.append(f"metric = {json.dumps(kb.metric)}")
            lines.append(f"mode = {json.dumps(kb.mode)}")
            lines.append(f"n = {int(kb.n)}")
    st = policy.storage
    lines += ["", "[storage]", f"dir = {json.dumps(st.dir)}", f"name = {json.dumps(st.name)}",
              f"format = {json.dumps(st.format)}", ""]
    return "\n".join(lines)


def _error_hint(code: Optional[int]) -> str:
    if code == _errno.ENOSPC:
        return "the disk is full: free some space or point [storage].dir at a larger disk"
    if code == getattr(_errno, "EDQUOT", -1):
        return "the disk quota is exceeded: free some space or point [storage].dir elsewhere"
    if code == _errno.EROFS:
        return "the file system is read-only: point [storage].dir at a writable directory"
    if code in (_errno.EACCES, _errno.EPERM):
        return "permission denied: make the directory writable or point [storage].dir elsewhere"
    return "check the directory and the disk"


@dataclasses.dataclass
class _Job:
    name: str
    step: int
    manifest: Dict[str, Any]
    payload: Dict[str, Any]
    weights: Optional[Dict[str, torch.Tensor]]
    snapshot: Optional[_Snapshot] = None


class Checkpointer:
    """Decides when to save (from the policy) and saves so that no save is ever half-lost.

    Parameters
    ----------
    policy:
        A :class:`saverules.Policy` or the path of a policy TOML file.
    dir:
        The store's directory; overrides ``[storage].dir``.  Relative paths
        are taken from the current directory at construction.
    async_save:
        Copy the state to CPU memory in the training thread and write it from
        one background thread (at most one write in flight).
    verify:
        ``"hash"`` (default) re-reads every file after writing and checks its
        sha256; ``"load"`` also loads it; ``"none"`` skips the re-read.
    on_error:
        ``"raise"`` (default) turns a failed save into an exception;
        ``"warn"`` emits a :class:`CheckpointWarning` and training goes on
        (the next decision to save tries again).
    total_steps:
        Passed to ``policy.compile``; shares of the run ("5%") need it unless
        ``[run].total_steps`` or the Progress carries it.
    run_name:
        The ``{run}`` placeholder of ``[storage].name``.
    sync:
        Under DDP (an initialised process group with more than one rank) the
        decider is wrapped in :class:`saverules.distributed.SyncedDecider`;
        ``sync`` holds its keyword options, e.g. ``{"sync_seconds": 2.0}`` or
        ``{"sync_signals": True}``.  Ignored in a single process.
    """

    def __init__(
        self,
        policy: Any,
        dir: Union[str, os.PathLike, None] = None,
        *,
        async_save: bool = False,
        verify: str = "hash",
        on_error: str = "raise",
        total_steps: Optional[int] = None,
        run_name: str = "run",
        sync: Optional[Mapping[str, Any]] = None,
    ) -> None:
        import saverules

        if isinstance(policy, (str, os.PathLike)):
            policy = saverules.load(policy)
        elif not (hasattr(policy, "compile") and hasattr(policy, "storage") and hasattr(policy, "retain")):
            raise ValueError(
                f"policy must be a saverules.Policy or the path of a policy TOML file, got {_type_name(policy)}"
            )
        if dir is not None and not isinstance(dir, (str, os.PathLike)):
            raise ValueError(f"dir must be a path or None, got {_type_name(dir)}")
        if dir is not None and not os.fspath(dir):
            raise ValueError("dir must not be empty")
        if not isinstance(async_save, bool):
            raise ValueError(f"async_save must be True or False, got {async_save!r}")
        if verify not in _VERIFY_CHOICES:
            raise ValueError(f"verify must be one of {', '.join(map(repr, _VERIFY_CHOICES))}, got {verify!r}")
        if on_error not in _ON_ERROR_CHOICES:
            raise ValueError(f"on_error must be one of {', '.join(map(repr, _ON_ERROR_CHOICES))}, got {on_error!r}")
        if not isinstance(run_name, str) or not run_name or any(c in run_name for c in "/\\\0"):
            raise ValueError(f"run_name must be a non-empty string without path separators, got {run_name!r}")
        fmt = policy.storage.format
        if fmt not in ("torch", "safetensors"):
            raise ValueError(f"[storage].format must be 'torch' or 'safetensors', got {fmt!r}")
        if fmt == "safetensors":
            try:
                import safetensors.torch  # noqa: F401
            except ImportError:
                raise ValueError(
                    "[storage].format = \"safetensors\" needs the safetensors package: pip install safetensors"
                ) from None

        self.policy = policy
        self.dir = Path(os.path.abspath(os.fspath(dir if dir is not None else policy.storage.dir)))
        self.async_save = async_save
        self.verify = verify
        self.on_error = on_error
        self.run_name = run_name
        self.format = fmt

        self.rank, self.world_size = 0, 1
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        if sync is not None and not isinstance(sync, Mapping):
            raise ValueError(f"sync must be a mapping of SyncedDecider options or None, got {_type_name(sync)}")
        decider = policy.compile(total_steps)
        if self.world_size > 1:
            from saverules.distributed import SyncedDecider

            # Under DDP every rank must take the same decision: see docs/distributed.md.
            # ``sync`` passes SyncedDecider's options (sync_seconds, max_interval, sync_signals, ...).
            decider = SyncedDecider(decider, **dict(sync or {}))
        self.decider = decider

        self._clock_offset = 0.0
        self._clock_t0 = _time.monotonic()
        self._cache = _VerifyCache()
        self._warned: set = set()
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None
        self._cost: Optional[Tuple[float, float]] = None  # (stall, write) of a finished asynchronous write
        self._pool: Dict[int, List[torch.Tensor]] = {}
        self._lock = threading.Lock()

        if self.is_writer:
            try:
                _fs.makedirs(str(self.dir))
            except OSError as exc:
                err = self._wrap_os_error(exc, None, str(self.dir), "create the checkpoint directory")
                if on_error == "raise":
                    raise err from exc
                _warn(str(err))
            else:
                self._cleanup()
                self._write_policy_file()
        _LIVE.add(self)

    # -- small public helpers ----------------------------------------------------

    @property
    def is_writer(self) -> bool:
        """True on the process that writes (rank 0, or the only process)."""
        return self.rank == 0

    def clock(self) -> float:
        """Seconds of training so far, continuous across resumes: pass it as ``Progress.time``."""
        return self._clock_offset + (_time.monotonic() - self._clock_t0)

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            self.close()
        except Exception as err:  # do not hide the exception already on its way
            _warn(f"saverules: {err}")

    def __repr__(self) -> str:
        return (
            f"Checkpointer(dir={str(self.dir)!r}, format={self.format!r}, async_save={self.async_save}, "
            f"verify={self.verify!r}, on_error={self.on_error!r})"
        )

    # -- deciding and saving ---------------------------------------------------------

    def step(self, progress: Progress, state: Mapping[str, Any]) -> Decision:
        """Ask the policy about this step; save when it says so. Returns the decision."""
        self._collect(block=False)
        decision = self.decider(progress)
        if decision.save:
            self._save(progress, state, tuple(decision.reasons))
        return decision

    def save(self, progress: Progress, state: Mapping[str, Any], reason: str = "manual") -> Decision:
        """Save now, whatever the policy says; the decider is told (time rules measure from here)."""
        if not isinstance(reason, str) or not reason:
            raise ValueError(f"reason must be a non-empty string, got {reason!r}")
        self._collect(block=False)
        time_ = progress.time if progress.time is not None else self.clock()
        self.decider.note_save(progress.step, time_)
        self._save(progress, state, (reason,))
        return Decision(True, (reason,))

    def wait(self) -> None:
        """Block until the write in flight (if any) is committed; report its failure."""
        self._collect(block=True)

    def close(self) -> None:
        """Wait for pending writes and report a failure. The checkpointer stays usable."""
        self._collect(block=True)

    def _finish_at_exit(self) -> None:
        self._join()
        err, self._error = self._error, None
        if err is not None:
            print(f"saverules: the last checkpoint write failed: {err}", file=sys.stderr)

    def _join(self) -> None:
        thread = self._thread
        if thread is not None:
            thread.join()
            self._thread = None

    def _collect(self, block: bool) -> None:
        thread = self._thread
        if thread is not None:
            if not block and thread.is_alive():
                return
            self._join()
        cost, self._cost = self._cost, None  # the finished asynchronous write's cost (see _save)
        if cost is not None:
            self.decider.note_cost(*cost)
        err, self._error = self._error, None
        if err is not None:
            self._report(err)

    def _report(self, err: BaseException) -> None:
        if self.on_error == "raise" or not isinstance(err, (CheckpointError, OSError)):
            raise err
        _warn(f"{err} (on_error='warn': training continues; the next save will try again)")

    def _save(self, progress: Progress, state: Mapping[str, Any], reasons: Tuple[str, ...]) -> None:
        if not self.is_writer:
            return
        self._collect(block=True)  # at most one write in flight
        # Save cost, for rules that plan with it (adaptive): the training thread's stall
        # (the whole save when synchronous, the snapshot when asynchronous) and the wall
        # time of the whole write, reported to the decider once the write is committed
        # (Decider.note_cost; for an asynchronous write, by _collect).
        started = _time.perf_counter()
        job = self._prepare(progress, state, reasons)
        if self.async_save:
            stall = _time.perf_counter() - started
            thread = threading.Thread(target=self._write_timed, args=(job, started, stall), name="saverules-writer")
            self._thread = thread
            thread.start()
        else:
            try:
                self._run(job)
            except (CheckpointError, OSError) as err:
                self._report(err)
            else:
                elapsed = _time.perf_counter() - started
                self.decider.note_cost(elapsed, elapsed)

    def _write_timed(self, job: _Job, started: float, stall: float) -> None:
        """The background write; its cost is picked up by _collect in the training thread."""
        self._run_background(job)
        if self._error is None:
            self._cost = (stall, _time.perf_counter() - started)

    def _prepare(self, progress: Progress, state: Mapping[str, Any], reasons: Tuple[str, ...]) -> _Job:
        if not isinstance(state, Mapping):
            raise StateTypeError(f"state must be a dict of names to objects and values, got {_type_name(state)}")
        if not isinstance(progress, Progress):
            raise TypeError(f"progress must be a saverules.Progress, got {_type_name(progress)}")
        snap = _Snapshot(self._pool) if self.async_save else None
        if snap is not None:
            self._pool = {}
        objects: Dict[str, Any] = {}
        values: Dict[str, Any] = {}
        for name, obj in state.items():
            if not isinstance(name, str):
                raise StateTypeError(f"state keys must be strings, got {name!r}")
            if _has_state_dict(obj):
                objects[name] = _checked(obj.state_dict(), f"state[{name!r}].state_dict()", snap)
            else:
                values[name] = _checked(obj, f"state[{name!r}]", snap)
        decider_state = _checked(_copy.deepcopy(self.decider.state_dict()), "decider.state_dict()", None)
        if snap is not None:
            snap.finish()
        clock = float(progress.time) if progress.time is not None else self.clock()
        utc = datetime.now(timezone.utc)
        name = self.policy.storage.render_name(step=progress.step, epoch=progress.epoch, time=utc, run=self.run_name)
        weights = None
        if self.format == "safetensors":
            weights, layout, objects = _split_weights(objects)
        else:
            layout = None
        payload = {
            "format": PAYLOAD_NAME,
            "format_version": FORMAT_VERSION,
            "step": int(progress.step),
            "objects": objects,
            "values": values,
            "decider": decider_state,
            "clock": clock,
            "safetensors": layout,
        }
        metrics = None
        if progress.metrics is not None:
            metrics = {}
            for k, v in progress.metrics.items():
                try:
                    metrics[str(k)] = float(v)
                except (TypeError, ValueError):
                    raise StateTypeError(f"Progress.metrics[{k!r}] is not a number: {v!r}") from None
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "name": name,
            "step": int(progress.step),
            "epoch": int(progress.epoch),
            "epoch_end": bool(progress.epoch_end),
            "is_last": progress.is_last,
            "total_steps": progress.total_steps,
            "time": clock,
            "utc": utc.isoformat(),
            "reasons": list(reasons),
            "final": "final" in reasons,
            "metrics": metrics,
            "policy_digest": self.policy.digest,
            "storage_format": self.format,
            "saverules_version": _library_version(),
            "torch_version": torch.__version__,
            "python_version": ".".join(map(str, sys.version_info[:3])),
            "world_size": self.world_size,
        }
        return _Job(name=name, step=int(progress.step), manifest=manifest, payload=payload, weights=weights,
                    snapshot=snap)

    def _run_background(self, job: _Job) -> None:
        try:
            self._run(job)
        except BaseException as err:
            self._error = err
        finally:
            if job.snapshot is not None:
                pool: Dict[int, List[torch.Tensor]] = {}
                for buf in job.snapshot.buffers:
                    pool.setdefault(buf.numel(), []).append(buf)
                job.payload = job.weights = None  # type: ignore[assignment]
                job.snapshot = None
                self._pool = pool

    def _run(self, job: _Job) -> None:
        path = self._commit(job)
        try:
            self._retain(path)
        except Exception as exc:  # retention must never fail a save that was committed
            _warn(f"saverules: retention after saving {path} failed: {exc}")

    # -- the commit protocol -----------------------------------------------------

    def _wrap_os_error(self, exc: OSError, step: Optional[int], path: str, doing: str) -> CheckpointWriteError:
        code = exc.errno
        where = exc.filename if exc.filename else path
        cname = _errno.errorcode.get(code, "") if code is not None else ""
        what = f"the checkpoint for step {step}" if step is not None else "the checkpoint store"
        msg = (
            f"saverules: could not {doing} for {what} at {where}: {exc.strerror or exc}"
            f"{f' ({cname})' if cname else ''}; {_error_hint(code)}. "
            "Nothing was committed and older checkpoints are untouched."
        )
        return CheckpointWriteError(msg, path=str(where), errno=code)

    def _commit(self, job: _Job) -> Path:
        target = self.dir / job.name
        tmp = self.dir / _hidden_name(_TMP_PREFIX, job.name)
        old: Optional[Path] = None
        renamed_in = False
        stage = "create the temporary directory"
        with _INFLIGHT_LOCK:
            _INFLIGHT.add(str(tmp))
        try:
            _fs.makedirs(str(self.dir))
            _fs.mkdir(str(tmp))
            files: Dict[str, Dict[str, Any]] = {}
            if job.weights is not None:
                stage = f"write {WEIGHTS_FILE}"
                files[WEIGHTS_FILE] = self._write_weights(str(tmp / WEIGHTS_FILE), job.weights)
            stage = f"write {STATE_FILE}"
            payload = job.payload
            files[STATE_FILE] = _write_file(
                str(tmp / STATE_FILE), _Producer(lambda f: torch.save(payload, f), _tensors_in(payload))
            )
            if self.verify != "none":
                stage = "verify the files"
                self._verify_written(tmp, files)
            stage = f"write {MANIFEST}"
            manifest = dict(job.manifest, files=files)
            data = json.dumps(manifest, indent=1, sort_keys=True).encode("utf-8")
            _write_file(str(tmp / MANIFEST), lambda f: f.write(data))
            stage = "sync the temporary directory"
            _fs.fsync_dir(str(tmp))
            if os.path.lexists(target):
                stage = "move the previous checkpoint of the same name aside"
                old = self.dir / _hidden_name(_OLD_PREFIX, job.name)
                _fs.rename(str(target), str(old))
            stage = "rename the checkpoint into place"
            _fs.rename(str(tmp), str(target))
            renamed_in = True
            stage = "sync the checkpoint directory"
            _fs.fsync_dir(str(self.dir))
        except BaseException as exc:
            self._abort(tmp, target, old, renamed_in)
            if isinstance(exc, OSError):
                raise self._wrap_os_error(exc, job.step, str(tmp), stage) from exc
            if isinstance(exc, CheckpointError):
                raise
            if isinstance(exc, Exception):
                raise CheckpointError(
                    f"saverules: could not {stage} for the checkpoint for step {job.step} at {tmp}: {exc}. "
                    "Nothing was committed and older checkpoints are untouched."
                ) from exc
            raise
        finally:
            with _INFLIGHT_LOCK:
                _INFLIGHT.discard(str(tmp))
        if old is not None:
            try:
                _fs.rmtree(str(old))
            except OSError as exc:
                _warn(f"saverules: could not remove the replaced checkpoint {old}: {exc}")
        info = _info_from_manifest(target, self.dir, manifest, True if self.verify != "none" else None, None)
        if self.verify != "none":
            self._cache.put(target, info)
        else:
            self._cache.forget(target)
        log.info("saved checkpoint %s (step %d, %s)", target, job.step, ", ".join(job.manifest["reasons"]))
        return target

    def _abort(self, tmp: Path, target: Path, old: Optional[Path], renamed_in: bool) -> None:
        """Undo a failed commit: the store goes back to exactly what it held before."""
        try:
            if os.path.lexists(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
            if renamed_in and os.path.lexists(target):
                # The directory entry could not be made durable: take the new checkpoint
                # out again so that what the error reports (nothing committed) is true.
                trash = self.dir / _hidden_name(_DEL_PREFIX, target.name)
                try:
                    os.rename(target, trash)
                except OSError as exc:
                    _warn(f"saverules: could not withdraw {target} after the failed save: {exc}")
                else:
                    shutil.rmtree(trash, ignore_errors=True)
        finally:
            if old is not None and not os.path.lexists(target) and os.path.lexists(old):
                try:
                    os.rename(old, target)
                except OSError as exc:  # the next construction restores it
                    _warn(f"saverules: could not move {old} back to {target}: {exc}")

    def _write_weights(self, path: str, weights: Dict[str, torch.Tensor]) -> Dict[str, Any]:
        meta = {"format": "pt", "saverules": str(FORMAT_VERSION)}
        return _write_file(path, _Producer(lambda f: _write_safetensors(f, weights, meta), list(weights.values())))

    def _verify_written(self, tmp: Path, files: Mapping[str, Mapping[str, Any]]) -> None:
        for fname, entry in files.items():
            size, digest = _hash_file(tmp / fname)
            if size != entry["size"] or digest != entry["sha256"]:
                raise CheckpointVerifyError(
                    f"saverules: {tmp / fname} did not read back as written "
                    f"({size} bytes, sha256 {digest[:12]}..., expected {entry['size']} bytes, "
                    f"{entry['sha256'][:12]}...); the checkpoint was not committed"
                )
        if self.verify == "load":
            try:
                _torch_load(tmp / STATE_FILE, "cpu", mmap=True)
                if WEIGHTS_FILE in files:
                    from safetensors.torch import load_file

                    load_file(str(tmp / WEIGHTS_FILE), device="cpu")
            except CheckpointError as exc:
                raise CheckpointVerifyError(f"{exc}; the checkpoint was not committed") from exc
            except Exception as exc:
                raise CheckpointVerifyError(
                    f"saverules: {tmp} does not load back ({exc}); the checkpoint was not committed"
                ) from exc

    # -- retention -----------------------------------------------------------------------

    def _retain(self, newest: Path) -> None:
        """Delete what ``policy.retain`` drops, once ``newest`` is committed.

        The plan is made from the manifests first; only when it deletes
        something are the checkpoints re-hashed (each once per process, the
        results are cached) and the plan made again, so that a damaged
        checkpoint is never counted in place of a good one that would go.
        """
        plan = self._plan(scan(self.dir, verify=False), newest)
        if plan and self.verify != "none":
            plan = self._plan(scan(self.dir, verify=True, _cache=self._cache), newest)
        for path in plan:
            self._delete(path)

    def _plan(self, infos: Sequence[CheckpointInfo], newest: Path) -> List[Path]:
        valid = [i for i in infos if i.ok and i.step is not None]
        for info in infos:
            if not info.ok and str(info.path) not in self._warned:
                self._warned.add(str(info.path))
                _warn(
                    f"saverules: checkpoint {info.path} failed verification ({info.error}); it is not counted "
                    "by retention and is left on disk for you to inspect or delete"
                )
        if not valid:
            return []
        keep = self.policy.retain([i.as_checkpoint() for i in valid])
        if len(keep) != len(valid):
            raise CheckpointError(f"policy.retain returned {len(keep)} answers for {len(valid)} checkpoints")
        # The checkpoint just written always stays until the next one is committed.
        return [info.path for info, k in zip(valid, keep) if not k and info.path != newest]

    def _delete(self, path: Path) -> None:
        trash = path.parent / _hidden_name(_DEL_PREFIX, path.name)
        try:
            _fs.rename(str(path), str(trash))
        except OSError as exc:
            _warn(f"saverules: retention could not delete {path}: {exc}")
            return
        self._cache.forget(path)
        try:
            _fs.rmtree(str(trash))
        except OSError as exc:
            _warn(f"saverules: retention could not finish deleting {trash}: {exc}")
        log.info("retention deleted checkpoint %s", path)

    # -- start-up housekeeping ---------------------------------------------------------

    def _cleanup(self) -> None:
        """Remove what an interrupted write left behind; put back a checkpoint caught mid-replacement."""
        try:
            entries = list(os.scandir(self.dir))
        except OSError:
            return
        for entry in entries:
            parsed = _split_hidden(entry.name)
            if parsed is None:
                continue
            prefix, name, pid = parsed
            path = Path(entry.path)
            with _INFLIGHT_LOCK:
                busy = str(path) in _INFLIGHT
            if busy or (pid != os.getpid() and _pid_alive(pid)):
                continue
            try:
                if prefix == _OLD_PREFIX and not os.path.lexists(self.dir / name):
                    os.rename(path, self.dir / name)
                    log.warning("restored checkpoint %s from an interrupted replacement", self.dir / name)
                elif entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(path)
                else:
                    os.unlink(path)
            except OSError as exc:
                _warn(f"saverules: could not clean up {path}: {exc}")

    def _write_policy_file(self) -> None:
        target = self.dir / POLICY_FILE
        try:
            text = _policy_text(self.policy)
        except Exception as exc:  # never fatal: only `saverules.ls` reads it
            log.warning("could not render the policy for %s: %s", target, exc)
            return
        try:
            with open(target, "r", encoding="utf-8") as f:
                if f.read() == text:
                    return
        except OSError:
            pass
        tmp = self.dir / _hidden_name(_TMP_PREFIX, POLICY_FILE)
        try:
            data = text.encode("utf-8")
            _write_file(str(tmp), lambda f: f.write(data))
            _fs.rename(str(tmp), str(target))
            _fs.fsync_dir(str(self.dir))
        except OSError as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            _warn(f"saverules: could not write {target} (used by `python -m saverules.ls`): {exc}")

    # -- reading -------------------------------------------------------------------------

    def list(self) -> List[CheckpointInfo]:
        """Every checkpoint in the store, oldest first, each re-hashed (results are cached)."""
        if self.is_writer:
            self._collect(block=True)
        return scan(self.dir, verify=True, _cache=self._cache)

    def latest(self) -> Optional[CheckpointInfo]:
        """The newest checkpoint that verifies, or None. Damaged newer ones are skipped with a warning."""
        if self.is_writer:
            self._collect(block=True)
        for info in self._newest_first():
            return info
        return None

    def _newest_first(self):
        infos = scan(self.dir, verify=False)
        broken = [i for i in infos if i.step is None]
        for info in broken:
            self._warn_skip(info)
        for shallow in sorted((i for i in infos if i.step is not None), key=_sort_key, reverse=True):
            info = self._cache.get(shallow.path, self.dir, True) if shallow.ok else shallow
            if info.ok:
                yield info
            else:
                self._warn_skip(info)

    def _warn_skip(self, info: CheckpointInfo) -> None:
        key = (str(info.path), info.error)
        if key in self._warned:
            return
        self._warned.add(key)
        _warn(f"saverules: skipping checkpoint {info.path}: {info.error}; falling back to an older checkpoint")

    def load_latest(self, state: MutableMapping[str, Any], map_location: Any = "cpu") -> Optional[Progress]:
        """Restore the newest good checkpoint into ``state`` and the decider.

        Objects with ``load_state_dict`` get it called; plain values are
        written back into ``state``.  Returns the Progress of the saved step
        (continue with ``step + 1``), or None when there is nothing to resume.
        """
        if not isinstance(state, MutableMapping):
            raise TypeError(
                f"state must be a mutable mapping (a dict) of names to objects and values, so that plain values "
                f"can be written back; got {_type_name(state)}"
            )
        if self.is_writer:
            self._collect(block=True)
        for info in self._newest_first():
            try:
                payload = _read_payload(info, map_location)
            except UnsafeCheckpointError:
                raise
            except CheckpointError as exc:
                self._warn_skip(dataclasses.replace(info, verified=False, error=str(exc)))
                continue
            self._restore(info, payload, state)
            return Progress(
                step=info.step,
                total_steps=info.manifest.get("total_steps"),
                epoch=info.epoch,
                epoch_end=bool(info.manifest.get("epoch_end", False)),
                is_last=info.manifest.get("is_last"),
                time=self._clock_offset,
                metrics=info.metrics,
            )
        return None

    def _restore(self, info: CheckpointInfo, payload: Mapping[str, Any], state: MutableMapping[str, Any]) -> None:
        objects = payload.get("objects") or {}
        values = payload.get("values") or {}
        for name, sd in objects.items():
            target = state.get(name)
            if target is None or not _has_state_dict(target):
                _warn(
                    f"saverules: checkpoint {info.path} holds the state of {name!r} but the state passed to "
                    "load_latest has no such object; it was not restored"
                )
                continue
            try:
                target.load_state_dict(sd)
            except Exception as exc:
                raise CheckpointError(f"saverules: restoring {name!r} from {info.path} failed: {exc}") from exc
        for name, obj in state.items():
            if name not in objects and name not in values:
                _warn(f"saverules: checkpoint {info.path} has no entry {name!r}; it was left as it is")
        for name, value in values.items():
            if name in state and _has_state_dict(state[name]):
                _warn(
                    f"saverules: checkpoint {info.path} holds a plain value for {name!r} but the state has an "
                    "object with load_state_dict there; it was not restored"
                )
                continue
            state[name] = value
        decider_state = payload.get("decider")
        try:
            self.decider.load_state_dict(decider_state)
        except Exception as exc:
            _warn(
                f"saverules: the decider state in {info.path} does not fit this policy ({exc}); "
                "the decider starts fresh from the saved step"
            )
            self.decider.note_save(info.step, info.time)
        if info.policy_digest is not None and info.policy_digest != self.policy.digest:
            log.info("checkpoint %s was written under a different policy (digest %s)", info.path,
                     info.policy_digest[:12])
        clock = payload.get("clock", info.time)
        self._clock_offset = float(clock) if clock is not None else 0.0
        self._clock_t0 = _time.monotonic()
        log.info("resumed from checkpoint %s (step %d)", info.path, info.step)
