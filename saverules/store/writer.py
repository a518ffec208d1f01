"""Write one file of a checkpoint: fill it, digest what goes through, fsync it.

:func:`write_file` is the only way the store creates a checkpoint file.  The
digest is computed from the bytes handed to the file, on the hash worker of
:mod:`saverules.store.digest`, while this thread writes and then fsyncs.
"""
from __future__ import annotations

import bisect
import os
from typing import Any

import torch

from . import digest
from .errors import recover_errno
from .fs import fs

try:
    import numpy as _np
except ImportError:  # pragma: no cover - numpy ships with torch wheels; without it chunks are hashed in step
    _np = None  # type: ignore[assignment]  # None marks "no numpy"; every use checks it


def _sync_file_range():
    """Linux's sync_file_range(2), or None: it starts write-back of a range without waiting for it."""
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


#: Start write-back of each large chunk as soon as it is written (SYNC_FILE_RANGE_WRITE), so that
#: the fsync at the end has less left to wait for.  Only a hint: the fsync still decides and reports.
_START_WRITEBACK = _sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


class Stable:
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
        spans: dict[int, tuple[int, memoryview]] = {}
        if _np is not None:
            for t in tensors:
                if t.device.type != "cpu":
                    continue
                st = t.untyped_storage()
                start, n = st.data_ptr(), st.nbytes()
                if n < digest.PARALLEL_HASH_MIN or start in spans:
                    continue
                whole = torch.empty(0, dtype=torch.uint8).set_(st, 0, (n,), (1,))
                spans[start] = (n, memoryview(whole.numpy()))
        self._starts = sorted(spans)
        self._spans = spans

    def view(self, data) -> memoryview | None:
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


NO_STABLE = Stable(())


class HashingFile:
    """A write-only file object that computes the digest and size of what goes through it.

    The hash is computed on the hash worker thread.  Chunks from memory that
    the save keeps alive (:class:`Stable`) are queued by reference and the
    writer moves on at once; small chunks are gathered into a copy and queued
    a megabyte at a time; other large chunks are queued and waited for before
    ``write`` returns (their memory is only valid during the call).
    """

    def __init__(self, f, stable: Stable = NO_STABLE, algo: str | None = None):
        self._f = f
        self._stream = digest.HashStream(algo)
        self._small = bytearray()
        self._stable = stable
        self._finished = False
        self._started = 0  # bytes whose write-back has been started
        self.size = 0
        #: The first OSError the file raised: a native writer above (torch's archive writer) may
        #: swallow it and report something else, so write_file raises this one instead.
        self.os_error: OSError | None = None

    def _put(self, data) -> None:
        try:
            self._f.write(data)
        except OSError as exc:
            if self.os_error is None:
                self.os_error = exc
            raise

    def write(self, data) -> int:
        n = memoryview(data).nbytes
        if n < digest.PARALLEL_HASH_MIN:
            self._put(data)
            self._small += data
            if len(self._small) >= digest.PARALLEL_HASH_MIN:
                self.push()
        else:
            self.push()
            view = self._stable.view(data)
            if view is not None:
                digest.HASHER.submit(self._stream, view)
                self._put(data)
            else:
                done = digest.HASHER.submit(self._stream, data, wait=True)
                try:
                    self._put(data)
                finally:
                    done.wait()  # the buffer is only valid during this call
                self._check()
            self.size += n
            self._start_writeback()
            return n
        self.size += n
        return n

    def _start_writeback(self) -> None:
        """Everything up to ``size`` is in the kernel now (a large write bypasses the buffer): send it on."""
        if _START_WRITEBACK is None:
            return
        try:
            fd = self._f.fileno()
        except (AttributeError, OSError, ValueError):
            return
        _START_WRITEBACK(fd, self._started, self.size - self._started, _SYNC_FILE_RANGE_WRITE)
        self._started = self.size

    def push(self) -> None:
        """Queue the small chunks gathered so far."""
        if self._small:
            digest.HASHER.submit(self._stream, self._small)
            self._small = bytearray()

    def _check(self) -> None:
        if self._stream.error is not None:
            raise self._stream.error

    def flush(self) -> None:
        try:
            self._f.flush()
        except OSError as exc:
            if self.os_error is None:
                self.os_error = exc
            raise

    def drain(self) -> None:
        """Wait until the worker is done with everything queued for this file (errors are not raised)."""
        digest.HASHER.submit(self._stream, None, wait=True).wait()

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

    def entry(self) -> dict[str, Any]:
        """The manifest entry of what was written: ``{"size": bytes, ALGO: hex}``."""
        return digest.make_entry(self.size, self._stream.algo, self.hexdigest())


class Producer:
    """What fills one file: ``fn(fileobj)``, and the tensors whose memory it writes from."""

    __slots__ = ("fn", "tensors")

    def __init__(self, fn, tensors=()):
        self.fn = fn
        self.tensors = tensors

    def __call__(self, f) -> None:
        self.fn(f)


def tensors_in(obj: Any) -> list[torch.Tensor]:
    """Every tensor inside nested dicts, lists and tuples."""
    out: list[torch.Tensor] = []
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


def write_file(path: str, producer, algo: str | None = None) -> dict[str, Any]:
    """Create ``path``, let ``producer(fileobj)`` fill it, fsync it; return its manifest entry.

    The entry is ``{"size": bytes, ALGO: hex}`` (``algo`` defaults to
    :data:`saverules.store.digest.DEFAULT`).  The digest is computed from the
    bytes handed to the file, on the hash worker, while this thread writes
    and then fsyncs.

    A write that fails always raises ``OSError`` with the error number of the
    failure, whichever layer saw it first: when the producer (``torch.save``,
    a native writer) reports the failure in its own words, the ``OSError``
    the file raised underneath it, or the one :func:`~saverules.store.errors.recover_errno`
    reads from the message and the disk, is raised instead (chained to the
    producer's exception).
    """
    algo = algo or digest.DEFAULT
    tensors = getattr(producer, "tensors", ())
    stable = Stable(tensors) if tensors else NO_STABLE
    hf: HashingFile | None = None
    try:
        with fs.open_write(path) as f:
            hf = HashingFile(f, stable, algo)
            try:
                producer(hf)
                hf.push()
                f.flush()
                fs.fsync(f.fileno())
            except BaseException:
                hf.drain()  # nothing queued may outlive the memory it points into
                raise
            digest_hex = hf.hexdigest()
    except Exception as exc:
        err = exc if isinstance(exc, OSError) and exc.errno else (hf.os_error if hf is not None else None)
        code = err.errno if err is not None else recover_errno(exc, path)
        if code is None:
            raise
        if err is exc and exc.filename:
            raise
        raise OSError(code, os.strerror(code), path) from exc
    return digest.make_entry(hf.size, algo, digest_hex)
