"""What the store raises and warns, and the helpers that phrase it."""
from __future__ import annotations

import errno as _errno
import logging
import warnings
from typing import Any, Optional

log = logging.getLogger("saverules.store")
log.addHandler(logging.NullHandler())  # warnings reach the user through `warnings`; logs only when configured


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


def warn(message: str) -> None:
    log.warning(message)
    warnings.warn(message, CheckpointWarning, stacklevel=3)


def type_name(value: Any) -> str:
    t = type(value)
    mod = t.__module__
    return t.__qualname__ if mod == "builtins" else f"{mod}.{t.__qualname__}"


def error_hint(code: Optional[int]) -> str:
    """What to do about an OS error number, in the words of ``[storage]``."""
    if code == _errno.ENOSPC:
        return "the disk is full: free some space or point [storage].dir at a larger disk"
    if code == getattr(_errno, "EDQUOT", -1):
        return "the disk quota is exceeded: free some space or point [storage].dir elsewhere"
    if code == _errno.EROFS:
        return "the file system is read-only: point [storage].dir at a writable directory"
    if code in (_errno.EACCES, _errno.EPERM):
        return "permission denied: make the directory writable or point [storage].dir elsewhere"
    return "check the directory and the disk"


def write_error(exc: OSError, step: Optional[int], path: str, doing: str) -> CheckpointWriteError:
    """A :class:`CheckpointWriteError` that names the path, the stage and what to do."""
    code = exc.errno
    where = exc.filename if exc.filename else path
    cname = _errno.errorcode.get(code, "") if code is not None else ""
    what = f"the checkpoint for step {step}" if step is not None else "the checkpoint store"
    msg = (
        f"saverules: could not {doing} for {what} at {where}: {exc.strerror or exc}"
        f"{f' ({cname})' if cname else ''}; {error_hint(code)}. "
        "Nothing was committed and older checkpoints are untouched."
    )
    return CheckpointWriteError(msg, path=str(where), errno=code)
