"""The durable tier's one-writer lock: an object ``ROOT/.saverules.lock`` written with a conditional write.

The lock object holds the holder's host, pid, start time, the moment it was
last renewed, its lease (seconds) and a random token.  It is created with
``mode="create"`` (S3: ``If-None-Match: *``; a local or shared file system:
``O_EXCL``; memory://: one process), so of two writers racing for a free lock
exactly one wins where the backend has such a write.  A holder renews the
lease from a daemon thread every third of the lease.

A lock found in place is taken over, by deleting it and writing it anew with
the same conditional write, when its holder

* is on this host and its process is dead (at once), or
* is on another host and its lease expired (it was not renewed for ``lease``
  seconds: its node died, or it lost the network).

Otherwise the writer is refused with :class:`RemoteLockedError`, which names
the holder.  docs/tiers.md says what each backend guarantees.
"""
from __future__ import annotations

import json
import os
import secrets
import socket
import sys
import threading
import time
from datetime import datetime, timezone
from typing import Any

from ..errors import StoreLockedError, log
from ..layout import pid_alive
from ..lock import describe_holder

LOCK_OBJECT = ".saverules.lock"
#: Seconds a holder's lock stays valid without renewal (overridable by $SAVERULES_LEASE_SECONDS).
DEFAULT_LEASE = 60.0
_MAX = 4096


class RemoteLockedError(StoreLockedError):
    """Another process writes this durable tier; ``holder`` says who (host, pid, since when)."""


def _now() -> float:
    return time.time()


def read_holder(fs: Any, path: str) -> dict[str, Any] | None:
    """The lock object's content; None when there is none (or it is not readable JSON)."""
    try:
        raw = fs.cat_file(path)
    except FileNotFoundError:
        return None
    try:
        data = json.loads(bytes(raw[:_MAX]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def stale(holder: dict[str, Any], now: float, host: str | None = None) -> str | None:
    """Why ``holder``'s lock may be taken over (a dead process on this host, an expired lease), or None."""
    here = host or socket.gethostname()
    pid = holder.get("pid")
    if holder.get("host") == here and type(pid) is int:
        if pid != os.getpid() and not pid_alive(pid):
            return f"its holder, pid {pid} on this host, is dead"
        return None
    renewed, lease = holder.get("renewed"), holder.get("lease")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (renewed, lease)):
        return None
    assert isinstance(renewed, (int, float)) and isinstance(lease, (int, float))
    if now > renewed + lease:
        return f"its lease of {lease:g}s expired {now - renewed - lease:.0f}s ago (last renewed at {renewed:.0f})"
    return None


class RemoteLock:
    """This process's hold on one durable tier's lock; renewed in the background until :meth:`release`."""

    def __init__(self, fs: Any, root: str, lease: float | None = None):
        self.fs = fs
        self.path = f"{root}/{LOCK_OBJECT}"
        self.lease = float(lease if lease is not None else os.environ.get("SAVERULES_LEASE_SECONDS", DEFAULT_LEASE))
        self.token = secrets.token_hex(8)
        self.since = datetime.now(timezone.utc).isoformat(timespec="seconds")
        #: The holder found in place when this lock was taken over, and why it could be.
        self.previous: dict[str, Any] | None = None
        self.takeover: str | None = None
        #: Why the lock was lost (another writer replaced it), or None while it is held.
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> bytes:
        argv = " ".join(sys.argv) if sys.argv else ""
        return json.dumps({
            "pid": os.getpid(), "host": socket.gethostname(), "since": self.since, "renewed": _now(),
            "lease": self.lease, "token": self.token, "command": argv[:300],
        }).encode("utf-8")

    def acquire(self) -> RemoteLock:
        """Take the lock or raise RemoteLockedError naming the holder; OSError when the tier is unreachable."""
        for _ in range(5):
            try:
                self.fs.pipe_file(self.path, self._record(), mode="create")
            except FileExistsError:
                holder = read_holder(self.fs, self.path)
                if holder is None:
                    self.fs.invalidate_cache()
                    if self.fs.exists(self.path):
                        holder = {}
                    else:
                        continue  # let go of between our write and our read: try again
                why = stale(holder, _now()) if holder else None
                if why is None:
                    raise RemoteLockedError(
                        f"saverules: the durable tier {self.path.rsplit('/', 1)[0]} is being written by "
                        f"{describe_holder(holder)}. Two writers would overwrite each other's checkpoints, so this "
                        "one stops here: wait for that run to finish or stop it, or give this run its own URL. A "
                        f"lock held from another host is taken over once its lease ({holder.get('lease', '?')}s) "
                        "expires without renewal.",
                        path=self.path,
                        holder=holder,
                    ) from None
                log.warning("saverules: taking over the lock %s: %s", self.path, why)
                self.previous, self.takeover = holder, why
                try:
                    self.fs.rm_file(self.path)
                except FileNotFoundError:
                    pass
                continue
            self.fs.invalidate_cache()
            mine = read_holder(self.fs, self.path)
            if mine is None or mine.get("token") != self.token:
                continue  # a backend without a conditional write: someone else's write won
            self._thread = threading.Thread(target=self._renew_loop, name="saverules-lease", daemon=True)
            self._thread.start()
            return self
        raise RemoteLockedError(
            f"saverules: could not take the lock {self.path}: other writers kept taking it; stop them first",
            path=self.path, holder=read_holder(self.fs, self.path),
        )

    def renew(self) -> None:
        """Write a fresh ``renewed`` time, after checking the lock is still ours (sets :attr:`lost` if not)."""
        holder = read_holder(self.fs, self.path)
        if holder is None or holder.get("token") != self.token:
            self.lost = f"the lock {self.path} was taken by {describe_holder(holder)}"
            return
        self.fs.pipe_file(self.path, self._record())

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.lease / 3):
            if self.lost is not None:
                return
            try:
                self.renew()
            except Exception as exc:  # a network failure: the next renewal tries again
                log.warning("saverules: could not renew the lock %s (%s)", self.path, exc)

    def release(self) -> None:
        """Stop renewing and delete the lock object if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self.lost is not None:
            return
        try:
            holder = read_holder(self.fs, self.path)
            if holder is not None and holder.get("token") == self.token:
                self.fs.rm_file(self.path)
        except Exception as exc:
            log.warning("saverules: could not release the lock %s (%s); it expires with its lease", self.path, exc)
