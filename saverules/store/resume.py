"""Which checkpoint a resume starts from, and what happens when there is none to start from.

Newest first, every checkpoint that does not verify (or does not decode) is
skipped with a warning.  Two outcomes never pass silently:

* an **unsafe** checkpoint (a state file that asks to unpickle a class or a
  function) stops the walk with :class:`UnsafeCheckpointError`: a planted file
  deserves a look before anything older is trusted;
* a store that holds checkpoints of which **none** can be used raises
  :class:`NoValidCheckpointError`, listing each one and why it was rejected,
  unless the caller asked for ``if_none_valid="start_fresh"``.  A fresh
  start is only ever silent when the store holds no checkpoint at all.

:func:`load_latest` is that walk for one process: each candidate decoded by
the format its manifest names (a sharded store goes through
:func:`saverules.store.sharded.coordinate.load_latest` instead).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import Any

from . import layout
from .errors import CheckpointError, NoValidCheckpointError, UnsafeCheckpointError, type_name, warn
from .manifest import CheckpointInfo
from .verify import VerifyCache, gone, newest_good, sort_key

IF_NONE_VALID = ("raise", "start_fresh")


def check_if_none_valid(value: Any) -> None:
    if value not in IF_NONE_VALID:
        raise ValueError(f"if_none_valid must be 'raise' or 'start_fresh', got {value!r}")


def check_load_arguments(state: Any, if_none_valid: Any, mmap: Any) -> None:
    """Raise naming the first argument of ``load_latest`` that it does not take."""
    check_if_none_valid(if_none_valid)
    if not isinstance(mmap, bool):
        raise ValueError(f"mmap must be True or False, got {mmap!r}")
    if not isinstance(state, MutableMapping):
        raise TypeError(
            f"state must be a mutable mapping (a dict) of names to objects and values, so that plain values "
            f"can be written back; got {type_name(state)}"
        )


def unsafe_error(info: CheckpointInfo) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"saverules: refused to load {info.path}: {info.error}. Resume stops at this checkpoint rather than fall "
        "back to an older one, since a planted file deserves a look: move it out of the store (or delete it) "
        "to resume from the checkpoint before it. If you wrote this file yourself, store only the safe types "
        "listed in docs/checkpoints.md"
    )


def pick(root: Path, cache: VerifyCache, skip: Callable[[CheckpointInfo], None], if_none_valid: str = "raise",
         decode: Callable[[CheckpointInfo], Any] | None = None,
         deep: Callable[[CheckpointInfo], bool] = lambda info: True) -> tuple[CheckpointInfo, Any] | None:
    """The newest usable checkpoint of ``root`` and (with ``decode``) what it decodes to.

    ``skip(info)`` hears of each checkpoint passed over.  Returns None when
    there is nothing to resume: an empty store, or (``if_none_valid=
    "start_fresh"``) a store whose checkpoints are all unusable, with a warning.
    ``deep(info)`` False: only the manifest and sizes are checked before
    ``decode`` (a format whose reader checks the digests as it reads).
    """
    check_if_none_valid(if_none_valid)
    rejected: list[CheckpointInfo] = []

    def passed_over(info: CheckpointInfo) -> None:
        if info.unsafe:
            raise unsafe_error(info)
        rejected.append(info)
        skip(info)

    # A writer's retention can remove every checkpoint of one listing while a reader walks it (each
    # one gone, none damaged): the store is then listed again, a bounded number of times, since
    # a newer checkpoint took their place.
    for _attempt in range(_RELISTS):
        for info in newest_good(root, cache, passed_over, deep=deep):
            if decode is None:
                return info, None
            try:
                return info, decode(info)
            except UnsafeCheckpointError:
                raise
            except CheckpointError as exc:
                failed = dataclasses.replace(info, verified=False, error=str(exc))
                if not gone(failed):  # removed while it was read (by retention): gone, not damaged
                    passed_over(failed)
        if rejected or not layout.candidates(root):
            break
    none_valid(root, rejected_pairs(rejected), if_none_valid)
    return None


#: How many times a reader lists a store whose checkpoints all vanished while it read them.
_RELISTS = 5


def rejected_pairs(rejected: list[CheckpointInfo]) -> list[tuple[str, str]]:
    """(name, why) of each checkpoint passed over, oldest first."""
    return [(info.name, info.error or "failed verification") for info in sorted(rejected, key=sort_key)]


def none_valid(root: Path, rejected: list[tuple[str, str]], if_none_valid: str) -> None:
    """The end of a walk that found nothing to resume: silent for an empty store, else raise (or warn)."""
    if not rejected:
        return
    if if_none_valid == "raise":
        raise NoValidCheckpointError(str(root), rejected)
    warn(
        f"saverules: none of the {len(rejected)} checkpoints in {root} can be resumed; starting from scratch as "
        "if_none_valid='start_fresh' asks (they are left on disk)"
    )


def needs_digest_pass(info: CheckpointInfo) -> bool:
    """Whether a checkpoint's digests must be checked before it is decoded (not when its reader checks them)."""
    from . import formats  # imports torch: only a resume that decodes needs it

    try:
        return not formats.get(info.format).digests_while_decoding
    except CheckpointError:
        return True


def load_latest(root: Path, cache: VerifyCache, skip: Callable[[CheckpointInfo], None], if_none_valid: str,
                map_location: Any, mmap: bool,
                state: MutableMapping[str, Any] | None = None) -> tuple[CheckpointInfo, Any] | None:
    """The newest checkpoint of ``root`` that verifies and decodes, and its payload; None as :func:`pick`.

    A checkpoint whose reader checked every digest while reading is
    remembered in ``cache`` as verified.  With ``state`` (the caller's) and
    ``if_none_valid="raise"``, a format that can reads the tensors of plain
    modules straight into their memory (:mod:`saverules.store.formats.in_place`):
    a digest that then fails leaves damaged bytes there, so the walk must
    end in a checkpoint whose restore overwrites them or in an exception.
    ``"start_fresh"`` would hand that memory to a fresh start, so it reads
    into fresh buffers.
    """
    from . import formats  # imports torch: only a resume that decodes needs it
    from .formats import in_place

    into = state if if_none_valid == "raise" else None
    failed: list[str] = []  # checkpoints whose read may have landed (damaged) bytes in the state

    def decode(info: CheckpointInfo) -> Any:
        try:
            return formats.read(info, map_location, mmap=mmap, into=into)
        except CheckpointError:
            if into is not None:
                failed.append(info.name)
            raise

    found = pick(root, cache, skip, if_none_valid, decode=decode, deep=needs_digest_pass)
    if found is None:
        return None
    info, payload = found
    if failed and into is not None:
        left = [n for n, obj in into.items() if in_place.plain_module(obj) and n not in payload.objects]
        if left:
            raise CheckpointError(
                f"saverules: {', '.join(failed)} failed while being read into the state, and {info.name}, the "
                f"checkpoint resumed instead, holds no state for {', '.join(map(repr, left))}: those objects may "
                "hold damaged bytes. Re-create them before use (or pass if_none_valid='start_fresh', which reads "
                "into fresh memory)"
            )
    if info.verified is None:  # its reader checked every digest while reading
        cache.put(info.path, dataclasses.replace(info, verified=True))
    return info, payload
