"""Opening a store to write into it: the directory, the one-writer lock, cleanup, ``policy.toml``.

A writing :class:`~saverules.torch.Checkpointer` opens its store when it is
made (and again at its next save when the directory could not be made then):
:func:`refuse_a_file` turns a store path that is a file into a clear error,
and :func:`open_store` creates the directory, takes the lock
(:mod:`~saverules.store.lock`), removes what an interrupted writer left
behind (``cleanup``: the committer's, :meth:`~saverules.store.commit.Committer.cleanup`) and records the policy
(:mod:`~saverules.store.policyfile`).  A reader opens nothing.
"""
from __future__ import annotations

import errno as _errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import lock
from .errors import CheckpointWriteError, log, write_error
from .fs import fs
from .policyfile import write_policy_file

__all__ = ["open_store", "refuse_a_file"]


def refuse_a_file(directory: Path) -> None:
    """A store path that is (or lies below) a file: a clear error, whatever ``on_error`` says.

    No retry can make a file into a directory, so this is never just a warning.
    """
    probe = Path(directory)
    while True:
        if os.path.exists(probe) and not os.path.isdir(probe):
            if probe == Path(directory):
                what, code = f"{directory} is a file, not a directory", _errno.EEXIST
            else:
                what, code = f"{directory} cannot be made: {probe} is a file, not a directory", _errno.ENOTDIR
            raise CheckpointWriteError(
                f"saverules: the checkpoint store {what}; remove it or point dir= / [storage].dir elsewhere",
                path=str(probe), errno=code,
            )
        if probe.parent == probe:
            return
        probe = probe.parent


def open_store(directory: Path, policy: Any, hold: Callable[[lock.StoreLock], None],
               cleanup: Callable[[], None]) -> None:
    """Create the directory, take the lock, clean up after an interrupted writer, record the policy.

    ``hold(held)`` gets this process's hold on the lock as soon as it is
    taken, before ``cleanup()``, so that the caller owns it (and releases it)
    whatever happens after.  Raises
    :class:`~saverules.store.errors.CheckpointWriteError` when the directory
    or the lock file cannot be created, and
    :class:`~saverules.store.errors.StoreLockedError` when another process
    writes the store.
    """
    try:
        fs.makedirs(str(directory))
    except OSError as exc:
        refuse_a_file(directory)
        raise write_error(exc, None, str(directory), "create the checkpoint directory") from exc
    try:
        held = lock.acquire(str(directory))
    except OSError as exc:
        raise write_error(exc, None, os.path.join(directory, lock.LOCK_FILE), "create the store's lock file") from exc
    hold(held)
    if held.previous:
        log.info("took over the lock of %s left by %s", directory, lock.describe_holder(held.previous))
    cleanup()
    write_policy_file(directory, policy)
