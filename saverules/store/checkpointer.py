"""The façade: :class:`Checkpointer` asks the policy on every step and, when it says save, runs a save.

A save is a straight line through the modules of the store:

decide (the policy's decider) -> :mod:`~saverules.store.snapshot` (async: copy the state)
-> :mod:`~saverules.store.formats` (encode) -> :mod:`~saverules.store.writer` (write and digest)
-> :mod:`~saverules.store.commit` (atomic rename) -> :mod:`~saverules.store.verify` (re-read, before the
manifest goes in) -> :mod:`~saverules.store.retain`.

A resume walks :func:`~saverules.store.verify.newest_good`, decodes with the
format the manifest names and hands the state to :mod:`~saverules.store.restore`.
"""
from __future__ import annotations

import atexit
import dataclasses
import errno as _errno
import os
import sys
import threading
import time as _time
import weakref
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Mapping, MutableMapping, Optional, Tuple, Union

import torch

from ..progress import Decision, Progress
from . import commit, formats, lock, resume, retain, sharded
from .errors import (
    CheckpointError,
    CheckpointWriteError,
    StateTypeError,
    log,
    type_name,
    warn,
    write_error,
)
from .fs import fs
from .manifest import CheckpointInfo, info_from_manifest, new_manifest, progress_of
from .policyfile import write_policy_file
from .ranks import RankFailure, Ranks, timeout_from
from .restore import restore
from .snapshot import Pool, Snapshot
from .state import Payload, capture
from .verify import VerifyCache, check_written, scan

VERIFY_CHOICES = ("hash", "device", "load", "none")
ON_ERROR_CHOICES = ("raise", "warn")

_LIVE: "weakref.WeakSet[Checkpointer]" = weakref.WeakSet()


def _close_all_at_exit() -> None:
    for ckpt in list(_LIVE):
        try:
            ckpt._finish_at_exit()
        except BaseException as exc:  # pragma: no cover - reported, never raised at exit
            print(f"saverules: a checkpoint write failed: {exc}", file=sys.stderr)


atexit.register(_close_all_at_exit)


def _needs_digest_pass(info: CheckpointInfo) -> bool:
    """Whether a checkpoint's digests must be checked before it is decoded (not when its reader checks them)."""
    try:
        return not formats.get(info.format).digests_while_decoding
    except CheckpointError:
        return True


@dataclasses.dataclass
class _Job:
    """One save between the training thread and the writer."""

    name: str
    step: int
    manifest: Dict[str, Any]
    payload: Optional[Payload]
    snapshot: Optional[Snapshot] = None
    tmp: Optional[Path] = None  # a sharded save's temporary directory, agreed by every rank


class Checkpointer:
    """Decides when to save (from the policy) and saves so that no save is ever half-lost.

    Parameters
    ----------
    policy:
        A :class:`saverules.Policy` or the path of a policy TOML file.
    dir:
        The store's directory; overrides ``[storage].dir``.  Relative paths
        are taken from the current directory at construction.
    async_save:
        Copy the state to CPU memory in the training thread and write it from
        one background thread (at most one write in flight).
    verify:
        What is checked after writing, before the checkpoint is committed:
        ``"hash"`` (default): every file's size and the format's index (a
        format without one: every file re-read and its digest compared);
        ``"device"``: every file re-read from the device and its digest
        compared; ``"load"``: that, and the checkpoint decoded back;
        ``"none"``: nothing.  Every mode records the digest of the bytes
        written, and a resume checks it (docs/checkpoints.md).
    on_error:
        ``"raise"`` (default) turns a failed save into an exception;
        ``"warn"`` emits a :class:`CheckpointWarning` and training goes on
        (the next decision to save tries again).
    total_steps:
        Passed to ``policy.compile``; shares of the run ("5%") need it unless
        ``[run].total_steps`` or the Progress carries it.
    run_name:
        The ``{run}`` placeholder of ``[storage].name``.
    sync:
        Under DDP (an initialised process group with more than one rank) the
        decider is wrapped in :class:`saverules.distributed.SyncedDecider`;
        ``sync`` holds its keyword options, e.g. ``{"sync_seconds": 2.0}`` or
        ``{"sync_signals": True}``.  Ignored in a single process.
    commit_timeout:
        ``[storage].format = "dcp"`` only: seconds each collective of a
        sharded save or load waits for the other ranks before it fails with
        :class:`~saverules.store.ranks.RankFailure` (default 600, or
        ``$SAVERULES_COMMIT_TIMEOUT``).  See docs/distributed.md.
    read_only:
        Only read the store (``latest``, ``list``, ``load_latest``): no
        directory is created, nothing is cleaned up or written, and no lock is
        taken, so it works on a store that another process writes right now.
        ``step`` still decides; ``save`` and a decision to save raise.

    A writer (the only process, or rank 0 under DDP) takes the store's lock
    when it is made: a second writer process on the same directory fails
    with :class:`~saverules.store.errors.StoreLockedError`, which names the
    holder.  :meth:`close` lets go of it.
    """

    def __init__(
        self,
        policy: Any,
        dir: Union[str, os.PathLike, None] = None,
        *,
        async_save: bool = False,
        verify: str = "hash",
        on_error: str = "raise",
        total_steps: Optional[int] = None,
        run_name: str = "run",
        sync: Optional[Mapping[str, Any]] = None,
        commit_timeout: Optional[float] = None,
        read_only: bool = False,
    ) -> None:
        import saverules

        if isinstance(policy, (str, os.PathLike)):
            policy = saverules.load(policy)
        elif not (hasattr(policy, "compile") and hasattr(policy, "storage") and hasattr(policy, "retain")):
            raise ValueError(
                f"policy must be a saverules.Policy or the path of a policy TOML file, got {type_name(policy)}"
            )
        if dir is not None and not isinstance(dir, (str, os.PathLike)):
            raise ValueError(f"dir must be a path or None, got {type_name(dir)}")
        if dir is not None and not os.fspath(dir):
            raise ValueError("dir must not be empty")
        if not isinstance(read_only, bool):
            raise ValueError(f"read_only must be True or False, got {read_only!r}")
        if not isinstance(async_save, bool):
            raise ValueError(f"async_save must be True or False, got {async_save!r}")
        if verify not in VERIFY_CHOICES:
            raise ValueError(f"verify must be one of {', '.join(map(repr, VERIFY_CHOICES))}, got {verify!r}")
        if on_error not in ON_ERROR_CHOICES:
            raise ValueError(f"on_error must be one of {', '.join(map(repr, ON_ERROR_CHOICES))}, got {on_error!r}")
        if not isinstance(run_name, str) or not run_name or any(c in run_name for c in "/\\\0"):
            raise ValueError(f"run_name must be a non-empty string without path separators, got {run_name!r}")
        fmt = policy.storage.format
        if fmt not in formats.names():
            raise ValueError(
                f"[storage].format must be {' or '.join(map(repr, formats.names()))}, got {fmt!r}"
            )
        self._format = formats.get(fmt)
        self._format.check_available()

        self.policy = policy
        self.dir = Path(os.path.abspath(os.fspath(dir if dir is not None else policy.storage.dir)))
        self.async_save = async_save
        self.verify = verify
        self.on_error = on_error
        self.run_name = run_name
        self.format = fmt
        self.read_only = read_only

        self.rank, self.world_size = 0, 1
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        if sync is not None and not isinstance(sync, Mapping):
            raise ValueError(f"sync must be a mapping of SyncedDecider options or None, got {type_name(sync)}")
        decider = policy.compile(total_steps)
        if self.world_size > 1:
            from saverules.distributed import SyncedDecider

            # Under DDP every rank must take the same decision: see docs/distributed.md.
            # ``sync`` passes SyncedDecider's options (sync_seconds, max_interval, sync_signals, ...).
            decider = SyncedDecider(decider, **dict(sync or {}))
        self.decider = decider
        # A sharded format: every rank writes, rank 0 commits (saverules.store.sharded). Creating the
        # ranks' group is a collective, like the construction of the Checkpointer on every rank.
        self._ranks = None
        if getattr(self._format, "sharded", False):
            self._ranks = Ranks(timeout_from(commit_timeout))
        elif commit_timeout is not None:
            timeout_from(commit_timeout)  # checked all the same: a typo should not wait for a format change

        self._clock_offset = 0.0
        self._clock_t0 = _time.monotonic()
        self._cache = VerifyCache()
        self._warned: set = set()
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None
        self._cost: Optional[Tuple[float, float]] = None  # (stall, write) of a finished asynchronous write
        self._pool: Pool = {}
        self._closed = False
        self._store_lock: Optional[lock.StoreLock] = None
        self._release = None

        _refuse_a_file(self.dir)
        if self.is_writer:
            try:
                self._open_store()
            except CheckpointWriteError as err:
                if on_error == "raise":
                    raise
                warn(str(err))
        _LIVE.add(self)

    def _open_store(self) -> None:
        """Create the directory, take the lock, clean up after an interrupted writer, record the policy."""
        try:
            fs.makedirs(str(self.dir))
        except OSError as exc:
            _refuse_a_file(self.dir)
            raise write_error(exc, None, str(self.dir), "create the checkpoint directory") from exc
        try:
            held = lock.acquire(str(self.dir))
        except OSError as exc:
            raise write_error(exc, None, os.path.join(self.dir, lock.LOCK_FILE), "create the store's lock file") from exc
        self._store_lock = held
        self._release = weakref.finalize(self, held.release)
        self._release.atexit = False  # at exit the process's end drops it, after a pending write has finished
        if held.previous:
            log.info("took over the lock of %s left by %s", self.dir, lock.describe_holder(held.previous))
        commit.cleanup(self.dir)
        write_policy_file(self.dir, self.policy)

    # -- small public helpers ----------------------------------------------------

    @property
    def is_writer(self) -> bool:
        """True on the process that writes (rank 0, or the only process), unless made ``read_only``."""
        return self.rank == 0 and not self.read_only

    def clock(self) -> float:
        """Seconds of training so far, continuous across resumes: pass it as ``Progress.time``."""
        return self._clock_offset + (_time.monotonic() - self._clock_t0)

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            self.close()
        except Exception as err:  # do not hide the exception already on its way
            warn(f"saverules: {err}")

    def __repr__(self) -> str:
        return (
            f"Checkpointer(dir={str(self.dir)!r}, format={self.format!r}, async_save={self.async_save}, "
            f"verify={self.verify!r}, on_error={self.on_error!r})"
        )

    # -- deciding and saving ---------------------------------------------------------

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise CheckpointError(
                f"saverules: {what}() on a closed Checkpointer (store {self.dir}): nothing more can be saved "
                "through it. Make a new Checkpointer (load_latest resumes it) to go on saving"
            )

    def step(self, progress: Progress, state: Mapping[str, Any]) -> Decision:
        """Ask the policy about this step; save when it says so. Returns the decision."""
        self._check_open("step")
        self._collect(block=False)
        decision = self.decider(progress)
        if decision.save:
            self._save(progress, state, tuple(decision.reasons))
        return decision

    def save(self, progress: Progress, state: Mapping[str, Any], reason: str = "manual") -> Decision:
        """Save now, whatever the policy says; the decider is told (time rules measure from here)."""
        if not isinstance(reason, str) or not reason:
            raise ValueError(f"reason must be a non-empty string, got {reason!r}")
        self._check_open("save")
        self._collect(block=False)
        time_ = progress.time if progress.time is not None else self.clock()
        self.decider.note_save(progress.step, time_)
        self._save(progress, state, (reason,))
        return Decision(True, (reason,))

    def wait(self) -> None:
        """Block until the write in flight (if any) is committed; report its failure."""
        self._collect(block=True)

    def close(self) -> None:
        """Wait for pending writes, report a failure, and let go of the store's lock.

        After ``close`` the checkpointer still reads (``latest``, ``list``,
        ``load_latest``) but ``step`` and ``save`` raise.  Closing twice is fine.
        """
        if self._closed:
            return
        try:
            self._collect(block=True)
        finally:
            self._closed = True
            if self._release is not None:
                self._release()
            _LIVE.discard(self)

    def _finish_at_exit(self) -> None:
        self._join()
        err, self._error = self._error, None
        if err is not None:
            print(f"saverules: the last checkpoint write failed: {err}", file=sys.stderr)

    def _join(self) -> None:
        thread = self._thread
        if thread is not None:
            thread.join()
            self._thread = None

    def _collect(self, block: bool) -> None:
        thread = self._thread
        if thread is not None:
            if not block and thread.is_alive():
                return
            self._join()
        cost, self._cost = self._cost, None  # the finished asynchronous write's cost (see _save)
        if cost is not None:
            self.decider.note_cost(*cost)
        err, self._error = self._error, None
        if err is not None:
            self._report(err)

    def _report(self, err: BaseException) -> None:
        if self.on_error == "raise" or isinstance(err, RankFailure) or not isinstance(err, (CheckpointError, OSError)):
            raise err
        warn(f"{err} (on_error='warn': training continues; the next save will try again)")

    @property
    def _writes(self) -> bool:
        """This process writes files: rank 0, or every rank of a sharded format."""
        return (self.is_writer or self._ranks is not None) and not self.read_only

    def _save(self, progress: Progress, state: Mapping[str, Any], reasons: Tuple[str, ...]) -> None:
        if self.read_only:
            raise CheckpointError(
                f"saverules: this Checkpointer reads {self.dir} only (read_only=True) and cannot save step "
                f"{progress.step}; make one without read_only to write"
            )
        if not self._writes:
            return
        self._collect(block=True)  # at most one write in flight
        if self.is_writer and self._store_lock is None:  # the directory could not be made at construction
            try:
                self._open_store()
            except CheckpointWriteError as err:
                self._report(err)
                return
        # Save cost, for rules that plan with it (adaptive): the training thread's stall
        # (the whole save when synchronous, the snapshot when asynchronous) and the wall
        # time of the whole write, reported to the decider once the write is committed
        # (Decider.note_cost; for an asynchronous write, by _collect).
        started = _time.perf_counter()
        job = self._prepare(progress, state, reasons)
        if self.async_save:
            stall = _time.perf_counter() - started
            thread = threading.Thread(target=self._write_timed, args=(job, started, stall), name="saverules-writer")
            self._thread = thread
            thread.start()
        else:
            try:
                self._run(job)
            except (CheckpointError, OSError) as err:
                self._report(err)
            else:
                elapsed = _time.perf_counter() - started
                self.decider.note_cost(elapsed, elapsed)

    def _write_timed(self, job: _Job, started: float, stall: float) -> None:
        """The background write; its cost is picked up by _collect in the training thread."""
        self._run_background(job)
        if self._error is None:
            self._cost = (stall, _time.perf_counter() - started)

    def _prepare(self, progress: Progress, state: Mapping[str, Any], reasons: Tuple[str, ...]) -> _Job:
        """In the training thread: check the state (and copy it, for an async save); name the checkpoint."""
        if not isinstance(state, Mapping):
            raise StateTypeError(f"state must be a dict of names to objects and values, got {type_name(state)}")
        if not isinstance(progress, Progress):
            raise TypeError(f"progress must be a saverules.Progress, got {type_name(progress)}")
        metrics = None
        if progress.metrics is not None:
            metrics = {}
            for k, v in progress.metrics.items():
                try:
                    metrics[str(k)] = float(v)
                except (TypeError, ValueError):
                    raise StateTypeError(f"Progress.metrics[{k!r}] is not a number: {v!r}") from None
        snap = Snapshot(self._pool) if self.async_save else None
        if snap is not None:
            self._pool = {}
        clock = float(progress.time) if progress.time is not None else self.clock()
        utc = datetime.now(timezone.utc)
        name = self.policy.storage.render_name(step=progress.step, epoch=progress.epoch, time=utc, run=self.run_name)
        tmp = None
        if self._ranks is not None:
            tmp, name, payload = sharded.start(self._ranks, self.dir, name, progress.step, lambda: self._format.capture(
                state, progress.step, self.decider.state_dict(), clock, snap))
        else:
            payload = capture(state, progress.step, self.decider.state_dict(), clock, snap)
        manifest = new_manifest(name=name, progress=progress, clock=clock, utc=utc, reasons=reasons,
                                metrics=metrics, policy_digest=self.policy.digest, storage_format=self.format,
                                world_size=self.world_size)
        return _Job(name=name, step=int(progress.step), manifest=manifest, payload=payload, snapshot=snap, tmp=tmp)

    def _run_background(self, job: _Job) -> None:
        try:
            self._run(job)
        except BaseException as err:
            self._error = err
        finally:
            if job.snapshot is not None:
                job.payload = None
                snapshot, job.snapshot = job.snapshot, None
                self._pool = snapshot.release()

    def _run(self, job: _Job) -> None:
        """In the writer: encode, write and digest, verify, commit; then retention."""
        payload, fmt = job.payload, self._format

        def check(tmp: Path, files: Mapping[str, Any], metadata) -> None:
            check_written(tmp, job.step, files, fmt, self.verify, metadata)

        if self._ranks is not None:  # rank 0 settles (cache, retention) before every rank returns
            sharded.commit(self._ranks, fmt, self.dir, job.tmp, job.name, job.step, job.manifest, payload,
                           self.verify, settle=lambda path, manifest: self._settle(job, path, manifest))
            return
        path, manifest = commit.commit(self.dir, job.name, job.step, job.manifest,
                                       encode=lambda out: fmt.encode(payload, out),
                                       check=check if self.verify != "none" else None)
        self._settle(job, path, manifest)

    def _settle(self, job: _Job, path: Path, manifest: Mapping[str, Any]) -> None:
        """After a commit, on the writer: remember the checkpoint as verified, then retention."""
        verified = True if self.verify != "none" else None
        if verified:
            self._cache.put(path, info_from_manifest(path, self.dir, manifest, True, None))
        else:
            self._cache.forget(path)
        log.info("saved checkpoint %s (step %d, %s)", path, job.step, ", ".join(job.manifest["reasons"]))
        try:
            retain.retain(self.dir, path, self.policy, self._cache, self.verify != "none", self._warned)
        except Exception as exc:  # retention must never fail a save that was committed
            warn(f"saverules: retention after saving {path} failed: {exc}")

    # -- reading -------------------------------------------------------------------------

    def list(self) -> List[CheckpointInfo]:
        """Every checkpoint in the store, oldest first, each re-hashed (results are cached)."""
        if self._writes:
            self._collect(block=True)
        return scan(self.dir, verify=True, _cache=self._cache)

    def latest(self, if_none_valid: str = "raise") -> Optional[CheckpointInfo]:
        """The newest checkpoint that verifies, or None when the store holds none.

        Damaged newer ones are skipped with a warning; an unsafe one raises
        :class:`UnsafeCheckpointError`, and a store whose checkpoints are all
        unusable raises :class:`NoValidCheckpointError` (None, with a warning,
        with ``if_none_valid="start_fresh"``), exactly as :meth:`load_latest`.
        """
        if self._writes:
            self._collect(block=True)
        found = resume.pick(self.dir, self._cache, self._warn_skip, if_none_valid)
        return found[0] if found is not None else None

    def _warn_skip(self, info: CheckpointInfo) -> None:
        key = (str(info.path), info.error)
        if key in self._warned:
            return
        self._warned.add(key)
        warn(f"saverules: skipping checkpoint {info.path}: {info.error}; falling back to an older checkpoint")

    def load_latest(self, state: MutableMapping[str, Any], map_location: Any = "cpu",
                    if_none_valid: str = "raise", *, mmap: bool = False) -> Optional[Progress]:
        """Restore the newest good checkpoint into ``state`` and the decider.

        Objects with ``load_state_dict`` get it called; plain values are
        written back into ``state``.  Returns the Progress of the saved step
        (continue with ``step + 1``), or None when the store holds no
        checkpoint.  Damaged checkpoints are skipped with a warning.  When the
        store holds checkpoints but none can be resumed,
        :class:`NoValidCheckpointError` lists each one and why; pass
        ``if_none_valid="start_fresh"`` to get None (and a warning) instead.
        An unsafe newest checkpoint raises :class:`UnsafeCheckpointError`.
        ``mmap=True`` maps the checkpoint's files (copy-on-write) instead of
        reading them into fresh memory, as ``torch.load(mmap=True)`` does.
        """
        resume.check_if_none_valid(if_none_valid)
        if not isinstance(mmap, bool):
            raise ValueError(f"mmap must be True or False, got {mmap!r}")
        if not isinstance(state, MutableMapping):
            raise TypeError(
                f"state must be a mutable mapping (a dict) of names to objects and values, so that plain values "
                f"can be written back; got {type_name(state)}"
            )
        if self._writes:
            self._collect(block=True)
        if self._ranks is not None:  # every rank takes part; rank 0 chooses (saverules.store.sharded)
            got = sharded.load_latest(self._ranks, self.dir, self._cache, self._warn_skip, state, map_location,
                                     if_none_valid)
            if got is None:
                return None
            info, payload, restored = got
            self._clock_offset = restore(info, payload, sharded.Without(state, restored), self.decider,
                                         self.policy.digest)
            self._clock_t0 = _time.monotonic()
            return progress_of(info, self._clock_offset)
        found = resume.pick(self.dir, self._cache, self._warn_skip, if_none_valid,
                            decode=lambda info: formats.read(info, map_location, mmap=mmap),
                            deep=_needs_digest_pass)
        if found is None:
            return None
        info, payload = found
        if info.verified is None:  # its reader checked every digest while reading
            self._cache.put(info.path, dataclasses.replace(info, verified=True))
        self._clock_offset = restore(info, payload, state, self.decider, self.policy.digest)
        self._clock_t0 = _time.monotonic()
        return progress_of(info, self._clock_offset)


def _refuse_a_file(directory: Path) -> None:
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
