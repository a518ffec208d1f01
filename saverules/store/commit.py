"""The commit protocol: a checkpoint appears whole, under its name, or not at all.

1. create ``.tmp-<name>-<pid>-<random>`` in the store directory;
2. let the format write its files there (each fsynced, digested as written);
3. verify them (``verify`` "hash" or "load");
4. write ``manifest.json`` last and fsync the temporary directory;
5. move a checkpoint of the same name aside, rename the new one into place,
   fsync the store directory, and remove the old one.

Any failure undoes the commit (:func:`abort`) so the store holds exactly what
it held before.  :func:`cleanup` removes what an interrupted writer left.

How a Checkpointer commits is one :class:`Committer`: :class:`LocalCommitter`
(one process writes, the steps above) or
:class:`~saverules.store.sharded.coordinate.ShardedCommitter` (every rank
writes its files, rank 0 commits them all), wrapped in
:class:`~saverules.store.remote.committer.TieredCommitter` (the durable tier,
when there is one).  The Checkpointer picks them when it is made and never
asks which it holds.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping, MutableMapping
from pathlib import Path
from typing import Any, Protocol

from . import digest, formats, layout, resume, writer
from .errors import CheckpointError, log, warn, write_error
from .fs import fs
from .layout import DEL_PREFIX, MANIFEST, OLD_PREFIX, TMP_PREFIX, hidden_name
from .manifest import CheckpointInfo, encode_manifest
from .verify import VerifyCache, check_written

#: check(tmp, files, metadata): verification of the written files before the manifest goes in.
Check = Callable[[Path, Mapping[str, Any], Mapping[str, Any] | None], None]


#: settle(path, manifest): run by the committing process once the checkpoint is visible (retention).
Settle = Callable[[Path, Mapping[str, Any]], None]
#: What a resume found: (the checkpoint, its payload, the state the payload is restored into).
Loaded = tuple[CheckpointInfo, Any, MutableMapping[str, Any]]


class Committer(Protocol):
    """How the checkpoints of one store become visible: the interface behind every way to commit.

    A Checkpointer holds one committer, picked once when it is made, and runs
    every save and every resume through it without asking which it is.  The
    implementations: :class:`LocalCommitter` (one process, a temporary
    directory renamed into place),
    :class:`~saverules.store.sharded.coordinate.ShardedCommitter` (every rank
    writes its files, rank 0 commits all of them or none), and
    :class:`~saverules.store.remote.committer.TieredCommitter`, which wraps
    either and adds the durable tier on object storage (data objects first,
    then the manifest with every object's digest and size, then a commit
    marker; no rename): a committed local checkpoint is promoted (uploaded in
    the background), and a resume looks at both tiers.  The Checkpointer
    always holds a TieredCommitter, which only passes through when there is
    no durable tier.

    Contracts, for every implementation:

    * **Visibility.** Nothing of a checkpoint is visible to a reader
      (:func:`saverules.store.verify.scan`, ``saverules.ls``, a resume) before
      its commit point (a rename, a marker), and after it the checkpoint is
      complete: every file written, durable, and named with its size and
      digest in ``manifest.json``.  A checkpoint that replaces one of the
      same name replaces it whole.
    * **Failure.** :meth:`commit` either makes the checkpoint visible or
      raises (a :class:`~saverules.store.errors.CheckpointError`, whose
      message says that nothing was committed, or
      :class:`~saverules.store.ranks.RankFailure` across ranks) after it has
      removed what this save wrote.  The store then holds exactly what it
      held before.
    * **Leftovers.** What a writer killed mid-save leaves (temporary
      directories, objects without a commit marker) is never visible, and
      :meth:`cleanup` removes it; the Checkpointer calls it when it opens a
      store to write, under the store's lock, so that no live writer's work
      is removed.
    * **Threads.** :meth:`start` runs in the training thread (it may take
      part in collectives); :meth:`commit` runs in the writer (the training
      thread for a synchronous save, the writer thread for an async one).
    """

    #: This process writes files: the only process, rank 0, or every rank of a sharded format.
    writes: bool

    def start(self, name: str, step: int, capture: Callable[[], Any]) -> tuple[str, Any, Any]:
        """In the training thread: capture the state (``capture()``) and settle the checkpoint's name.

        Returns (name, payload, handle): the name to commit under (ranks agree
        on one), the captured payload, and whatever :meth:`commit` needs to
        find this save again (a sharded save's temporary directory; None for
        a local one).  Raises what ``capture`` raises; nothing is visible yet.
        """
        ...

    def commit(self, name: str, step: int, manifest: Mapping[str, Any], payload: Any, handle: Any, *,
               before: Callable[[], None] | None, settle: Settle) -> None:
        """Encode ``payload``, write and digest, verify, and make the checkpoint ``name`` visible.

        ``manifest`` holds every field but the files (and format metadata),
        which the committer adds.  ``before()``, when given, runs first on
        every process that writes (an async save's late copy); its failure
        fails the save.  ``settle(path, manifest)`` runs on the committing
        process after the commit point, before this method returns on any
        process (retention); its failure is a warning, the checkpoint stays.
        """
        ...

    def load_latest(self, cache: VerifyCache, skip: Callable[[CheckpointInfo], None],
                    state: MutableMapping[str, Any], map_location: Any, if_none_valid: str,
                    mmap: bool) -> Loaded | None:
        """The newest checkpoint that verifies, decoded (every process gets the same one); None as
        :func:`saverules.store.resume.pick` decides.  ``skip(info)`` is told of each damaged one passed over."""
        ...

    def cleanup(self) -> None:
        """Remove what an interrupted writer left in the store (never a visible checkpoint)."""
        ...


class LocalCommitter:
    """One process writes the checkpoint into a temporary directory and renames it into place (:func:`commit`)."""

    def __init__(self, root: Path, fmt: Any, verify: str, writes: bool) -> None:
        self.root, self.fmt, self.verify, self.writes = root, fmt, verify, writes

    def start(self, name: str, step: int, capture: Callable[[], Any]) -> tuple[str, Any, Any]:
        return name, capture(), None

    def commit(self, name: str, step: int, manifest: Mapping[str, Any], payload: Any, handle: Any, *,
               before: Callable[[], None] | None, settle: Settle) -> None:
        if before is not None:
            before()
        fmt, verify = self.fmt, self.verify

        def check(tmp: Path, files: Mapping[str, Any], metadata: Mapping[str, Any] | None) -> None:
            check_written(tmp, step, files, fmt, verify, metadata)

        path, final = commit(self.root, name, step, manifest, encode=lambda out: fmt.encode(payload, out),
                             check=check if verify != "none" else None)
        settle(path, final)

    def load_latest(self, cache: VerifyCache, skip: Callable[[CheckpointInfo], None],
                    state: MutableMapping[str, Any], map_location: Any, if_none_valid: str,
                    mmap: bool) -> Loaded | None:
        found = resume.load_latest(self.root, cache, skip, if_none_valid, map_location, mmap, state)
        if found is None:
            return None
        info, payload = found
        return info, payload, state

    def cleanup(self) -> None:
        cleanup(self.root)


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
