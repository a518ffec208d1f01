"""The commit protocol: a checkpoint appears whole, under its name, or not at all.

1. create ``.tmp-<name>-<pid>-<random>`` in the store directory;
2. let the format write its files there (each fsynced, digested as written);
3. verify them (``verify`` "hash" or "load");
4. write ``manifest.json`` last and fsync the temporary directory;
5. move a checkpoint of the same name aside, rename the new one into place,
   fsync the store directory, and remove the old one.

Any failure undoes the commit (:func:`abort`) so the store holds exactly what
it held before.  :func:`cleanup` removes what an interrupted writer left.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from . import digest, formats, layout, writer
from .errors import CheckpointError, log, warn, write_error
from .fs import fs
from .layout import DEL_PREFIX, MANIFEST, OLD_PREFIX, TMP_PREFIX, hidden_name
from .manifest import encode_manifest

#: check(tmp, files, metadata): verification of the written files before the manifest goes in.
Check = Callable[[Path, Mapping[str, Any], Mapping[str, Any] | None], None]


def _write(path: str, producer) -> dict[str, Any]:
    return writer.write_file(path, producer)  # looked up per call (tests wrap it)


def _digest_foreign(tmp: Path, name: str) -> dict[str, Any]:
    """fsync and digest a file a format wrote by other means."""
    path = tmp / name
    fd = os.open(path, os.O_RDONLY)
    try:
        fs.fsync(fd)
    finally:
        os.close(fd)
    size, hexdigest = digest.hash_file(path, digest.DEFAULT)
    return digest.make_entry(size, digest.DEFAULT, hexdigest)


def commit(root: Path, name: str, step: int, manifest: Mapping[str, Any],
           encode: Callable[[formats.Output], formats.Encoded], check: Check | None) -> tuple[Path, dict[str, Any]]:
    """Write a checkpoint called ``name`` into ``root`` atomically; its path and final manifest."""
    target = root / name
    tmp = root / hidden_name(TMP_PREFIX, name)
    steps = Steps("create the temporary directory")
    out = formats.Output(tmp, _write)
    layout.mark_inflight(tmp)
    try:
        fs.makedirs(str(root))
        fs.mkdir(str(tmp))
        steps.stage = None  # the format's own stage (out.stage) while it writes
        encoded = encode(out)
        files: dict[str, Any] = {}
        for fname, entry in encoded.files.items():
            if entry is None:
                steps.stage = f"digest {fname}"
                entry = _digest_foreign(tmp, fname)
            files[fname] = entry
        if check is not None:
            steps.stage = "verify the files"
            check(tmp, files, encoded.metadata)
        steps.stage = f"write {MANIFEST}"
        final = dict(manifest, files=files)
        if encoded.metadata:
            final["format_metadata"] = encoded.metadata
        install(root, name, tmp, final, steps)
    except BaseException as exc:
        abort(root, tmp, target, steps.old, steps.renamed_in)
        doing = steps.stage if steps.stage is not None else out.stage
        if isinstance(exc, OSError):
            raise write_error(exc, step, str(tmp), doing) from exc
        if isinstance(exc, CheckpointError):
            raise
        if isinstance(exc, Exception):
            raise CheckpointError(
                f"saverules: could not {doing} for the checkpoint for step {step} at {tmp}: {exc}. "
                "Nothing was committed and older checkpoints are untouched."
            ) from exc
        raise
    finally:
        layout.unmark_inflight(tmp)
    remove_replaced(steps.old)
    return target, final


class Steps:
    """How far the last steps of a commit got: what :func:`abort` undoes and what an error names."""

    def __init__(self, stage: str | None):
        self.stage = stage
        self.old: Path | None = None  # the checkpoint of the same name, moved aside
        self.renamed_in = False          # the new checkpoint stands under its name


def install(root: Path, name: str, tmp: Path, final: Mapping[str, Any], steps: Steps) -> None:
    """Steps 4 and 5 on a temporary directory whose files are written: ``manifest.json`` last, then the rename.

    Writes and fsyncs the manifest and the directory, moves a checkpoint of
    the same name aside, renames ``tmp`` to ``root/name`` and fsyncs ``root``,
    recording in ``steps`` what it is doing; on an error the caller passes
    ``steps`` on to :func:`abort`.
    """
    target = root / name
    steps.stage = f"write {MANIFEST}"
    data = encode_manifest(final)
    _write(str(tmp / MANIFEST), lambda f: f.write(data))
    steps.stage = "sync the temporary directory"
    fs.fsync_dir(str(tmp))
    if os.path.lexists(target):
        steps.stage = "move the previous checkpoint of the same name aside"
        steps.old = root / hidden_name(OLD_PREFIX, name)
        fs.rename(str(target), str(steps.old))
    steps.stage = "rename the checkpoint into place"
    fs.rename(str(tmp), str(target))
    steps.renamed_in = True
    steps.stage = "sync the checkpoint directory"
    fs.fsync_dir(str(root))


def remove_replaced(old: Path | None) -> None:
    """Delete the checkpoint a commit replaced (a warning when it cannot)."""
    if old is not None:
        try:
            fs.rmtree(str(old))
        except OSError as exc:
            warn(f"saverules: could not remove the replaced checkpoint {old}: {exc}")


def abort(root: Path, tmp: Path, target: Path, old: Path | None, renamed_in: bool) -> None:
    """Undo a failed commit: the store goes back to exactly what it held before."""
    try:
        if os.path.lexists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        if renamed_in and os.path.lexists(target):
            # The directory entry could not be made durable: take the new checkpoint
            # out again so that what the error reports (nothing committed) is true.
            trash = root / hidden_name(DEL_PREFIX, target.name)
            try:
                os.rename(target, trash)
            except OSError as exc:
                warn(f"saverules: could not withdraw {target} after the failed save: {exc}")
            else:
                shutil.rmtree(trash, ignore_errors=True)
    finally:
        if old is not None and not os.path.lexists(target) and os.path.lexists(old):
            try:
                os.rename(old, target)
            except OSError as exc:  # the next construction restores it
                warn(f"saverules: could not move {old} back to {target}: {exc}")


def cleanup(root: Path) -> None:
    """Remove what an interrupted write left behind; put back a checkpoint caught mid-replacement."""
    try:
        entries = list(os.scandir(root))
    except OSError:
        return
    for entry in entries:
        parsed = layout.split_hidden(entry.name)
        if parsed is None:
            continue
        prefix, name, pid = parsed
        path = Path(entry.path)
        if layout.is_inflight(str(path)) or (pid != os.getpid() and layout.pid_alive(pid)):
            continue
        try:
            if prefix == OLD_PREFIX and not os.path.lexists(root / name):
                os.rename(path, root / name)
                log.warning("restored checkpoint %s from an interrupted replacement", root / name)
            elif entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path)
            else:
                os.unlink(path)
        except OSError as exc:
            warn(f"saverules: could not clean up {path}: {exc}")


def write_small_file(root: Path, name: str, data: bytes) -> None:
    """Replace ``root/name`` atomically with ``data`` (written, fsynced, renamed); raises OSError."""
    target = root / name
    tmp = root / hidden_name(TMP_PREFIX, name)
    try:
        _write(str(tmp), lambda f: f.write(data))
        fs.rename(str(tmp), str(target))
        fs.fsync_dir(str(root))
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
