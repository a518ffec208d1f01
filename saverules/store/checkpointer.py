"""The façade: :class:`Checkpointer` asks the policy on every step and, when it says save, runs a save.

Its arguments are checked, and its parts (decider, committer) built, when it
is made (:mod:`~saverules.store.parts`); a writer opens
its store (directory, lock, cleanup, ``policy.toml``) through
:mod:`~saverules.store.opening`.  A save is a straight line through the
modules of the store:

decide (the policy's decider) -> :mod:`~saverules.store.snapshot` (async: copy the state)
-> :mod:`~saverules.store.formats` (encode) -> :mod:`~saverules.store.writer` (write and digest)
-> :mod:`~saverules.store.commit` (atomic rename) -> :mod:`~saverules.store.verify` (re-read, before the
manifest goes in) -> :mod:`~saverules.store.retain`.
An asynchronous save runs the steps after the snapshot on the writer thread
of :mod:`~saverules.store.async_writes`, which first copies what only the
optimizers' ``step()`` changes (:mod:`~saverules.store.staging`).

A resume is :func:`saverules.store.resume.load_latest` (the newest checkpoint
that verifies, decoded with the format its manifest names; a sharded store:
:func:`saverules.store.sharded.coordinate.load_latest`), and the state goes back through
:mod:`~saverules.store.restore`.

With a durable tier (``[durable]`` or ``durable=URL``, docs/tiers.md) the
committer is a :class:`~saverules.store.remote.committer.TieredCommitter`
around the local one: a save the durable rules decide is committed locally and
then promoted (uploaded in the background by
:class:`~saverules.store.remote.promote.Promoter`), local retention spares
what is not yet durable, and a resume looks at both tiers.  Without one the
same committer only passes through, so this module never asks which it holds.
"""
from __future__ import annotations

import atexit
import builtins
import os
import sys
import time as _time
import weakref
from collections.abc import Mapping, MutableMapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..engine.progress import Decision, Progress
from ..engine.tiers import merge_saves
from . import lock, ranks, resume, space
from .async_writes import AsyncWrites
from .errors import CheckpointError, CheckpointWriteError, StateTooDeepError, StateTypeError, log, type_name, warn
from .manifest import CheckpointInfo, info_from_manifest, metrics_of, new_manifest, progress_of
from .opening import open_store, refuse_a_file
from .parts import (
    check_arguments,
    committer_for,
    durable_arguments,
    load_policy,
    make_decider,
    storage_format,
    tiered,
)
from .ranks import RankFailure
from .remote.retry import Retries
from .restore import restore
from .retain import Retainer
from .snapshot import Job, Snapshot
from .state import capture
from .verify import VerifyCache, scan

_LIVE: weakref.WeakSet[Checkpointer] = weakref.WeakSet()


def _close_all_at_exit() -> None:
    for ckpt in list(_LIVE):
        try:
            ckpt._finish_at_exit()
        except BaseException as exc:  # pragma: no cover - reported, never raised at exit
            print(f"saverules: a checkpoint write failed: {exc}", file=sys.stderr)


atexit.register(_close_all_at_exit)


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
        Write from one background thread (at most one write in flight).  The
        state is copied to CPU memory before ``save`` returns, except the
        parameters and state of the optimizers in ``state``, which the writer
        copies while training goes on; each such optimizer's next ``step()``
        waits until that copy is done (:mod:`~saverules.store.staging`).
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
    durable:
        The durable tier's URL (``s3://bucket/run``, ``gs://...``,
        ``file://...``, ``memory://...`` or a plain path); overrides
        ``[durable].dir`` as ``dir`` overrides ``[storage].dir``.  The policy
        must have a ``[durable]`` table (its rules decide what is promoted).
        See docs/tiers.md.
    durable_options:
        fsspec storage options of the durable tier; override
        ``[durable].options``.  Never credentials: those come from the
        environment (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``, ...).
    durable_retries:
        How each network operation on the durable tier, and each promotion
        as a whole, is retried (:class:`saverules.store.remote.retry.Retries`;
        default: 6 attempts, 0.5 s doubling to 8 s, for an operation; 3
        attempts, 2 s doubling to 30 s, for a promotion).

    With a durable tier, the writer opens it when the Checkpointer is made
    (its lock; an unreachable tier is a :class:`CheckpointError` at once), a
    save the durable rules decide (or a signal save) is committed locally and
    then uploaded in the background, one upload at a time; a failed upload
    is reported at the next ``step()`` as ``on_error`` says; ``close(timeout)``
    waits for the uploads and raises
    :class:`~saverules.store.errors.DurableError` when the last one (the final
    step's) did not reach the durable tier.  ``load_latest`` resumes from
    the newest checkpoint of either tier (:attr:`resumed_from` says which).

    A writer (the only process, or rank 0 under DDP) takes the store's lock
    when it is made: a second writer process on the same directory fails
    with :class:`~saverules.store.errors.StoreLockedError`, which names the
    holder.  :meth:`close` lets go of it.
    """

    def __init__(
        self,
        policy: Any,
        dir: str | os.PathLike | None = None,
        *,
        async_save: bool = False,
        verify: str = "hash",
        on_error: str = "raise",
        total_steps: int | None = None,
        run_name: str = "run",
        sync: Mapping[str, Any] | None = None,
        commit_timeout: float | None = None,
        read_only: bool = False,
        durable: str | os.PathLike | None = None,
        durable_options: Mapping[str, Any] | None = None,
        durable_retries: Retries | None = None,
    ) -> None:
        policy = load_policy(policy)
        check_arguments(dir=dir, read_only=read_only, async_save=async_save, verify=verify,
                                on_error=on_error, run_name=run_name)
        durable_url, durable_opts = durable_arguments(policy, durable, durable_options, durable_retries)
        self._format = storage_format(policy)

        self.policy = policy
        self.dir = Path(os.path.abspath(os.fspath(dir if dir is not None else policy.storage.dir)))
        self.async_save = async_save
        self.verify = verify
        self.on_error = on_error
        self.run_name = run_name
        self.format = policy.storage.format
        self.read_only = read_only

        self.rank, self.world_size = ranks.process_rank()
        self.decider = make_decider(policy, total_steps, self.world_size, sync)
        inner = committer_for(self._format, self.dir, verify, commit_timeout, writes=self.is_writer,
                           read_only=read_only)
        self._committer = tiered(inner, self.dir, policy, durable_url, durable_opts, durable_retries,
                                 lock=self.is_writer, downloads=not read_only, released=_weak(self._sweep),
                                 world_size=self.world_size, commit_timeout=commit_timeout)

        self._clock_offset = 0.0
        self._clock_t0 = _time.monotonic()
        self._cache = VerifyCache()
        self._warned: set = set()
        self._retainer = Retainer(self.dir, policy, self._cache, verify != "none", self._warned,
                                  protected=self._committer.protected)
        self._async = AsyncWrites()  # the writer thread, copy buffers and write in flight of async saves
        weakref.finalize(self, self._async.writer.stop).atexit = False  # at exit: _finish_at_exit
        self._closed = False
        self._store_lock: lock.StoreLock | None = None
        self._release: weakref.finalize | None = None

        refuse_a_file(self.dir)
        if self.is_writer:
            try:
                self._open_store()
            except CheckpointWriteError as err:
                if on_error == "raise":
                    raise
                warn(str(err))
        try:
            self._committer.open()  # the durable tier: its lock; unreachable is an error at once
        except BaseException:
            if self._release is not None:
                self._release()
            raise
        _LIVE.add(self)

    def _open_store(self) -> None:
        """Open the store to write (saverules.store.opening); the lock is held until :meth:`close`."""
        open_store(self.dir, self.policy, self._hold, self._committer.cleanup)

    def _hold(self, held: lock.StoreLock) -> None:
        self._store_lock = held
        self._release = weakref.finalize(self, held.release)
        self._release.atexit = False  # at exit the process's end drops it, after a pending write has finished

    # -- small public helpers ----------------------------------------------------

    @property
    def durable(self) -> Any:
        """The durable tier (a :class:`~saverules.store.remote.DurableTier`), or None without one."""
        return self._committer.tier

    @property
    def resumed_from(self) -> tuple[str, str] | None:
        """(tier, name) of the checkpoint the last ``load_latest`` resumed: tier ``"local"`` or ``"durable"``."""
        return self._committer.resumed_from

    @property
    def is_writer(self) -> bool:
        """True on the process that writes (rank 0, or the only process), unless made ``read_only``."""
        return self.rank == 0 and not self.read_only

    def clock(self) -> float:
        """Seconds of training so far, continuous across resumes: pass it as ``Progress.time``."""
        return self._clock_offset + (_time.monotonic() - self._clock_t0)

    def __enter__(self) -> Checkpointer:
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
        self._report_background()
        decision = self.decider(progress)
        if decision.save:
            self._act(decision, progress, state)
        return decision

    def _act(self, decision: Decision, progress: Progress, state: Mapping[str, Any]) -> None:
        """Save what ``decision`` says, promoting it where a tier says so."""
        durable = self._committer.promoted(decision)
        if durable and not decision.durable:  # a signal save of the local tier: promoted at once
            self.decider.note_save(progress.step, progress.time if progress.time is not None else self.clock(),
                                   tiers=("durable",))
        self._save(progress, state, tuple(decision.reasons), durable)

    def step_at(
        self,
        step: int,
        state: Mapping[str, Any],
        *,
        total_steps: int | None = None,
        epoch: int = 0,
        epoch_end: bool = False,
        is_last: bool | None = None,
        time: float | None = None,
        metrics: Mapping[str, float] | None = None,
        signal: Any = False,
    ) -> Decision:
        """``step(Progress(step, total_steps=..., ...), state)``, without building the Progress on a quiet step.

        The keywords are the fields of a :class:`Progress`, with its defaults;
        the decision, the save and every check are the same as :meth:`step`'s
        (the decider's ``decide``, see docs/performance.md).
        """
        self._check_open("step")
        self._collect(block=False)
        self._report_background()
        decision = self.decider.decide(step, total_steps, epoch, epoch_end, is_last, time, metrics, signal)
        if decision.save:
            self._act(decision, Progress(step, total_steps, epoch, epoch_end, is_last, time, metrics, signal), state)
        return decision

    def _report_background(self) -> None:
        """Pass the uploads' wall times to the decider, and report those that failed (as ``on_error`` says)."""
        seconds, failures = self._committer.take_news()
        if seconds:
            note = getattr(self.decider, "note_upload_cost", None)  # a tiered decider (a wrapper may lack it)
            for s in seconds:
                if note is not None:
                    note(s)
        for err in failures:
            self._report(err)

    def save(self, progress: Progress, state: Mapping[str, Any], reason: str = "manual", *,
             durable: bool = False) -> Decision:
        """Save now, whatever the policy says; the decider is told (time rules measure from here).

        ``durable=True`` also promotes the save to the durable tier (and its
        rules measure from here too); it needs a durable tier.
        """
        if not isinstance(reason, str) or not reason:
            raise ValueError(f"reason must be a non-empty string, got {reason!r}")
        if not isinstance(durable, bool):
            raise ValueError(f"durable must be True or False, got {durable!r}")
        if durable and self._committer.tier is None:
            raise ValueError("durable=True needs a durable tier: add a [durable] table to the policy (docs/tiers.md)")
        self._check_open("save")
        self._collect(block=False)
        self._report_background()
        time_ = progress.time if progress.time is not None else self.clock()
        if self._committer.tier is None:
            self.decider.note_save(progress.step, time_)
        else:
            self.decider.note_save(progress.step, time_, tiers=("local", "durable") if durable else ("local",))
        self._save(progress, state, (reason,), (reason,) if durable else ())
        return Decision(True, (reason,), (reason,) if durable else ())

    def wait(self) -> None:
        """Block until the write in flight (if any) is committed; report its failure."""
        self._collect(block=True)

    def wait_staged(self) -> None:
        """Block until the asynchronous save in flight has copied the state (its write may go on).

        Call it before changing parameters or optimizer state other than by
        the optimizer's ``step()`` (which waits by itself).
        """
        self._async.gate.wait()

    def close(self, timeout: float | None = None) -> None:
        """Wait for pending writes, report a failure, and let go of the store's lock.

        With a durable tier, then wait for the uploads (a tqdm bar in bytes;
        at most ``timeout`` seconds, default no limit) and apply each tier's
        retention once more; raise :class:`~saverules.store.errors.DurableError`
        naming the step and why when the last promotion (the final step's, or
        a signal save's) did not reach the durable tier.  The locks are let go
        of in any case.  After ``close`` the checkpointer still reads
        (``latest``, ``list``, ``load_latest``) but ``step`` and ``save``
        raise.  Closing twice is fine.
        """
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or timeout < 0):
            raise ValueError(f"timeout must be a number of seconds >= 0 or None, got {timeout!r}")
        if self._closed:
            return
        try:
            try:
                self._collect(block=True)
            finally:
                self._committer.finish(timeout)
        finally:
            self._closed = True
            self._async.close()
            self._committer.close()
            if self._release is not None:
                self._release()
            _LIVE.discard(self)

    def _finish_at_exit(self) -> None:
        self._async.join()
        self._async.writer.stop()
        _cost, err = self._async.outcome()
        if err is not None:
            print(f"saverules: the last checkpoint write failed: {err}", file=sys.stderr)
        left = self._committer.unfinished()
        if left:
            print(f"saverules: the process ends with {len(left)} upload(s) to the durable tier unfinished "
                  f"({', '.join(sorted(left))}): close() waits for them; their local copies are in {self.dir}",
                  file=sys.stderr)

    def _collect(self, block: bool) -> None:
        """Pick up the finished asynchronous write (waiting for it when ``block``): note its cost, report its error."""
        if not block and self._async.busy():
            return
        self._async.join()
        cost, err = self._async.outcome()
        if cost is not None:
            self.decider.note_cost(*cost)
        if err is not None:
            self._report(err)

    def _report(self, err: BaseException) -> None:
        if self.on_error == "raise" or isinstance(err, RankFailure) or not isinstance(err, (CheckpointError, OSError)):
            raise err
        warn(f"{err} (on_error='warn': training continues; the next save will try again)")

    @property
    def _writes(self) -> bool:
        """This process writes files: rank 0, or every rank of a sharded format."""
        return self._committer.writes

    def _save(self, progress: Progress, state: Mapping[str, Any], reasons: tuple[str, ...],
              durable: tuple[str, ...] = ()) -> None:
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
        try:
            job, optimizers = self._prepare(progress, state, reasons, durable)
        except StateTooDeepError as err:  # a state no reader could load: refused, as on_error says
            self._report(err)
            return
        if self.async_save:
            self._async.start(job, optimizers, self._run, started, _time.perf_counter() - started)
        else:
            try:
                self._run(job)
            except (CheckpointError, OSError) as err:
                self._report(err)
            else:
                elapsed = _time.perf_counter() - started
                self.decider.note_cost(elapsed, elapsed)

    def _prepare(self, progress: Progress, state: Mapping[str, Any], reasons: tuple[str, ...],
                 durable: tuple[str, ...] = ()) -> tuple[Job, list]:
        """In the training thread: check and capture the state (into a snapshot, async), name the checkpoint.

        The committer's ``start`` captures the state (every rank of a sharded
        save, which agree on the name there); a format may capture in its own
        way (``fmt.capture``).  Returns the job and the optimizers whose
        tensors an async save left to the writer (the late copy).
        """
        if not isinstance(state, Mapping):
            raise StateTypeError(f"state must be a dict of names to objects and values, got {type_name(state)}")
        if not isinstance(progress, Progress):
            raise TypeError(f"progress must be a saverules.Progress, got {type_name(progress)}")
        metrics = metrics_of(progress)
        snap: Snapshot | None = None
        optimizers: list[Any] = []
        if self.async_save:
            snap, optimizers = self._async.snapshot(state)
        clock = float(progress.time) if progress.time is not None else self.clock()
        utc = datetime.now(timezone.utc)
        name = self.policy.storage.render_name(step=progress.step, epoch=progress.epoch, time=utc, run=self.run_name)
        grab = getattr(self._format, "capture", None) or capture
        name, payload, handle = self._committer.start(name, progress.step, lambda: grab(
            state, progress.step, self.decider.state_dict(), clock, snap))
        if durable:  # the manifest lists both tiers' reasons, as `check` does: local, then "durable" and its own
            [(_s, reasons)] = merge_saves([(progress.step, reasons)], [(progress.step, ("durable",) + durable)])
        manifest = new_manifest(name=name, progress=progress, clock=clock, utc=utc, reasons=reasons,
                                metrics=metrics, policy_digest=self.policy.digest, storage_format=self._format.name,
                                world_size=self.world_size)
        if durable:
            manifest["durable"] = list(durable)
        job = Job(name=name, step=int(progress.step), manifest=manifest, payload=payload, snapshot=snap,
                  handle=handle)
        return job, optimizers

    def _run(self, job: Job) -> None:
        """In the writer: encode, write and digest, verify, commit (the committer); then retention."""
        before = (lambda: self._async.copy_late(job)) if self._async.has_late(job) else None
        self._committer.commit(job.name, job.step, job.manifest, job.payload, job.handle, before=before,
                               settle=lambda path, manifest: self._settle(job, path, manifest))

    def _settle(self, job: Job, path: Path, manifest: Mapping[str, Any]) -> None:
        """After a commit, on the writer: remember the checkpoint (as verified), then retention.

        Neither reads the rest of the store: retention plans from the writer's
        index of it (:class:`~saverules.store.retain.Retainer`).
        """
        verified = True if self.verify != "none" else None
        info = info_from_manifest(path, self.dir, manifest, verified, None)
        if verified:
            self._cache.put(path, info)
        else:
            self._cache.forget(path)
        log.info("saved checkpoint %s (step %d, %s)", path, job.step, describe_tiers(job.manifest))
        try:
            self._retainer.retain(info)
        except Exception as exc:  # retention must never fail a save that was committed
            self._retainer.index.drop()  # read the store again at the next save
            warn(f"saverules: retention after saving {path} failed: {exc}")
        space.warn_if_short(self.dir, manifest, self._warned)

    def _sweep(self) -> None:
        """Local retention again, once an upload released the local copy it held (the promoter thread)."""
        try:
            self._retainer.sweep()
        except Exception as exc:
            self._retainer.index.drop()
            warn(f"saverules: retention of {self.dir} after an upload failed: {exc}")

    # -- reading -------------------------------------------------------------------------

    def list(self) -> builtins.list[CheckpointInfo]:
        """Every checkpoint in the store, oldest first, each re-hashed (results are cached)."""
        if self._writes:
            self._collect(block=True)
        return scan(self.dir, verify=True, _cache=self._cache)

    def latest(self, if_none_valid: str = "raise") -> CheckpointInfo | None:
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
                    if_none_valid: str = "raise", *, mmap: bool = False) -> Progress | None:
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
        resume.check_load_arguments(state, if_none_valid, mmap)
        if self._writes:
            self._collect(block=True)
        found = self._committer.load_latest(self._cache, self._warn_skip, state, map_location, if_none_valid, mmap)
        if found is None:  # a sharded store: every rank takes part, rank 0 chooses
            return None
        info, payload, into = found
        self._clock_offset = restore(info, payload, into, self.decider, self.policy.digest)
        self._clock_t0 = _time.monotonic()
        return progress_of(info, self._clock_offset)



def _weak(method: Any) -> Any:
    """``method`` (a bound method) called through a weak reference: the committer must not keep its
    Checkpointer alive (a dropped Checkpointer lets go of its lock when it is collected)."""
    ref = weakref.WeakMethod(method)

    def call() -> None:
        fn = ref()
        if fn is not None:
            fn()

    return call


def describe_tiers(manifest: Mapping[str, Any]) -> str:
    """A save's rules by tier: ``local: every_steps(every=100); durable: final`` (``-``: none of that tier's)."""
    reasons = list(manifest.get("reasons") or ())
    durable = list(manifest.get("durable") or ())
    if not durable:
        return "local: " + ", ".join(reasons)
    cut = reasons.index("durable") if "durable" in reasons else len(reasons)
    return f"local: {', '.join(reasons[:cut]) or '-'}; durable: {', '.join(durable)}"
