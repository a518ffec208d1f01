"""Sharded promotion: every rank uploads the files it wrote, rank 0 commits the durable checkpoint.

A ``format = "dcp"`` checkpoint is written by every rank (its rank file and
its shards; rank 0 also ``.metadata``), and its local manifest names the rank
of each file.  Its promotion to the durable tier is one upload per rank,
coordinated through objects of the tier itself, never through collectives
(the uploads run in background threads, and a collective there could
interleave with the training's):

1. **open** (rank 0): removes what an earlier attempt of the same name left,
   then writes ``NAME/.ranks/open.json`` (a random attempt token, the step,
   the world size) and the pointer ``ROOT/.saverules.promoting`` (the name
   and step rank 0 works on now);
2. **upload** (every rank): each rank uploads the files of the local
   manifest that it wrote, each hashed while it streams and compared with
   the manifest before the object is completed
   (:func:`~saverules.store.remote.transfer.upload_file`), and then writes
   its report ``NAME/.ranks/rank-<R>.json``: the files it uploaded, or the
   reason it could not;
3. **commit** (rank 0): once every rank has reported success (waiting at
   most the commit timeout), rank 0 checks that every file of the manifest
   is there with its size, writes ``manifest.json`` and the marker
   ``COMMITTED``, the commit point, then removes the reports;
4. **outcome** (the other ranks): each waits until it sees the marker (the
   promotion is durable), or an abandon object.

A failure on any rank (its upload failed, or it did not report in time)
abandons the promotion on every rank: rank 0 writes
``NAME/.ranks/abandon.json`` (the rank and the reason) and removes every
other object of the prefix; the others read the abandon object, and every
rank raises :class:`~saverules.store.remote.transfer.TransferError` naming
the rank that failed and why.  Nothing of an abandoned promotion is visible
(there is no marker); what is left under its prefix is hidden, and removed
by the next writer's clean-up (:meth:`DurableTier.clean`) like any leftover.

A failure that waiting may fix (a network operation whose retries ran out,
on any rank) makes every rank raise
:class:`~saverules.store.remote.retry.RetriesExhausted` instead, so that each
rank's promoter tries the whole promotion again: rank 0 opens a new attempt,
the others serve it.

The ranks agree on a run id when they open the tier (:func:`open_sharded`);
the other ranks heed only the open objects and pointer of this run.

The promoters of the ranks need not run the same promotions: a newer
promotion may replace a queued one on one rank and not on another.  A rank
other than 0 therefore follows rank 0's pointer: when rank 0 works on an
older checkpoint than its own, the rank serves that one first (its files
are still in the local store: rank 0's promotion protects them); when rank
0 has moved past its checkpoint, that checkpoint was replaced and there is
nothing to upload.

Nothing here imports torch; see docs/distributed.md.
"""
from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, log
from ..layout import MANIFEST
from ..manifest import Invalid, read_manifest
from .committer import AgreedTieredCommitter
from .retry import DEFAULT, Retries, RetriesExhausted, retrying
from .tier import DurableTier
from .transfer import MARKER, Progress, TransferError, marker_bytes, upload_file

#: The hidden folder of a promotion's coordination objects, under the checkpoint's prefix.
RANKS_DIR = ".ranks"
OPEN = f"{RANKS_DIR}/open.json"
ABANDON = f"{RANKS_DIR}/abandon.json"
#: The root-level object naming the promotion rank 0 works on (hidden: listings skip root-level objects).
POINTER = ".saverules.promoting"
#: Seconds between the first two looks at the tier while a rank waits for another; the pause then grows
#: by half at each look, up to :data:`POLL_MAX` (a thousand waiting ranks must not flood the object store).
POLL = 0.05
POLL_MAX = 2.0


def report_name(rank: int) -> str:
    return f"{RANKS_DIR}/rank-{rank:05d}.json"


def files_of(manifest: Mapping[str, Any], rank: int, world: int) -> dict[str, Mapping[str, Any]]:
    """The files of ``manifest`` that ``rank`` uploads: those it wrote; rank 0 also those of no live rank."""
    out: dict[str, Mapping[str, Any]] = {}
    for fname, entry in manifest["files"].items():
        owner = entry.get("rank", 0)
        if not isinstance(owner, int) or owner < 0 or owner >= world:
            owner = 0
        if owner == rank:
            out[fname] = entry
    return out


class ShardedUpload:
    """The upload strategy of one rank of a sharded job: ``upload(local_path, name, on_bytes)``.

    ``tier`` is the durable tier as this rank opened it (rank 0 holds its
    lock; the others open it without one and write only under the
    prefixes of promotions that rank 0 opened).  ``timeout`` bounds each
    wait for another rank (the commit timeout of the sharded store).
    ``run`` is the same on every rank of this job and different for every
    job (agreed by :func:`open_sharded`): the other ranks heed only rank 0's
    objects written in this run, never what an earlier job left.
    """

    def __init__(self, tier: DurableTier, rank: int, world: int, timeout: float, *, run: str = "",
                 poll: float = POLL, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not one of the {world} ranks")
        self.tier, self.rank, self.world, self.timeout = tier, rank, world, float(timeout)
        self.run = run
        self.poll, self.clock, self.sleep = poll, clock, sleep

    def _pauses(self) -> Callable[[], None]:
        """A fresh wait: each call sleeps half as long again as the one before, at most POLL_MAX seconds."""
        pause = [self.poll]

        def wait() -> None:
            self.sleep(pause[0])
            pause[0] = min(POLL_MAX, pause[0] * 1.5)

        return wait

    def __call__(self, local_path: Path, name: str, on_bytes: Progress | None = None) -> None:
        local_path = Path(local_path)
        manifest, raw = _local_manifest(local_path, name)
        try:
            if self.rank == 0:
                self._lead(local_path, name, manifest, raw, on_bytes)
            else:
                self._follow(local_path, name, manifest, on_bytes)
        except RetriesExhausted as exc:  # the tier is out of reach: say which rank found it so
            text = _reason(exc)
            if text.startswith(("the promotion of", f"rank {self.rank}:")):
                raise
            raise RetriesExhausted(f"saverules: rank {self.rank}: {text}", exc.attempts, exc.reason) from exc

    # -- the tier's objects ------------------------------------------------------------------

    def _path(self, name: str, rel: str) -> str:
        return f"{self.tier.prefix(name)}/{rel}"

    def _read(self, path: str) -> dict[str, Any] | None:
        """A small JSON object of the tier, or None when there is none (or it is not a JSON object)."""
        def cat() -> bytes | None:
            try:
                return bytes(self.tier.fs.cat_file(path))
            except FileNotFoundError:
                return None

        raw = retrying(f"read of {path}", cat, self.tier.retries)
        if raw is None:
            return None
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def _write(self, path: str, data: Mapping[str, Any]) -> None:
        body = json.dumps(data, sort_keys=True).encode("utf-8")

        def put() -> None:
            try:
                self.tier.fs.pipe_file(path, body)
            except FileNotFoundError:  # a file system (file://) has folders to make; object stores do not
                self.tier.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
                self.tier.fs.pipe_file(path, body)

        retrying(f"write of {path}", put, self.tier.retries)

    def _has(self, path: str) -> bool:
        def probe() -> bool:
            try:
                self.tier.fs.info(path)
            except FileNotFoundError:
                return False
            return True

        self.tier.fs.invalidate_cache(path)
        return bool(retrying(f"look-up of {path}", probe, self.tier.retries))

    def _objects(self, name: str, under: str | None = None) -> dict[str, int]:
        """{object name under the prefix: size} of checkpoint ``name`` (only those in folder ``under``), hidden
        ones included."""
        prefix = self.tier.prefix(name)
        self.tier.fs.invalidate_cache()
        where = prefix if under is None else f"{prefix}/{under}"

        def find() -> Any:
            try:
                return self.tier.fs.find(where, detail=True)
            except FileNotFoundError:
                return {}

        found = retrying(f"listing of {where}", find, self.tier.retries)
        base = prefix.rstrip("/") + "/"
        return {str(p)[len(base):]: int(e.get("size") or 0) for p, e in found.items() if str(p).startswith(base)}

    def _remove(self, name: str, keep: tuple[str, ...] = ()) -> None:
        """Remove the objects of ``name``'s prefix but ``keep``; the marker first (a cut removal leaves no
        checkpoint that looks committed)."""
        for rel in sorted(self._objects(name), key=lambda rel: (rel != MARKER, rel)):
            if rel in keep:
                continue
            path = self._path(name, rel)

            def rm(path: str = path) -> None:
                try:
                    self.tier.fs.rm_file(path)
                except FileNotFoundError:
                    pass

            retrying(f"removal of {path}", rm, self.tier.retries)

    def _upload_mine(self, local_path: Path, name: str, manifest: Mapping[str, Any],
                     on_bytes: Progress | None, stop: Callable[[], bool] | None = None) -> dict[str, Any]:
        """Upload this rank's files of ``manifest``; {file: entry} of what it uploaded."""
        prefix = self.tier.prefix(name)
        mine = files_of(manifest, self.rank, self.world)
        if mine:  # (the same call transfer.upload makes first)
            retrying(f"creation of {prefix}", lambda: self.tier.fs.makedirs(prefix, exist_ok=True),
                     self.tier.retries)
        for fname, entry in sorted(mine.items()):
            if stop is not None and stop():
                break
            upload_file(self.tier.fs, prefix, local_path, fname, entry, name, retries=self.tier.retries,
                        on_bytes=on_bytes)
        return {fname: {"size": int(entry["size"])} for fname, entry in mine.items()}

    # -- rank 0 ------------------------------------------------------------------------------

    def _lead(self, local_path: Path, name: str, manifest: Mapping[str, Any], raw: bytes,
              on_bytes: Progress | None) -> None:
        step = int(manifest["step"])
        self._remove(name)  # an earlier attempt of this name (committed or not): its marker goes first
        attempt = secrets.token_hex(8)
        self._write(self._path(name, OPEN), {"attempt": attempt, "name": name, "step": step, "world": self.world,
                                             "run": self.run})
        self._write(f"{self.tier.root}/{POINTER}", {"attempt": attempt, "name": name, "step": step, "run": self.run})
        try:
            self._upload_mine(local_path, name, manifest, on_bytes)
        except Exception as exc:
            self._abandon(name, attempt, 0, _reason(exc), transient=isinstance(exc, RetriesExhausted))
        self._wait_reports(name, attempt)
        self._seal(name, attempt, manifest, raw)

    def _wait_reports(self, name: str, attempt: str) -> None:
        waiting = set(range(1, self.world))
        deadline = self.clock() + self.timeout
        pause = self._pauses()
        while waiting:
            there = self._objects(name, RANKS_DIR)  # one listing a look, then only the new reports are read
            for r in sorted(waiting):
                if report_name(r) not in there:
                    continue
                rep = self._read(self._path(name, report_name(r)))
                if rep is None or rep.get("attempt") != attempt:
                    continue
                if not rep.get("ok"):
                    self._abandon(name, attempt, r, str(rep.get("error") or "its upload failed"),
                                  transient=rep.get("transient") is True)
                waiting.discard(r)
            if not waiting:
                return
            if self.clock() >= deadline:
                ranks = ", ".join(str(r) for r in sorted(waiting))
                self._abandon(name, attempt, min(waiting),
                              f"no report from rank(s) {ranks} within {self.timeout:g}s (the commit timeout): "
                              "that rank died, hung, or cannot reach the durable tier")
            pause()

    def _seal(self, name: str, attempt: str, manifest: Mapping[str, Any], raw: bytes) -> None:
        """Every file there with its size: the manifest, then the marker (the commit point), then no reports."""
        there = self._objects(name)
        for fname, entry in sorted(manifest["files"].items()):
            size = there.get(fname)
            if size != int(entry["size"]):
                owner = entry.get("rank", 0)
                what = "is missing" if size is None else f"has {size} bytes, the manifest says {entry['size']}"
                self._abandon(name, attempt, owner if isinstance(owner, int) else 0,
                              f"{fname} {what} after every rank reported its upload")
        prefix = self.tier.prefix(name)
        try:
            retrying(f"upload of {prefix}/{MANIFEST}", lambda: self.tier.fs.pipe_file(f"{prefix}/{MANIFEST}", raw),
                     self.tier.retries)
            marker = marker_bytes(name, int(manifest["step"]), raw)
            retrying(f"commit of {prefix}", lambda: self.tier.fs.pipe_file(f"{prefix}/{MARKER}", marker),
                     self.tier.retries)
        except Exception as exc:
            self._abandon(name, attempt, 0, _reason(exc), transient=isinstance(exc, RetriesExhausted))
        try:
            self._remove(name, keep=tuple(r for r in self._objects(name) if not r.startswith(RANKS_DIR + "/")))
            _drop_empty_folder(self.tier.fs, self._path(name, RANKS_DIR))
        except Exception as exc:  # committed: the reports are hidden, the next writer's clean-up leaves them
            log.warning("saverules: could not remove the rank reports of %s (%s)", prefix, _reason(exc))
        log.info("saverules: promoted %s to %s (%d ranks' files)", name, self.tier.url, self.world)

    def _abandon(self, name: str, attempt: str, rank: int, reason: str, transient: bool = False) -> None:
        """Rank 0: tell every rank, remove the promotion's objects, and raise naming ``rank``.

        ``transient``: the failure was a network operation's retries running
        out; every rank then raises :class:`RetriesExhausted`, so that each
        rank's promoter tries the whole promotion again (rank 0 opens a new
        attempt, the others serve it), as for a promotion of one process.
        """
        prefix = self.tier.prefix(name)
        try:
            self._write(self._path(name, ABANDON), {"attempt": attempt, "rank": rank, "reason": reason,
                                                     "transient": transient})
            self._remove(name, keep=(ABANDON,))
        except Exception as exc:  # the tier is unreachable: the other ranks time out; the prefix has no marker
            log.warning("saverules: could not abandon %s cleanly (%s); its leftovers are removed by the next "
                        "writer", prefix, _reason(exc))
        raise _failure(_abandoned(name, self.tier.url, rank, reason), reason, transient)

    # -- the other ranks -------------------------------------------------------------------

    def _follow(self, local_path: Path, name: str, manifest: Mapping[str, Any], on_bytes: Progress | None) -> None:
        step = int(manifest["step"])
        deadline = self.clock() + self.timeout
        served: set[str] = set()
        pause = self._pauses()
        while True:
            opened = self._read(self._path(name, OPEN))
            if opened is not None and opened.get("run") == self.run and isinstance(opened.get("attempt"), str):
                self._serve(local_path, name, manifest, opened["attempt"], on_bytes)
                return
            pointer = self._read(f"{self.tier.root}/{POINTER}")
            if (pointer is not None and pointer.get("run") == self.run and isinstance(pointer.get("step"), int)
                    and isinstance(pointer.get("name"), str)):
                other = pointer["name"]
                if other == name:  # rank 0 opened this promotion and already abandoned it (the open object is gone)
                    got = self._read(self._path(name, ABANDON))
                    if got is not None and got.get("attempt") == pointer.get("attempt"):
                        raise _told(got, name, self.tier.url)
                if pointer["step"] > step:
                    log.info("saverules: rank %d: rank 0 promotes %s, newer than %s, which it replaced; nothing "
                             "of %s to upload", self.rank, other, name, name)
                    return
                if other != name and pointer["step"] < step and other not in served:
                    served.add(other)
                    self._catch_up(local_path.parent / other, other, pointer.get("attempt"), on_bytes)
                    deadline = self.clock() + self.timeout
                    continue
            if self.clock() >= deadline:
                raise TransferError(
                    f"saverules: rank {self.rank} waited {self.timeout:g}s (the commit timeout) for rank 0 to start "
                    f"the promotion of {name} to {self.tier.url}; nothing of it was committed. Rank 0 may be "
                    "stuck on an earlier upload, or cannot reach the durable tier"
                )
            pause()

    def _catch_up(self, local_path: Path, name: str, attempt: Any, on_bytes: Progress | None) -> None:
        """Serve an older promotion rank 0 runs that this rank's promoter had replaced."""
        opened = self._read(self._path(name, OPEN))
        if opened is None or opened.get("attempt") != attempt or not isinstance(attempt, str):
            return  # already committed or abandoned
        if self._read(self._path(name, report_name(self.rank))) is not None:
            return
        log.info("saverules: rank %d: rank 0 promotes %s, which this rank's promoter had replaced; uploading "
                 "this rank's files of it first", self.rank, name)
        try:
            manifest, _ = _local_manifest(local_path, name)
        except TransferError as exc:
            self._report(name, attempt, None, _reason(exc))
            return
        try:
            self._serve(local_path, name, manifest, attempt, on_bytes)
        except (TransferError, RetriesExhausted) as exc:  # that promotion's outcome is rank 0's to report
            log.warning("saverules: rank %d: %s", self.rank, exc)

    def _report(self, name: str, attempt: str, files: Mapping[str, Any] | None, error: str | None,
                transient: bool = False) -> None:
        body: dict[str, Any] = {"attempt": attempt, "rank": self.rank, "ok": error is None}
        if error is None:
            body["files"] = dict(files or {})
        else:
            body["error"], body["transient"] = error, transient
        self._write(self._path(name, report_name(self.rank)), body)

    def _serve(self, local_path: Path, name: str, manifest: Mapping[str, Any], attempt: str,
               on_bytes: Progress | None) -> None:
        """Upload this rank's files of the promotion ``attempt``, report, and wait for its outcome.

        When rank 0 opens a new attempt of the same checkpoint meanwhile (its
        promoter tries again), this rank serves that one too.
        """
        next_attempt: str | None = attempt
        while next_attempt is not None:
            attempt = next_attempt

            def abandoned(attempt: str = attempt) -> bool:
                got = self._read(self._path(name, ABANDON))
                return got is not None and got.get("attempt") == attempt

            try:
                files = self._upload_mine(local_path, name, manifest, on_bytes, stop=abandoned)
            except Exception as exc:
                reason, transient = _reason(exc), isinstance(exc, RetriesExhausted)
                try:
                    self._report(name, attempt, None, reason, transient)
                except Exception as rexc:  # rank 0 times out waiting for this rank's report
                    log.warning("saverules: rank %d could not report its failure (%s)", self.rank, _reason(rexc))
                raise _failure(_abandoned(name, self.tier.url, self.rank, reason), reason, transient) from None
            self._report(name, attempt, files, None)
            next_attempt = self._outcome(name, attempt)

    def _outcome(self, name: str, attempt: str) -> str | None:
        """Wait for rank 0's commit marker (None) or a new attempt of the same promotion (its token); raise what
        rank 0's abandon object says.  At most twice the commit timeout."""
        deadline = self.clock() + 2 * self.timeout
        pause = self._pauses()
        while True:
            if self._has(self._path(name, MARKER)):
                return None
            got = self._read(self._path(name, ABANDON))
            if got is not None and got.get("attempt") == attempt:
                raise _told(got, name, self.tier.url)
            opened = self._read(self._path(name, OPEN))
            if opened is not None and isinstance(opened.get("attempt"), str) and opened["attempt"] != attempt:
                return str(opened["attempt"])
            if self.clock() >= deadline:
                raise TransferError(
                    f"saverules: rank {self.rank} waited {2 * self.timeout:g}s for rank 0 to commit the promotion "
                    f"of {name} to {self.tier.url}; it did not (rank 0 died, hung, or lost the tier)"
                )
            pause()


def open_sharded(ranks: Any, url: str, options: Mapping[str, Any] | None = None, *, writer: bool | None = None,
                 lease: float | None = None, retries: Retries = DEFAULT) -> tuple[DurableTier, ShardedUpload]:
    """Every rank of a sharded store, when its Checkpointer is made: the tier and this rank's upload strategy.

    Rank 0 opens the tier as its writer (``writer``, default: whether this
    is rank 0; False for a read-only Checkpointer): the lock, the clean-up
    of leftovers; an unreachable tier fails there.  The other ranks open it
    without the lock.  ``ranks`` is the sharded store's
    :class:`~saverules.store.ranks.Ranks`: one small all-reduce (in the
    training thread, at construction, as the store's own collectives) makes
    every rank raise together when rank 0 could not open the tier, instead of
    the others waiting for it at their first save.
    """
    mine: BaseException | None = None
    tier: DurableTier | None = None
    try:
        tier = DurableTier(url, options, writer=ranks.rank == 0 if writer is None else writer, lease=lease,
                           retries=retries)
    except CheckpointError as exc:
        mine = exc
    # one all-gather: every rank's error (or None), and rank 0's name for this run
    told = ranks.all_gather((None if mine is None else _reason(mine), secrets.token_hex(8)),
                            f"open the durable tier {url}")
    if mine is not None:
        raise mine
    failed = [(r, note) for r, (note, _) in enumerate(told) if note is not None]
    if failed or tier is None:
        if tier is not None:
            tier.close()
        named = "; ".join(f"rank {r}: {note}" for r, note in failed)
        raise CheckpointError(f"saverules: the durable tier {url} could not be opened on every rank ({named}); "
                              "no rank goes on")
    return tier, ShardedUpload(tier, ranks.rank, ranks.size, ranks.timeout, run=str(told[0][1]))


def sharded_tier(ranks: Any, url: str, options: Mapping[str, Any] | None, retries: Retries, *,
                 writer: bool) -> tuple[Callable[[], DurableTier], Callable[[DurableTier], ShardedUpload]]:
    """What a sharded store's :class:`~saverules.store.remote.committer.TieredCommitter` is given: the opener of
    the tier (:func:`open_sharded`, run by every rank when the Checkpointer is made) and the uploader, which
    makes this rank's upload strategy (its :class:`ShardedUpload`) once the tier is open."""

    made: list[ShardedUpload] = []

    def opener() -> DurableTier:
        tier, upload = open_sharded(ranks, url, options, writer=writer, retries=retries)
        made.append(upload)
        return tier

    def uploader(tier: DurableTier) -> ShardedUpload:
        upload = made[-1]  # the opener ran first (TieredCommitter.open), on this same tier
        if upload.tier is not tier:
            raise CheckpointError(f"saverules: the durable tier {url} of rank {ranks.rank} was opened twice")
        return upload

    return opener, uploader


def _drop_empty_folder(fs: Any, path: str) -> None:
    """On a local or shared file system (file://), the folder the reports were in (object stores have none)."""
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(fs, LocalFileSystem):
        try:
            os.rmdir(path)
        except OSError:  # not there, or not empty: left as it is
            pass


def _local_manifest(local_path: Path, name: str) -> tuple[dict[str, Any], bytes]:
    try:
        return read_manifest(local_path), (local_path / MANIFEST).read_bytes()
    except (Invalid, OSError) as exc:
        raise TransferError(f"saverules: {local_path} is not a committed checkpoint ({exc}); nothing of {name} "
                            "was uploaded") from None


def _reason(exc: BaseException) -> str:
    text = str(exc).replace("saverules: ", "", 1) or type(exc).__name__
    return text if len(text) <= 400 else text[:397] + "..."


def _failure(message: str, reason: str, transient: bool) -> TransferError | RetriesExhausted:
    """The error every rank raises for an abandoned promotion: retried as a whole by the promoter when the
    cause was a network operation whose retries ran out, never when it was a fault waiting cannot fix."""
    if transient:
        return RetriesExhausted(message, 1, reason)
    return TransferError(message)


def _told(got: Mapping[str, Any], name: str, url: str) -> TransferError | RetriesExhausted:
    """The error an abandon object ``got`` (written by rank 0) tells the other ranks to raise."""
    rank = got.get("rank")
    reason = str(got.get("reason") or "no reason given")
    return _failure(_abandoned(name, url, rank if isinstance(rank, int) else 0, reason), reason,
                    got.get("transient") is True)


def _abandoned(name: str, url: str, rank: int, reason: str) -> str:
    return (f"saverules: the promotion of {name} to {url} was abandoned on every rank: rank {rank}: {reason}. "
            "Nothing of it is visible on the durable tier; the local checkpoint stays, and a later promotion "
            "tries again")


__all__ = ["ABANDON", "OPEN", "POINTER", "RANKS_DIR", "ShardedTieredCommitter", "ShardedUpload", "files_of",
           "open_sharded", "report_name", "sharded_tier"]


class ShardedTieredCommitter(AgreedTieredCommitter):
    """The :class:`~saverules.store.remote.committer.AgreedTieredCommitter` of a sharded store: a resume is a
    collective of every rank, rank 0 alone downloads, and a broadcast tells every rank what it fetched."""
