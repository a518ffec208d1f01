"""One writer per store: an exclusive ``flock`` on ``DIR/.saverules.lock``.

The first writing :class:`~saverules.torch.Checkpointer` of a process takes
the lock and writes who holds it (pid, host, since when, command line) into
the lock file.  A writer in another process then fails at construction with
:class:`StoreLockedError`, which names the holder.  Checkpointers of one
process share the lock (it is counted): they are one writer.

The kernel drops a ``flock`` when its holder dies, however it dies, so a lock
left by a killed process is simply taken over; the holder information is
rewritten by the new holder, and cleared when a holder lets go.  Forked
children (data-loader workers) do not inherit the lock: their copy of the
descriptor is closed at fork, so the lock goes when its holder goes.

On file systems without ``flock`` support (some network file systems, mount
options such as Lustre's ``noflock``) the store warns that it cannot detect a
second writer and goes on unlocked; docs/checkpoints.md says where ``flock``
reaches across hosts and where it does not.
"""
from __future__ import annotations

import errno as _errno
import fcntl
import json
import os
import socket
import sys
import threading
from datetime import datetime, timezone
from typing import Any

from .errors import StoreLockedError, warn

__all__ = ["LOCK_FILE", "StoreLock", "acquire", "holder_of", "describe_holder"]

LOCK_FILE = ".saverules.lock"

#: errno values meaning "this file system cannot flock": the store goes on unlocked, with a warning.
_UNSUPPORTED = frozenset(
    code for code in (
        _errno.ENOLCK, _errno.EOPNOTSUPP, getattr(_errno, "ENOTSUP", _errno.EOPNOTSUPP), _errno.ENOSYS,
        _errno.EINVAL,
    )
)
_MAX_INFO = 4096

#: Guards _HELD.  Re-entrant because a Checkpointer that the garbage collector finalizes releases its
#: hold from whatever code the collection interrupts, which may be acquire() or release() itself.  That
#: nesting is safe: a collection runs only when a container is allocated, and neither function allocates
#: one between reading an entry and updating its count; an entry that reaches zero is gone before anything
#: else can see it.
_GUARD = threading.RLock()
#: realpath of a store -> [fd or None, count] for the locks this process holds.
_HELD: dict[str, list] = {}


def _after_fork_in_child() -> None:
    # The child shares the parent's open file description: closing its copy leaves the
    # parent's lock in place, and keeps a long-lived child from holding it after the parent dies.
    global _GUARD
    _GUARD = threading.RLock()
    for entry in _HELD.values():
        if entry[0] is not None:
            try:
                os.close(entry[0])
            except OSError:
                pass
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _holder_info() -> dict[str, Any]:
    argv = " ".join(sys.argv) if sys.argv else ""
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": argv[:300],
    }


def _read_info(fd: int) -> dict[str, Any] | None:
    try:
        raw = os.pread(fd, _MAX_INFO, 0)
    except OSError:
        return None
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def describe_holder(info: dict[str, Any] | None) -> str:
    """``pid 4242 on host gpu-7, since 2026-12-01 20:31:07+00:00 (python train.py)``."""
    if not info:
        return "another process (it has not written its details yet)"
    text = f"pid {info.get('pid', '?')} on host {info.get('host', '?')}, since {info.get('since', '?')}"
    if info.get("command"):
        text += f" ({info['command']})"
    return text


def holder_of(directory: str) -> dict[str, Any] | None:
    """Who holds (or last held, if it was killed) the lock of ``directory``; None when nobody wrote it.

    Reads the lock file only; it never takes or probes the lock, so readers
    never get in a writer's way.
    """
    try:
        fd = os.open(os.path.join(directory, LOCK_FILE), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        return _read_info(fd)
    finally:
        os.close(fd)


class StoreLock:
    """This process's hold on one store's lock (release it once; the last release unlocks)."""

    def __init__(self, key: str, locked: bool, previous: dict[str, Any] | None):
        self.key = key
        self.locked = locked
        #: The holder information found in the lock file when this process took the lock over
        #: (a writer that died without letting go), or None.
        self.previous = previous
        self._released = False

    def release(self) -> None:
        with _GUARD:
            if self._released:
                return
            self._released = True
            entry = _HELD.get(self.key)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] > 0:
                return
            del _HELD[self.key]
            fd = entry[0]
            if fd is None:
                return
            try:
                os.ftruncate(fd, 0)  # nobody holds it now: a reader must not see a stale holder
            except OSError:
                pass
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)


def acquire(directory: str) -> StoreLock:
    """Take the store's lock for this process, or raise :class:`StoreLockedError` naming the holder.

    Raises ``OSError`` when the lock file cannot be created (the caller turns
    it into a write error).
    """
    key = os.path.realpath(directory)
    with _GUARD:
        entry = _HELD.get(key)
        if entry is not None:
            entry[1] += 1
            return StoreLock(key, entry[0] is not None, None)
        path = os.path.join(key, LOCK_FILE)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = _read_info(fd)
            os.close(fd)
            raise StoreLockedError(
                f"saverules: the checkpoint store {key} is being written by {describe_holder(info)}. "
                "Two writers would overwrite each other's checkpoints, so this one stops here: wait for that "
                "run to finish or stop it, or give this run its own directory. Reading the store needs no "
                f"lock: `python -m saverules.ls {key}`, or Checkpointer(..., read_only=True).",
                path=path,
                holder=info,
            ) from None
        except OSError as exc:
            os.close(fd)
            if exc.errno not in _UNSUPPORTED:
                raise
            warn(
                f"saverules: the file system of {key} does not support flock ({exc.strerror or exc}); the store "
                "goes on without its one-writer lock, so a second writer on this directory would not be detected"
            )
            _HELD[key] = [None, 1]
            return StoreLock(key, False, None)
        previous = _read_info(fd)
        try:
            data = json.dumps(_holder_info()).encode("utf-8")
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
        except OSError:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            raise
        _HELD[key] = [fd, 1]
        return StoreLock(key, True, previous)
