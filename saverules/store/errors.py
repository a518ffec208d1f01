"""What the store raises and warns, and the helpers that phrase it."""
from __future__ import annotations

import errno as _errno
import logging
import os
import re
import resource
import sys
import warnings
from collections.abc import Sequence
from typing import Any

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

    def __init__(self, message: str, path: str | None = None, errno: int | None = None):
        super().__init__(message)
        self.path = path
        self.errno = errno


class CheckpointVerifyError(CheckpointError):
    """A checkpoint just written did not read back as written."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file needs arbitrary pickled objects; it was refused unread."""


class NoValidCheckpointError(CheckpointError):
    """The store holds checkpoints, but resume can use none of them.

    ``dir`` is the store, ``rejected`` lists ``(name, reason)`` for each
    checkpoint, oldest first.  Nothing was restored and nothing on disk was
    changed.  ``load_latest(..., if_none_valid="start_fresh")`` starts over
    instead, when that is what you want.
    """

    def __init__(self, directory: str, rejected: Sequence[tuple[str, str]]):
        self.dir = str(directory)
        self.rejected: list[tuple[str, str]] = list(rejected)
        count = len(self.rejected)
        lines = "\n".join(f"  {name}: {reason}" for name, reason in self.rejected)
        super().__init__(
            f"saverules: {self.dir} holds {count} checkpoint{'s' if count != 1 else ''} and none of them can be "
            f"resumed:\n{lines}\n"
            f"Nothing was restored. Inspect them with `python -m saverules.ls {self.dir}`; to start from scratch "
            'anyway, move them away or call load_latest(state, if_none_valid="start_fresh").'
        )


class StateChangedError(CheckpointWriteError):
    """The state changed while an asynchronous save was still copying it; nothing was committed.

    An asynchronous save copies an optimizer's parameters and state while
    training goes on, and holds that optimizer's next ``step()`` until the
    copy is done.  A change made any other way in that time (an in-place
    edit under ``torch.no_grad()``, ``load_state_dict``) would tear the
    snapshot; the copy sees it in the tensors' version counters and the save
    is abandoned instead.  Call ``Checkpointer.wait_staged()`` before such a
    change.
    """


class StoreLockedError(CheckpointError):
    """Another process writes this store: a second writer is refused when it is made.

    ``path`` is the lock file, ``holder`` what its holder wrote there (``pid``,
    ``host``, ``since``, ``command``), or None when it had not written it yet.
    """

    def __init__(self, message: str, path: str, holder: dict | None):
        super().__init__(message)
        self.path = path
        self.holder = holder


class DurableError(CheckpointError):
    """The durable tier did not get what it had to: at ``close()``, the last promotion (the final step's, or a
    signal save's) did not reach it in time or failed.  ``step`` is that checkpoint's step, ``reason`` why.
    The locks were released anyway; the local checkpoint is still there."""

    def __init__(self, message: str, step: int | None = None, reason: str | None = None):
        super().__init__(message)
        self.step = step
        self.reason = reason


class StateTypeError(TypeError):
    """The training state holds a value a checkpoint may not store."""


class StateTooDeepError(StateTypeError, CheckpointError):
    """The training state nests its containers deeper than a checkpoint may (it follows ``on_error``)."""


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped, a save failed under ``on_error="warn"``..."""


_STORE_DIR = os.path.dirname(os.path.abspath(__file__))
_INTERNAL = (_STORE_DIR + os.sep, os.path.join(os.path.dirname(_STORE_DIR), "torch.py"))


def caller_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning raised by :func:`warn` point at the first frame outside the store.

    The store calls :func:`warn` from different depths (a resume, a save, a
    background write, retention), so a fixed stacklevel would show a line of
    the library in the user's log.  Without any frame outside the store (a
    background thread) the outermost frame is used.
    """
    frame = sys._getframe(2)  # the caller of warn()
    level = 2
    while frame is not None:
        if not frame.f_code.co_filename.startswith(_INTERNAL):
            return level
        if frame.f_back is None:
            return level
        frame = frame.f_back
        level += 1
    return level  # pragma: no cover - the loop always returns


def warn(message: str) -> None:
    log.warning(message)
    warnings.warn(message, CheckpointWarning, stacklevel=caller_stacklevel())


def type_name(value: Any) -> str:
    t = type(value)
    mod = t.__module__
    return t.__qualname__ if mod == "builtins" else f"{mod}.{t.__qualname__}"


def error_hint(code: int | None) -> str:
    """What to do about an OS error number, in the words of ``[storage]``."""
    if code == _errno.ENOSPC:
        return "the disk is full: free some space or point [storage].dir at a larger disk"
    if code == getattr(_errno, "EDQUOT", -1):
        return "the disk quota is exceeded: free some space or point [storage].dir elsewhere"
    if code == _errno.EFBIG:
        return (
            "the file is larger than this process may write (the file-size limit, `ulimit -f` / RLIMIT_FSIZE) or "
            "than the file system allows: raise the limit or point [storage].dir at another file system"
        )
    if code == _errno.EROFS:
        return "the file system is read-only: point [storage].dir at a writable directory"
    if code in (_errno.EACCES, _errno.EPERM):
        return "permission denied: make the directory writable or point [storage].dir elsewhere"
    return "check the directory and the disk"


def write_error(exc: OSError, step: int | None, path: str, doing: str) -> CheckpointWriteError:
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


#: "... (os error 28)" (Rust's io::Error, as safetensors reports it), "[Errno 28]" (Python's OSError text).
_ERRNO_IN_TEXT = re.compile(r"(?:\bos error|\[Errno) (\d+)")
#: Below this many free bytes, a write that failed without an errno is taken for a full disk.
_NEARLY_FULL = 1 << 20


def recover_errno(exc: BaseException, path: str | None = None) -> int | None:
    """The OS error number behind a failed write, also when the writer that failed lost it.

    torch's C++ archive writer turns a full disk into "unexpected pos ..."
    and Rust writers put the number in their message only.  In order: an
    ``OSError`` in the exception or its causes; an error number quoted in
    their text; then the state of the disk at ``path`` (the file being
    written): ``EFBIG`` when the file reached this process's file-size limit,
    ``ENOSPC`` when its file system has (almost) no space or inodes left.
    None when nothing points at an OS error.
    """
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno:
            return e.errno
        match = _ERRNO_IN_TEXT.search(str(e))
        if match and int(match.group(1)) in _errno.errorcode:
            return int(match.group(1))
        e = e.__cause__ or e.__context__
    if path is None:
        return None
    try:
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY and os.stat(path).st_size >= limit:
            return _errno.EFBIG
    except (OSError, ValueError):
        pass
    try:
        st = os.statvfs(os.path.dirname(os.path.abspath(path)))
    except OSError:
        return None
    free = st.f_bavail * st.f_frsize
    if free < _NEARLY_FULL or (st.f_files and st.f_favail == 0):
        return _errno.ENOSPC
    return None
