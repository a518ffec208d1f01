"""Verification: re-read what was written, check checkpoints on disk, and fall back past damaged ones.

* :func:`check_written` runs after a save wrote its files and before the
  manifest goes in, as ``verify`` says (see :data:`MODES`).
* :func:`inspect_checkpoint` checks a committed checkpoint: manifest, file
  sizes, and (``verify=True``) every file's digest.  :class:`VerifyCache`
  remembers the result by file fingerprint, so each checkpoint is hashed
  once per process.
* :func:`scan` lists a store; :func:`newest_good` walks it newest first,
  skipping what fails.
"""
from __future__ import annotations

import dataclasses
import math
import os
import stat
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from . import digest, layout, structure
from .errors import CheckpointError, CheckpointVerifyError
from .manifest import CheckpointInfo, Invalid, info_from_manifest, read_manifest

if TYPE_CHECKING:  # the formats import torch; listing and hashing a store does not need it
    from . import formats


def _signature(path: Path, manifest: Mapping | None) -> tuple | None:
    """A cheap fingerprint of the files: when it is unchanged, a past hash check still holds."""
    names = [layout.MANIFEST] + (sorted(manifest["files"]) if manifest else [])
    sig = []
    for fname in names:
        try:
            st = os.stat(path / fname)
        except OSError:
            return None
        sig.append((fname, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))
    return tuple(sig)


def inspect_checkpoint(path: str | os.PathLike, root: str | os.PathLike | None = None,
                       verify: bool = True, _structure: bool = True) -> CheckpointInfo:
    """Read one checkpoint directory's manifest and check its files.

    With ``verify`` every file is re-hashed (``verified`` True / False);
    without it only the manifest and the file sizes are checked
    (``verified`` None unless a problem was found), and the files' structure
    (:func:`saverules.store.structure.check_files`), which every reader judges
    by.  (``_structure`` False: a shallow pass that a hash check follows.)
    """
    path = Path(path)
    root = Path(root) if root is not None else path.parent
    name = os.path.relpath(path, root)
    link = _not_regular(path, directory=True)
    if link is None:
        link = _not_regular(path / layout.MANIFEST)
    if link is not None:
        return CheckpointInfo(path=path, name=name, verified=False, error=link)
    try:
        manifest = read_manifest(path)
    except Invalid as exc:
        return CheckpointInfo(path=path, name=name, size=layout.disk_size(path), verified=False, error=str(exc))

    def failed(error: str, unsafe: bool = False) -> CheckpointInfo:
        info = info_from_manifest(path, root, manifest, False, error)
        return dataclasses.replace(info, unsafe=True) if unsafe else info

    for fname, entry in manifest["files"].items():
        problem = _not_regular(path / fname)
        if problem is not None:
            return failed(problem)
        try:
            size = os.stat(path / fname).st_size
        except OSError as exc:
            return failed(f"cannot read {fname}: {exc.strerror or exc}")
        if size != entry["size"]:
            return failed(f"{fname} has {size} bytes, the manifest says {entry['size']} (truncated?)")
    if not verify and not _structure:
        return info_from_manifest(path, root, manifest, None, None)
    if not verify:
        # The structure is read (a small pickle, a header) even without hashing: every reader, shallow or
        # deep, judges a checkpoint by the same check (docs/checkpoints.md).  Its verdict is remembered by
        # the files' fingerprint, so a store listed at every save is not re-read at every save.
        verdict = _structure_verdict(path, manifest)
        if verdict is not None:
            return failed(*verdict)
        return info_from_manifest(path, root, manifest, None, None)
    for fname, entry in manifest["files"].items():
        algo, expected = digest.entry_digest(entry)
        try:
            size, hexdigest = digest.hash_file(path / fname, algo)
        except OSError as exc:
            return failed(f"cannot read {fname}: {exc.strerror or exc}")
        except CheckpointError as exc:
            return failed(str(exc))
        if size != entry["size"]:
            return failed(f"{fname} has {size} bytes, the manifest says {entry['size']} (truncated?)")
        if hexdigest != expected:
            return failed(f"{fname} does not match its {algo} digest (damaged)")
    try:
        structure.check_files(path, manifest)
    except structure.StructureError as exc:
        return failed(str(exc), unsafe=isinstance(exc, structure.UnsafeStructure))
    return info_from_manifest(path, root, manifest, True, None)


_VERDICTS: dict[str, tuple[tuple, tuple[str, bool] | None]] = {}
_VERDICTS_LOCK = threading.Lock()
_VERDICTS_MAX = 100_000


def _structure_verdict(path: Path, manifest: Mapping) -> tuple[str, bool] | None:
    """(why, unsafe) when the checkpoint's structure check fails, else None; remembered by fingerprint."""
    sig = _signature(path, manifest)
    key = str(path)
    if sig is not None:
        with _VERDICTS_LOCK:
            hit = _VERDICTS.get(key)
        if hit is not None and hit[0] == sig:
            return hit[1]
    try:
        structure.check_files(path, manifest)
        verdict = None
    except structure.StructureError as exc:
        verdict = (str(exc), isinstance(exc, structure.UnsafeStructure))
    if sig is not None and sig == _signature(path, manifest):
        with _VERDICTS_LOCK:
            if len(_VERDICTS) >= _VERDICTS_MAX:
                _VERDICTS.clear()
            _VERDICTS[key] = (sig, verdict)
    return verdict


def _not_regular(path: Path, directory: bool = False) -> str | None:
    """Why ``path`` may not be read as part of a checkpoint (a symlink, not a plain file), or None.

    A checkpoint is only what its directory really holds: a link could point
    anywhere (``state.pt -> /etc/passwd``), and a FIFO or device would block
    or mislead the hash.  A missing file is reported by name too.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None if directory else f"{path.name} is missing"
    except OSError as exc:
        return f"cannot read {path.name}: {exc.strerror or exc}"
    if stat.S_ISLNK(st.st_mode):
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
        what = "the checkpoint directory" if directory else "a file inside a checkpoint"
        return (
            f"{path.name} is a symlink (to {target}); saverules never follows a link for {what}: "
            "replace the link with the real " + ("directory" if directory else "file")
        )
    if directory:
        return None if stat.S_ISDIR(st.st_mode) else f"{path.name} is not a directory"
    if not stat.S_ISREG(st.st_mode):
        return f"{path.name} is not a regular file"
    return None


class VerifyCache:
    """Remembers hash checks by file fingerprint, so each checkpoint is hashed once."""

    def __init__(self):
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[tuple, CheckpointInfo]] = {}

    def get(self, path: Path, root: Path, deep: bool) -> CheckpointInfo:
        shallow = inspect_checkpoint(path, root, verify=False, _structure=not deep)
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


def sort_key(info: CheckpointInfo):
    known = info.step is not None
    return (
        not known,
        info.step if known else 0,
        info.time if info.time is not None else -math.inf,
        info.utc.timestamp() if info.utc is not None else -math.inf,
        info.name,
    )


def gone(info: CheckpointInfo) -> bool:
    """Whether a checkpoint that failed its check was removed while it was read (by retention, say).

    Retention moves a checkpoint's directory away in one rename before it
    deletes it, so a reader that finds files missing in a directory that is
    no longer there saw a checkpoint go, not a damaged one: it is left out,
    never reported as failed.
    """
    return not info.ok and not os.path.lexists(info.path)


class Inspect(Protocol):
    """How a kind of checkpoint is checked: its path and the store's root in, its info out."""

    def __call__(self, path: Path, root: Path, verify: bool) -> CheckpointInfo: ...


def scan(dir: str | os.PathLike, verify: bool = True, _cache: VerifyCache | None = None,
         _structure: bool = True, *, candidates: Callable[[Path], list[Path]] | None = None,
         inspect: Inspect | None = None) -> list[CheckpointInfo]:
    """Every checkpoint directory under ``dir``, oldest first, each with its verification status.

    Directories that hold checkpoint files but no valid manifest are listed
    too (``verified`` False, step None, at the end).  A checkpoint removed
    while it was read is left out.  ``candidates`` and ``inspect`` list and
    check another kind of checkpoint the same way (the trainers' own, see
    :mod:`saverules.integrations.manifest`); the cache serves the store's only.
    """
    root = Path(dir)
    infos = []
    for path in (candidates or layout.candidates)(root):
        if inspect is not None:
            info = inspect(path, root, verify)
        elif _cache is not None:
            info = _cache.get(path, root, verify)
        else:
            info = inspect_checkpoint(path, root, verify=verify, _structure=_structure)
        if not gone(info):
            infos.append(info)
    infos.sort(key=sort_key)
    return infos


def newest_good(root: Path, cache: VerifyCache, skip: Callable[[CheckpointInfo], None],
                deep: Callable[[CheckpointInfo], bool] = lambda info: True) -> Iterator[CheckpointInfo]:
    """The checkpoints that verify, newest first; ``skip(info)`` hears of every one that does not.

    A checkpoint for which ``deep(info)`` is False is only checked shallowly
    (manifest and sizes): its reader checks the digests as it reads.
    """
    infos = scan(root, verify=False, _structure=False)  # each is checked in full below, newest first
    for info in infos:
        if info.step is None:
            skip(info)
    for shallow in sorted((i for i in infos if i.step is not None), key=sort_key, reverse=True):
        info = cache.get(shallow.path, root, deep(shallow)) if shallow.ok else shallow
        if info.ok:
            yield info
        elif not gone(info):
            skip(info)


#: What ``verify`` checks after a save wrote its files, before the manifest goes in (docs/checkpoints.md).
MODES = ("none", "hash", "device", "load")


def _reread(tmp: Path, files: Mapping[str, Mapping], from_device: bool) -> None:
    for fname, entry in files.items():
        algo, expected = digest.entry_digest(entry)
        size, hexdigest = digest.hash_file(tmp / fname, algo, from_device=from_device)
        if size != entry["size"] or hexdigest != expected:
            raise CheckpointVerifyError(
                f"saverules: {tmp / fname} did not read back as written "
                f"({size} bytes, {algo} {hexdigest[:12]}..., expected {entry['size']} bytes, "
                f"{expected[:12]}...); the checkpoint was not committed"
            )


class WrittenCheck(Protocol):
    """What :func:`check_written` asks of a format (a rank's part of a sharded checkpoint has only these)."""

    def check_index(self, source: formats.Source) -> bool: ...

    def check_loads(self, source: formats.Source) -> None: ...


def check_written(tmp: Path, step: int, files: Mapping[str, dict[str, Any]], fmt: WrittenCheck, mode: str,
                  metadata: Mapping | None = None) -> None:
    """Verify the files of a save before it is committed; raise CheckpointVerifyError.

    * ``"hash"``: every file's size on disk is the number of bytes written,
      and the format re-reads its index (for a format without one, every file
      is re-read from the page cache and its digest compared);
    * ``"device"``: every file is re-read after its cached pages were
      dropped, so from the device, and its digest compared;
    * ``"load"``: as ``"device"``, and the checkpoint is decoded back (safely).
    """
    from . import formats  # imports torch: only a writer gets here, never a listing

    source = formats.Source(Path(tmp), step, files, metadata)
    try:
        if mode == "hash":
            for fname, entry in files.items():
                size = os.stat(tmp / fname).st_size
                if size != entry["size"]:
                    raise CheckpointVerifyError(
                        f"saverules: {tmp / fname} did not read back as written ({size} bytes on disk, "
                        f"{entry['size']} written); the checkpoint was not committed"
                    )
            if not fmt.check_index(source):
                _reread(tmp, files, from_device=False)
            return
        _reread(tmp, files, from_device=True)
        if mode == "load":
            fmt.check_loads(source)
    except CheckpointVerifyError:
        raise
    except CheckpointError as exc:
        raise CheckpointVerifyError(f"{exc}; the checkpoint was not committed") from exc
    except OSError:
        raise
    except Exception as exc:
        raise CheckpointVerifyError(
            f"saverules: {tmp} does not read back ({exc}); the checkpoint was not committed"
        ) from exc
