"""Digests of checkpoint files: the hash worker that runs behind a writer, and re-reads from disk.

The manifest records a sha256 of every file.  While a file is written, its
bytes are hashed on one daemon thread (:data:`HASHER`) in write order, so the
writer never waits for the hash of memory that stays valid (see
:mod:`saverules.store.writer`).  :func:`hash_file` re-reads a file from the
file system for verification.
"""
from __future__ import annotations

import hashlib
import mmap
import os
import queue
import threading
from pathlib import Path
from typing import Optional, Tuple, Union

from . import layout

#: Read size of a re-read; chunks at least this large are hashed behind the writer.
CHUNK = 4 << 20
PARALLEL_HASH_MIN = 1 << 20


class HashStream:
    """The sha256 of one file, fed in write order by the hash worker."""

    __slots__ = ("h", "error")

    def __init__(self):
        self.h = hashlib.sha256()
        self.error: Optional[BaseException] = None


class HashWorker:
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

    def submit(self, stream: HashStream, data, wait: bool = False) -> Optional[threading.Event]:
        """Queue ``data`` for ``stream``; with ``wait``, return an event set once it (and all before it) is hashed."""
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="saverules-hash", daemon=True)
                self._thread.start()
        done = threading.Event() if wait else None
        self._queue.put((stream, data, done))
        return done

    def after_fork(self) -> None:
        self._queue = queue.SimpleQueue()
        self._thread = None
        self._lock = threading.Lock()


HASHER = HashWorker()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=HASHER.after_fork)


def hash_file(path: Union[str, Path]) -> Tuple[int, str]:
    """Re-read ``path`` from the file system; return its size and sha256.

    A file inside a temporary directory this process is writing right now
    (the check after a save) is read through a read-only memory map, which
    hashes the cached pages without copying them first.  Every other file is
    read in chunks: a map would turn a file that another process truncates
    meanwhile into a SIGBUS instead of an error.
    """
    with open(path, "rb", buffering=0) as f:
        if layout.is_inflight(os.path.dirname(os.fspath(path))):
            mapped = hash_mapped(f)
            if mapped is not None:
                return mapped
        h = hashlib.sha256()
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


def hash_mapped(f) -> Optional[Tuple[int, str]]:
    """Size and sha256 of an open file through a read-only map; None when it cannot be mapped (or is empty)."""
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
