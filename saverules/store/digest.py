"""Digests of checkpoint files: the algorithms, the hash worker that runs behind a writer, re-reads.

The manifest records a digest of every file, under the name of its
algorithm: ``{"size": ..., "xxh3_128": hex}`` (the default, from the
``xxhash`` package: about 10 GB/s on one core), ``"blake3"`` or
``"sha256"`` (format version 1 manifests hold sha256 only; they still
verify).  The digest guards against accidental damage (a flipped bit, a cut
file); like any digest stored next to the data, it cannot stop someone who
rewrites the manifest too.

While a file is written, its bytes are hashed on one daemon thread
(:data:`HASHER`) in write order, so the writer never waits for the hash of
memory that stays valid (see :mod:`saverules.store.writer`).
:func:`hash_file` re-reads a file for verification, from the page cache or,
with ``from_device``, after asking the kernel to drop the file's cached pages.
"""
from __future__ import annotations

import atexit
import hashlib
import mmap
import os
import queue
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Literal, overload

from . import layout
from .errors import CheckpointError


def _algorithms() -> dict[str, Callable]:
    algos: dict[str, Callable] = {}
    try:
        import xxhash

        algos["xxh3_128"] = xxhash.xxh3_128
    except ImportError:  # pragma: no cover - xxhash is in the torch extra
        pass
    try:
        import blake3

        algos["blake3"] = blake3.blake3
    except ImportError:  # pragma: no cover - blake3 is optional
        pass
    algos["sha256"] = hashlib.sha256
    return algos


#: Digest algorithms a manifest may name, with the length of their hex digest.
KNOWN = {"xxh3_128": 32, "blake3": 64, "sha256": 64}
#: The ones this process can compute, fastest first.
ALGORITHMS = _algorithms()
#: What new checkpoints are digested with.
DEFAULT = next(iter(ALGORITHMS))


def new(algo: str):
    """A fresh hash object of ``algo``; CheckpointError naming the package when it is not installed."""
    try:
        return ALGORITHMS[algo]()
    except KeyError:
        hint = {"xxh3_128": "pip install xxhash", "blake3": "pip install blake3"}.get(algo, "upgrade saverules")
        raise CheckpointError(
            f"saverules: this checkpoint's files are digested with {algo}, which this process cannot compute ({hint})"
        ) from None


def entry_digest(entry: Mapping) -> tuple[str, str]:
    """(algorithm, hex digest) of a manifest file entry."""
    for algo in KNOWN:
        if algo in entry:
            return algo, entry[algo]
    raise KeyError("no digest")


def make_entry(size: int, algo: str, hexdigest: str) -> dict[str, object]:
    return {"size": int(size), algo: hexdigest}

#: Read size of a re-read; chunks at least this large are hashed behind the writer.
CHUNK = 4 << 20
PARALLEL_HASH_MIN = 1 << 20


class HashStream:
    """The digest of one file, fed in write order by the hash worker."""

    __slots__ = ("h", "algo", "error")

    def __init__(self, algo: str | None = None):
        self.algo = algo or DEFAULT
        self.h = new(self.algo)
        self.error: BaseException | None = None


class HashWorker:
    """One daemon thread that hashes chunks, in the order they were written, while the caller goes on writing.

    A daemon thread (not a ThreadPoolExecutor, which refuses work once the
    interpreter starts shutting down) so that a write still in flight at exit
    can finish.  hashlib releases the GIL on large buffers, so hashing runs
    on another core while the writer copies bytes into the page cache.
    """

    def __init__(self):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            stream, data, done = item
            if data is not None and stream.error is None:
                try:
                    stream.h.update(data)
                except BaseException as exc:  # reported to the writer when it waits
                    stream.error = exc
            if done is not None:
                done.set()

    @overload
    def submit(self, stream: HashStream, data, wait: Literal[True]) -> threading.Event: ...

    @overload
    def submit(self, stream: HashStream, data, wait: Literal[False] = False) -> None: ...

    def submit(self, stream: HashStream, data, wait: bool = False) -> threading.Event | None:
        """Queue ``data`` for ``stream``; with ``wait``, return an event set once it (and all before it) is hashed."""
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="saverules-hash", daemon=True)
                self._thread.start()
        done = threading.Event() if wait else None
        self._queue.put((stream, data, done))
        return done

    def stop(self, wait: float = 5.0) -> None:
        """End the thread once the chunks already given are hashed (at exit: see saverules.store.ranks)."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None and thread.is_alive():
            self._queue.put(None)
            thread.join(wait)

    def after_fork(self) -> None:
        self._queue = queue.SimpleQueue()
        self._thread = None
        self._lock = threading.Lock()


HASHER = HashWorker()
# Registered at import, before saverules.store.checkpointer registers the handler that finishes the writes in flight
# (it imports this module first): atexit runs last-in first-out, so the thread ends after every write that feeds it.
atexit.register(HASHER.stop)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=HASHER.after_fork)


def drop_cached_pages(fd: int) -> bool:
    """Ask the kernel to forget the file's cached pages (after fsync they are clean), so that the next
    read comes from the device; False where the platform cannot (the read then proves less)."""
    if not hasattr(os, "posix_fadvise"):  # pragma: no cover - Linux has it
        return False
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError:
        return False
    return True


def hash_file(path: str | Path, algo: str = "sha256", from_device: bool = False) -> tuple[int, str]:
    """Re-read ``path`` from the file system; return its size and digest.

    A file inside a temporary directory this process is writing right now
    (the check after a save) is read through a read-only memory map, which
    hashes the cached pages without copying them first.  Every other file is
    read in chunks: a map would turn a file that another process truncates
    meanwhile into a SIGBUS instead of an error.  With ``from_device`` the
    file's pages are dropped from the cache first.
    """
    with open(path, "rb", buffering=0) as f:
        if from_device:
            drop_cached_pages(f.fileno())
        if layout.is_inflight(os.path.dirname(os.fspath(path))):
            mapped = hash_mapped(f, algo)
            if mapped is not None:
                return mapped
        h = new(algo)
        size = 0
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
            size += n
    return size, h.hexdigest()


def hash_mapped(f, algo: str = "sha256") -> tuple[int, str] | None:
    """Size and digest of an open file through a read-only map; None when it cannot be mapped (or is empty)."""
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
        h = new(algo)
        h.update(m)
        return size, h.hexdigest()
    finally:
        m.close()
