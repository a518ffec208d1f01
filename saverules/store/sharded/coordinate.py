"""Sharded saves and loads: every rank writes its own files, rank 0 commits all of them or none.

A save, on every rank at the same step:

1. **start** (training thread): each rank captures its state; rank 0 creates
   the hidden temporary directory ``.tmp-<name>-<pid>-<random>``, whose name
   every rank knows (rank 0's pid and random part were agreed when the
   Checkpointer was made); one small all-reduce tells every rank that all of
   them are ready (an all-gather of their errors follows when one is not);
2. **write**: each rank writes its rank file and its shards into that
   directory (``torch.distributed.checkpoint``, whose own collectives run on
   the same group), digesting every file as it is written, fsyncing it, and
   re-reading it when ``verify`` asks;
3. **report**: a gather brings every rank's file list (name, size, digest,
   rank) or its error to rank 0;
4. **commit** (rank 0): only when every rank reported success, rank 0
   writes ``manifest.json`` last (every file of every rank, the world size,
   the sharding), fsyncs it and the directory, renames the directory into
   place and fsyncs the store;
5. **retain** (rank 0): retention, after the commit;
6. **confirm**: a broadcast of the outcome, so that every rank returns only
   after the commit, and every rank raises when it failed.

The rename of step 4 is the commit point.  Before it nothing is visible,
whichever rank fails or dies; after it the checkpoint is complete, since
rank 0 renames only after every rank reported its files written and
fsynced.  Every collective is bounded by the timeout of
:class:`~saverules.store.ranks.Ranks`.

A load: rank 0 picks the newest checkpoint that verifies and broadcasts its
name; every rank reads its rank file (an all-gather of the outcome, so that
a file one rank cannot read makes all of them fall back together); then the
shards are loaded into the live models and optimizers, resharded by DCP.

:class:`ShardedCommitter` is this module as the Checkpointer sees it: the
:class:`~saverules.store.commit.Committer` of a sharded format.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping, MutableMapping
from collections.abc import MutableMapping as _MutableMapping
from pathlib import Path
from typing import Any

from .. import commit as _commit
from .. import formats, layout, resume, writer
from ..errors import (
    CheckpointError,
    CheckpointWriteError,
    StateTypeError,
    UnsafeCheckpointError,
    log,
    warn,
    write_error,
)
from ..fs import fs
from ..layout import MANIFEST, TMP_PREFIX
from ..manifest import CheckpointInfo
from ..ranks import RankFailure, Ranks
from ..state import Payload
from ..verify import VerifyCache, check_written, inspect_checkpoint, newest_good


def _nothing(step: int) -> str:
    return f"Nothing was committed for step {step} and older checkpoints are untouched."


def _describe(exc: BaseException) -> str:
    """One line for an error on some rank, as the others will read it."""
    try:
        from torch.distributed.checkpoint.api import CheckpointException
    except ImportError:  # pragma: no cover
        CheckpointException = ()  # type: ignore[assignment,misc]  # an empty tuple: isinstance below is then always False
    if isinstance(exc, CheckpointException):
        parts = []
        for r, (err, _trace) in sorted(exc.failures.items()):
            parts.append(f"rank {r}: {_describe(err)}")
        return "; ".join(parts)
    if isinstance(exc, CheckpointError):  # the sentence about what was committed comes once, at the end
        text = str(exc).replace("saverules: ", "", 1)
        return text.replace(" Nothing was committed and older checkpoints are untouched.", "").rstrip(".")
    if isinstance(exc, OSError):
        if exc.filename:
            return f"could not write {os.path.basename(exc.filename)}: {exc.strerror or exc} ({exc.filename})"
        return str(exc.strerror or exc)
    return f"{type(exc).__name__}: {exc}"


class ShardedCommitter:
    """The :class:`~saverules.store.commit.Committer` of a sharded format: every rank writes, rank 0 commits.

    Every method but :meth:`cleanup` is a collective: every rank calls it at
    the same save or load.  :meth:`commit` makes the checkpoint visible by
    rank 0's rename, only once every rank reported its files (see the module's
    steps); ``settle`` runs on rank 0 before any rank returns.
    """

    def __init__(self, ranks: Ranks, root: Path, fmt: Any, verify: str, writes: bool) -> None:
        self.ranks, self.root, self.fmt, self.verify, self.writes = ranks, root, fmt, verify, writes

    def start(self, name: str, step: int, capture: Callable[[], Any]) -> tuple[str, Any, Any]:
        tmp, name, payload = start(self.ranks, self.root, name, step, capture)
        return name, payload, tmp

    def commit(self, name: str, step: int, manifest: Mapping[str, Any], payload: Any, handle: Any, *,
               before: Callable[[], None] | None, settle: _commit.Settle) -> None:
        commit(self.ranks, self.fmt, self.root, handle, name, step, manifest, payload, self.verify,
               settle=settle, before=before)

    def load_latest(self, cache: VerifyCache, skip: Callable[[CheckpointInfo], None],
                    state: MutableMapping[str, Any], map_location: Any, if_none_valid: str,
                    mmap: bool) -> _commit.Loaded | None:
        got = load_latest(self.ranks, self.root, cache, skip, state, map_location, if_none_valid)
        if got is None:
            return None
        info, payload, restored = got
        return info, payload, Without(state, restored)

    def cleanup(self) -> None:
        _commit.cleanup(self.root)  # rank 0, under the lock: the same hidden names as a local store


# --------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------


def start(ranks: Ranks, root: Path, name: str, step: int, capture: Callable[[], Any]) -> tuple[Path, str, Any]:
    """Step 1, in the training thread: capture this rank's state and agree on the temporary directory.

    Returns (temporary directory, checkpoint name, captured state); the name
    is rank 0's (a name template with ``{time}`` could render differently on
    each rank).  One small all-reduce says whether every rank is ready and
    has the same name; only when one is not do the ranks exchange their
    errors and names.
    """
    ranks.check()
    mine: BaseException | None = None
    sp = None
    try:
        sp = capture()
    except Exception as exc:  # raised below, after the other ranks have heard of it
        mine = exc
    save = ranks.next_save()
    tmp = root / ranks.temporary_name(TMP_PREFIX, name, save)
    made: Path | None = None  # rank 0: the directory to remove when the save does not go on
    if ranks.rank == 0 and mine is None:
        layout.mark_inflight(tmp)
        made = tmp
        try:
            fs.makedirs(str(root))
            fs.mkdir(str(tmp))
        except OSError as exc:
            mine = write_error(exc, step, str(tmp), "create the temporary directory")
    doing = f"start the save of step {step}"
    try:
        failed, same = ranks.agree(mine is not None, name, doing)
        if not failed and same:
            return tmp, name, sp
        note = None if mine is None else (type(mine).__name__, _describe(mine))
        told = ranks.all_gather((note, name), doing)
    except RankFailure:
        _drop(root, made)
        raise
    failed_ranks = [(r, n) for r, (n, _) in enumerate(told) if n is not None]
    if failed_ranks:
        _drop(root, made)
        if mine is not None:
            raise mine
        others = "; ".join(f"rank {r}: {text}" for r, (_, text) in failed_ranks)
        cls = StateTypeError if all(kind == "StateTypeError" for _, (kind, _) in failed_ranks) else CheckpointWriteError
        raise cls(f"saverules: the checkpoint for step {step} was not written: {others}. {_nothing(step)}")
    name = told[0][1]
    return root / ranks.temporary_name(TMP_PREFIX, name, save), name, sp


def _drop(root: Path, tmp: Path | None) -> None:
    """Rank 0: remove a temporary directory nothing was committed from."""
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)
        layout.unmark_inflight(tmp)


def _write_mine(ranks: Ranks, fmt, tmp: Path, step: int, sp, verify_mode: str,
                before: Callable[[], None] | None = None) -> dict[str, Any]:
    """Step 2 on this rank: its files, digested, fsynced and (``verify``) re-read; what to report."""
    if before is not None:  # the rest of an asynchronous snapshot (saverules.store.staging)
        mine: BaseException | None = None
        try:
            before()
        except CheckpointError as exc:
            mine = exc
        # Every rank writes its shards through collectives: all go on, or none does.
        failed, _ = ranks.agree(mine is not None, "", f"copy the state of step {step}")
        if mine is not None:
            raise mine
        if failed:
            raise _OtherRank()
    out = formats.Output(tmp, writer.write_file)
    enc = ranks.run(f"write the shards of step {step}", lambda: fmt.encode(sp, out, rank=ranks.rank,
                                                                           group=ranks.group))
    files = {fname: dict(entry, rank=ranks.rank) for fname, entry in enc.files.items()}
    if verify_mode != "none":  # each rank checks its own files, as the store checks a single writer's
        check_written(tmp, step, files, _RankPart(fmt, ranks.rank), verify_mode)
    fs.fsync_dir(str(tmp))
    return {"files": files, "metadata": enc.metadata}


class _OtherRank(Exception):
    """Another rank failed before writing; this one stops too (its error is the other rank's to report)."""


class _RankPart:
    """One rank's share of a sharded checkpoint, as :func:`~saverules.store.verify.check_written` sees a format."""

    def __init__(self, fmt, rank: int):
        self._fmt, self._rank = fmt, rank

    def check_index(self, source) -> bool:
        return False  # no index of its own to check: re-read the files

    def check_loads(self, source) -> None:
        self._fmt.check_rank_loads(source, self._rank)


def commit(ranks: Ranks, fmt, root: Path, tmp: Path, name: str, step: int, manifest: Mapping[str, Any], sp,
           verify_mode: str, settle: _commit.Settle | None = None,
           before: Callable[[], None] | None = None) -> tuple[Path, dict[str, Any]] | None:
    """Steps 2 to 6 on every rank; rank 0 gets (path, manifest) of the committed checkpoint, others None.

    ``settle(path, manifest)`` runs on rank 0 once the checkpoint is committed
    and before the confirmation (retention): when ``save`` returns on any
    rank, the store is in its final state.  ``before()`` runs on every rank
    first (an asynchronous save's late copies); its failure is reported like
    a failed write.

    Raises on every rank when the checkpoint was not committed: the error
    says which rank failed and why.  :class:`RankFailure` means a rank did
    not take part in time; the message says whether the commit happened.
    """
    try:
        try:
            report: dict[str, Any] = _write_mine(ranks, fmt, tmp, step, sp, verify_mode, before)
        except RankFailure:
            raise
        except _OtherRank:
            report = {"aborted": True}
        except BaseException as exc:  # reported to rank 0, which aborts; every rank raises below
            if not isinstance(exc, Exception) and type(exc).__name__ != "CheckpointException":
                raise
            report = {"error": _describe(exc), "errno": getattr(exc, "errno", None)}
        reports = ranks.gather(report, f"collect the files of step {step}")
    except RankFailure:
        if ranks.rank == 0:
            _drop(root, tmp)
        raise
    outcome: dict[str, Any] = {}
    result = None
    if ranks.rank == 0:
        try:
            result = _seal(ranks, root, tmp, name, step, manifest, reports or [])
            outcome = {"path": str(result[0])}
        except CheckpointError as exc:
            outcome = {"error": str(exc)}
        except Exception as exc:  # still tell the other ranks (they wait for the outcome); _seal aborted
            outcome = {"error": f"saverules: could not commit the checkpoint for step {step}: "
                                f"{type(exc).__name__}: {exc}. {_nothing(step)}"}
        finally:
            layout.unmark_inflight(tmp)
        if result is not None and settle is not None:
            try:
                settle(*result)
            except Exception as exc:  # the checkpoint is committed: say so, and confirm it all the same
                warn(f"saverules: after committing {result[0]}: {exc}")
    try:
        outcome = ranks.broadcast(outcome, f"confirm the commit of step {step}")
    except RankFailure as exc:
        if ranks.rank == 0 and result is not None:
            raise RankFailure(f"{exc} (the checkpoint for step {step} itself was committed, complete: every rank "
                              "had reported its files)") from exc
        if ranks.rank != 0:
            raise RankFailure(f"{exc} (whether rank 0 committed step {step} is unknown: a restart loads the newest "
                              "complete checkpoint, whichever it is)") from exc
        raise
    if "error" in outcome:
        text = outcome["error"]
        raise CheckpointWriteError(text if text.startswith("saverules:") else f"saverules: {text}",
                                   errno=report.get("errno") if "error" in report else None)
    return result


def _seal(ranks: Ranks, root: Path, tmp: Path, name: str, step: int, manifest: Mapping[str, Any],
          reports: list[dict[str, Any]]) -> tuple[Path, dict[str, Any]]:
    """Step 4 on rank 0: the manifest of every rank's files, then the rename; or nothing at all."""
    target = root / name
    failed = [(r, rep["error"]) for r, rep in enumerate(reports) if "error" in rep]
    if failed or any("aborted" in rep for rep in reports):
        _commit.abort(root, tmp, target, None, False)
        # DCP reports one rank's failure on every rank: name each failing rank once.
        seen, parts = set(), []
        for r, text in failed:
            if text not in seen:
                seen.add(text)
                parts.append(text if text.startswith("rank ") else f"rank {r}: {text}")
        raise CheckpointWriteError(
            f"saverules: the checkpoint for step {step} was not written: {'; '.join(parts)}. {_nothing(step)}")
    files: dict[str, Any] = {}
    for rep in reports:
        for fname, entry in rep["files"].items():
            if fname in files:
                _commit.abort(root, tmp, target, None, False)
                raise CheckpointWriteError(f"saverules: two ranks wrote {fname} for step {step}. {_nothing(step)}")
            files[fname] = entry
    final = dict(manifest, files=files, world_size=ranks.size)
    meta = reports[0].get("metadata")
    if meta:
        final["format_metadata"] = meta
    steps = _commit.Steps(f"write {MANIFEST}")
    try:
        _commit.install(root, name, tmp, final, steps)
    except BaseException as exc:
        _commit.abort(root, tmp, target, steps.old, steps.renamed_in)
        if isinstance(exc, OSError):
            raise write_error(exc, step, str(tmp), steps.stage or f"write {MANIFEST}") from exc
        raise
    _commit.remove_replaced(steps.old)
    return target, final


# --------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------


def load_latest(ranks: Ranks, root: Path, cache, skip: Callable[[CheckpointInfo], None],
                state: MutableMapping[str, Any], map_location: Any,
                if_none_valid: str = "raise") -> tuple[CheckpointInfo, Payload, set] | None:
    """Restore the models and optimizers of the newest good checkpoint on every rank.

    Returns (info, this rank's payload, the names restored from the shards).

    Rank 0 chooses (manifest and sizes) and broadcasts its choice: every rank
    loads the same step, every rank falls back together, and every rank
    raises together (an unsafe checkpoint, or a store of which no checkpoint
    can be used, as :func:`saverules.store.resume.pick` decides for one
    process).  The payload (plain values, other objects, the decider) is left
    for the caller to restore.

    The digests are checked by the ranks together
    (:mod:`saverules.store.sharded.digests`).  A rank checks the files it
    reads first (its rank file, DCP's index) before reading them; the rest of
    its share is hashed on a thread while DCP loads the shards into the live
    models and optimizers, and the checkpoint counts only once every rank
    has reported its share good.  A digest that fails then has left damaged
    bytes in those objects, so, as for one process
    (:func:`saverules.store.resume.load_latest`), the walk must end in a
    checkpoint whose load overwrites them, or raise; ``"start_fresh"``
    checks every digest before DCP reads anything.
    """
    ranks.check()
    resume.check_if_none_valid(if_none_valid)
    rejected: list[CheckpointInfo] = []

    from . import digests
    from . import files as dcp_files
    from .format import DcpFormat  # (imported here: the format module imports the store's formats)

    def passed_over(bad: CheckpointInfo) -> None:
        if bad.unsafe:
            raise resume.unsafe_error(bad)
        rejected.append(bad)
        skip(bad)

    # A dcp checkpoint's digests are checked by all the ranks together, each a share of the files, once it
    # is chosen (saverules.store.sharded.digests); rank 0 checks only its manifest and sizes to choose it.
    candidates = newest_good(root, cache, passed_over, deep=lambda i: i.format != DcpFormat.name) \
        if ranks.rank == 0 else None
    landed: dict[str, set] = {}  # checkpoints whose shards were loaded before a digest failed: {name: objects}
    while True:
        info, verdict = None, None
        if candidates is not None:
            try:
                info = next(candidates, None)
                verdict = ("use", info.name) if info is not None else ("none", resume.rejected_pairs(rejected))
            except UnsafeCheckpointError as exc:
                verdict = ("unsafe", str(exc))
        kind, what = ranks.broadcast(verdict, "choose the checkpoint to resume from")
        if kind == "unsafe":
            raise UnsafeCheckpointError(what)
        if kind == "none":
            if ranks.rank == 0 or if_none_valid == "raise":  # the warning of a fresh start comes once
                resume.none_valid(root, what, if_none_valid)
            return None
        name = what
        if info is None:
            info = inspect_checkpoint(root / name, root, verify=False)
        status, payload, layouts, fmt = None, None, None, None
        pending: digests.Pending | None = None
        try:
            if not info.ok or info.manifest is None:  # (a usable checkpoint has its manifest)
                raise CheckpointError(f"saverules: rank {ranks.rank} cannot use {info.path}: {info.error}")
            fmt = formats.get(info.format)
            source = formats.Source.of(info.path, info.manifest)
            if isinstance(fmt, DcpFormat):
                world = int(info.manifest.get("world_size") or 1)
                if info.verified is not True:  # this rank's share of the digests, what it reads first included
                    from .format import rank_file

                    own = [rank_file(ranks.rank if ranks.rank < world else 0), dcp_files.METADATA_FILE]
                    files = info.manifest["files"]
                    mine = digests.share(files, ranks.rank, ranks.size, own)
                    digests.check(info.path, files, own)  # before this rank reads them
                    rest = mine[len(own):]
                    if if_none_valid == "raise":  # the rest beside DCP's read: see the docstring
                        pending = digests.Pending(info.path, files, rest)
                    else:
                        digests.check(info.path, files, rest)
                payload, layouts = fmt.read_rank(source, ranks.rank, world, map_location)
            else:
                payload = fmt.decode(source, map_location)
        except UnsafeCheckpointError as exc:
            status = ("unsafe", str(exc))
        except CheckpointError as exc:
            status = ("error", str(exc))
        told = ranks.all_gather(status, f"read the checkpoint {name}")
        unsafe = [text for s in told if s is not None and s[0] == "unsafe" for text in [s[1]]]
        if unsafe:
            if pending is not None:
                pending.result()
            raise UnsafeCheckpointError(unsafe[0])
        errors = [s[1] for s in told if s is not None]
        if not errors and payload is None:  # every rank read its part (no errors above), so each has a payload
            raise CheckpointError(f"saverules: rank {ranks.rank} read no state from {info.path}")
        if not errors and layouts is not None:
            try:
                _load_shards(ranks, fmt, source, state, layouts, name)
            except (RankFailure, UnsafeCheckpointError):
                if pending is not None:
                    pending.result()
                raise
            except CheckpointError:  # DCP failed on every rank: a damaged file may be why
                if pending is None:
                    raise
                problem = _digest_verdict(ranks, pending, name)
                if problem is None:
                    raise
                landed[name] = set(layouts)
                errors = [problem]
            else:
                problem = _digest_verdict(ranks, pending, name) if pending is not None else None
                if problem is not None:
                    landed[name] = set(layouts)
                    errors = [problem]
        elif pending is not None:
            pending.result()  # (passed over anyway; the thread is done with the files)
        if errors:
            if ranks.rank == 0:
                from dataclasses import replace

                passed_over(replace(info, verified=False, error=errors[0].replace("saverules: ", "", 1)))
            continue
        if payload is None:
            raise CheckpointError(f"saverules: rank {ranks.rank} read no state from {info.path}")
        if landed:
            restored = set(layouts or ())
            left = sorted({n for objs in landed.values() for n in objs} - restored)
            if left:
                raise CheckpointError(
                    f"saverules: {', '.join(sorted(landed))} failed its digests after its shards were loaded, and "
                    f"{info.name}, the checkpoint resumed instead, holds no shards for {', '.join(map(repr, left))}: "
                    "those objects may hold damaged bytes. Re-create them before use (or pass "
                    "if_none_valid='start_fresh', which checks every digest before loading)"
                )
        if ranks.rank == 0 and info.verified is None:  # every rank checked its share of the digests
            from dataclasses import replace

            cache.put(info.path, replace(info, verified=True))
        return info, payload, set(layouts or ())


def _digest_verdict(ranks: Ranks, pending: Any, name: str) -> str | None:
    """Every rank's verdict on its share of the digests: the first reason a file failed, or None (a collective)."""
    problem = pending.result()
    failed, _ = ranks.agree(problem is not None, "", f"check the digests of {name}")
    if not failed:
        return None
    told = ranks.all_gather(problem, f"report the digests of {name}")
    return next((p for p in told if p is not None), "a file failed its digest")


def _load_shards(ranks: Ranks, fmt, source, state, layouts, name: str) -> None:
    try:
        ranks.run(f"load the shards of {name}", lambda: fmt.load_shards(source, state, layouts, ranks.group))
    except RankFailure:
        raise
    except BaseException as exc:
        if not isinstance(exc, Exception) and type(exc).__name__ != "CheckpointException":
            raise
        from .files import UnsafeMetadata, unwrap

        if isinstance(unwrap(exc), UnsafeMetadata):
            raise UnsafeCheckpointError(f"saverules: refused to load {source.dir}: {unwrap(exc)}") from None
        raise CheckpointError(f"saverules: restoring the models and optimizers from {source.dir} failed: "
                              f"{_describe(exc)}") from None
    log.info("loaded the shards of %s on rank %d of %d", source.dir, ranks.rank, ranks.size)


class Without(_MutableMapping):
    """``state`` without some names (written through for the rest): what the per-rank restore sees."""

    def __init__(self, state: MutableMapping[str, Any], hidden):
        self._state, self._hidden = state, set(hidden)

    def __getitem__(self, key):
        if key in self._hidden:
            raise KeyError(key)
        return self._state[key]

    def __setitem__(self, key, value):
        self._state[key] = value

    def __delitem__(self, key):
        del self._state[key]

    def __iter__(self):
        return (k for k in self._state if k not in self._hidden)

    def __len__(self):
        return sum(1 for _ in self)
