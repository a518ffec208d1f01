"""A store with an optional durable tier: the Checkpointer's committer, wrapping the local (or sharded) one.

:class:`TieredCommitter` implements :class:`~saverules.store.commit.Committer`
around the committer that writes the local tier, so that the Checkpointer
runs every save and resume through one object and never asks whether a
durable tier is there.  Without one (``tier`` None) it only passes through.
With one:

* **Promotion.** A save whose manifest names durable reasons (``"durable":
  [...]``: :func:`saverules.engine.tiers.promoted` of its decision, the
  durable tier's rules or, a preemption save, the local ``on_signal`` ones)
  is committed locally first and then handed to the
  :class:`~saverules.store.remote.promote.Promoter`, which uploads it in the
  background.
* **The protected set** (:meth:`TieredCommitter.protected`): local retention
  never deletes a checkpoint whose upload is queued or running, one whose
  upload failed (until a later promotion reaches the tier), or the checkpoint
  a resume came from (until a newer one is committed locally).  The newest
  checkpoint is never deleted in either tier anyway.
* **Durable retention** runs after each upload commits, with the durable
  tier's own policy, never deleting the newest durable checkpoint or the one
  a resume came from (until a newer one is committed there); then local
  retention runs again (``released``), since the upload released its local copy.
* **Resume across tiers** (:meth:`TieredCommitter.load_latest`): when the
  durable tier holds a checkpoint newer than the newest local one that
  verifies (a new node: none at all), it is downloaded into the local store,
  digests checked as the bytes stream in, and loaded; a damaged durable
  checkpoint falls back to the one before it with a warning naming why.
  :attr:`TieredCommitter.resumed_from` says (tier, name).
* **Finishing** (:meth:`TieredCommitter.finish`, from ``Checkpointer.close``):
  drain the uploads (a tqdm bar in bytes), apply both tiers' retention once
  more, and raise :class:`~saverules.store.errors.DurableError` when the last
  promotion (the final step's) did not reach the durable tier.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Collection, Mapping, MutableMapping
from pathlib import Path
from typing import Any

from ...engine.tiers import Protected, promoted
from ..commit import Committer, Loaded, Settle
from ..errors import CheckpointError, DurableError, NoValidCheckpointError, log, warn
from ..manifest import CheckpointInfo
from ..verify import VerifyCache, newest_good, sort_key
from .promote import PROMOTION_RETRIES, Promoter, Promotion, PromotionError, Upload
from .retry import Retries
from .tier import DurableTier
from .transfer import TransferError

LOCAL, DURABLE = "local", "durable"


class TieredCommitter:
    """The local (or sharded) committer ``inner``, and the durable ``tier`` when there is one (see the module)."""

    def __init__(self, inner: Committer, root: Path, durable_policy: Any = None, *,
                 open_tier: Callable[[], DurableTier] | None = None,
                 uploader: Callable[[DurableTier], Upload] | None = None,
                 retries: Retries = PROMOTION_RETRIES, released: Callable[[], None] | None = None,
                 downloads: bool = True) -> None:
        self.inner = inner
        self.root = root
        self.durable_policy = durable_policy
        self.writes = inner.writes
        self.tier: DurableTier | None = None
        self.promoter: Promoter | None = None
        self._open_tier = open_tier
        self._uploader = uploader
        self._retries = retries
        self._released = released
        self._downloads = downloads
        #: (tier, name) of the checkpoint the last resume came from.
        self.resumed_from: tuple[str, str] | None = None
        #: Each tier's protected names (engine.tiers.Protected): its newest commit, the checkpoint a resume came
        #: from until another is committed there, and (local) the copies of failed promotions, held until a
        #: later promotion reaches the tier.  Changed on the writer and the promoter thread, under ``_lock``.
        self._local: Protected[str] = Protected()
        self._durable: Protected[str] = Protected()
        self._failed: dict[str, Promotion] = {}
        self._seconds: list[float] = []  # upload wall times not yet told to the decider
        #: An upload ended since the training thread last looked (read without the lock: a quiet step is cheap).
        self.news = False
        self._lock = threading.Lock()

    # -- opening and closing ---------------------------------------------------------------

    def open(self) -> None:
        """Open the durable tier (a writer: take its lock, remove leftovers; unreachable: CheckpointError)."""
        if self._open_tier is None or self.tier is not None:
            return
        self.tier = self._open_tier()
        if self.writes:
            upload = self._uploader(self.tier) if self._uploader is not None else None
            self.promoter = Promoter(self.tier, upload, self._retries, on_done=self._uploaded)

    def close(self) -> None:
        """Stop the promoter (an upload still running is abandoned at its next chunk) and let go of the tier."""
        if self.promoter is not None:
            self.promoter.close()
        if self.tier is not None:
            self.tier.close()

    # -- the Committer Protocol ------------------------------------------------------------------

    def start(self, name: str, step: int, capture: Callable[[], Any]) -> tuple[str, Any, Any]:
        return self.inner.start(name, step, capture)

    def commit(self, name: str, step: int, manifest: Mapping[str, Any], payload: Any, handle: Any, *,
               before: Callable[[], None] | None, settle: Settle) -> None:
        seen: dict[str, Any] = {}

        def settled(path: Path, final: Mapping[str, Any]) -> None:
            seen["path"], seen["manifest"] = path, final
            with self._lock:
                self._local.committed(name)  # the resume's checkpoint is no longer held once another is committed
            settle(path, final)

        self.inner.commit(name, step, manifest, payload, handle, before=before, settle=settled)
        reasons = tuple(manifest.get("durable") or ())
        if self.promoter is None or not reasons:
            return
        final = seen.get("manifest", manifest)
        files = final.get("files") or {}
        size = sum(int(e.get("size", 0)) for e in files.values() if isinstance(e, Mapping))
        log.info("saverules: promoting %s (step %d, durable: %s) to the durable tier %s in the background",
                 name, step, ", ".join(reasons), self.promoter.tier.url)
        self.promoter.enqueue(Promotion.of(name, step, Path(seen.get("path", self.root / name)), reasons, size))

    def cleanup(self) -> None:
        self.inner.cleanup()

    def load_latest(self, cache: VerifyCache, skip: Callable[[CheckpointInfo], None],
                    state: MutableMapping[str, Any], map_location: Any, if_none_valid: str,
                    mmap: bool) -> Loaded | None:
        fetched: str | None = None
        rejected: list[tuple[str, str]] = []
        if self.tier is not None and self._downloads:
            fetched, rejected = self._fetch_newer(cache)
        found = self.inner.load_latest(cache, skip, state, map_location, if_none_valid, mmap)
        if found is None:
            if rejected and self.tier is not None:
                if if_none_valid == "raise":
                    raise NoValidCheckpointError(self.tier.url, rejected)
                warn(f"saverules: none of the {len(rejected)} durable checkpoints in {self.tier.url} can be "
                     "resumed; starting from scratch as if_none_valid='start_fresh' asks")
            return None
        info = found[0]
        tier = DURABLE if fetched is not None and info.name == fetched else LOCAL
        self.resumed_from = (tier, info.name)
        with self._lock:
            self._local = Protected(newest=self._local.newest, resumed_from=info.name)
            if self.tier is not None:
                self._durable = Protected(newest=self._durable.newest, resumed_from=info.name)
        if self.tier is not None:
            log.info("saverules: resuming from %s (step %s) of the %s tier (%s)", info.name, info.step, tier,
                     self.tier.url if tier == DURABLE else self.root)
        return found

    # -- resume ----------------------------------------------------------------------------------

    def _fetch_newer(self, cache: VerifyCache) -> tuple[str | None, list[tuple[str, str]]]:
        """Download the newest durable checkpoint that is newer than every good local one and downloads whole.

        Returns (its name or None, the (name, reason) of each durable one passed over).
        """
        from ..resume import needs_digest_pass

        assert self.tier is not None
        local = next(newest_good(self.root, cache, lambda info: None, deep=needs_digest_pass), None)
        try:
            infos = self.tier.list(verify=False)
        except CheckpointError as exc:
            warn(f"saverules: could not list the durable tier {self.tier.url} ({exc}); resuming from the local "
                 f"tier {self.root} only")
            return None, []
        newer = [i for i in infos if local is None or sort_key(i) > sort_key(local)]
        rejected: list[tuple[str, str]] = []
        for info in sorted(newer, key=sort_key, reverse=True):
            if not info.ok:
                reason = info.error or "failed verification"
            else:
                try:
                    path = self.tier.download(info.name, self.root)
                except TransferError as exc:  # damaged, or a file missing: the one before it is tried
                    reason = str(exc).removeprefix("saverules: ")
                except CheckpointError as exc:  # the network failed on every retry: the local tier it is
                    warn(f"saverules: could not download {self.tier.prefix(info.name)} ({exc}); resuming from the "
                         f"local tier {self.root} only")
                    return None, rejected
                else:
                    cache.forget(path)
                    log.info("saverules: downloaded %s (step %s) from the durable tier %s into %s", info.name,
                             info.step, self.tier.url, self.root)
                    return info.name, rejected
            rejected.append((info.name, reason))
            warn(f"saverules: skipping durable checkpoint {self.tier.prefix(info.name)}: {reason}; falling back to "
                 "the one before it")
        return None, rejected

    # -- the protected set, failures, and the end --------------------------------------------------

    def protected(self) -> set[str]:
        """The local checkpoints retention must not delete now (see the module)."""
        names = set(self.promoter.pending()) if self.promoter is not None else set()
        with self._lock:
            names.update(self._local.names())
        return names

    def promoted(self, decision: Any) -> tuple[str, ...]:
        """The durable reasons of a decision to save: its durable tier's rules, or (with a durable tier) the
        ``on_signal`` rules of the local tier, since a signal save is promoted at once; () when not promoted."""
        return promoted(decision) if self.tier is not None else ()

    def upload_seconds(self) -> list[float]:
        """The wall time of each upload that reached the durable tier since the last call (for the decider)."""
        with self._lock:
            out, self._seconds = self._seconds, []
        return out

    def unfinished(self) -> set[str]:
        """The checkpoints whose upload is queued or running."""
        return self.promoter.pending() if self.promoter is not None else set()

    def failures(self) -> list[PromotionError]:
        """The promotions that failed since the last call (for the next ``step()`` to report)."""
        return self.promoter.failures() if self.promoter is not None else []

    def take_news(self) -> tuple[list[float], list[PromotionError]]:
        """(upload wall times, failed promotions) since the last call; nothing to take costs one attribute read."""
        if not self.news:
            return [], []
        self.news = False
        return self.upload_seconds(), self.failures()

    def _uploaded(self, promotion: Promotion, failure: PromotionError | None, seconds: float) -> None:
        """On the promoter thread, after an upload: hold a failed one's local copy; else durable retention."""
        self.news = True  # the promoter has recorded the outcome: failures() returns it from now on
        if failure is not None:
            with self._lock:
                if promotion.name not in self._failed:
                    self._failed[promotion.name] = promotion
                    self._local.hold(promotion.name)
            return
        with self._lock:
            self._seconds.append(seconds)
            for name, p in list(self._failed.items()):
                if p.step <= promotion.step:
                    del self._failed[name]
                    self._local.release(name)
            self._durable.committed(promotion.name)
        self._retain_durable()
        if self._released is not None:
            self._released()

    def _retain_durable(self) -> None:
        tier = self.tier
        if tier is None or tier.lock is None or self.durable_policy is None:
            return
        with self._lock:
            held = self._durable.names()
        try:
            gone = tier.retain(self.durable_policy, protected=held)
        except Exception as exc:  # retention never fails an upload that was committed
            warn(f"saverules: retention of the durable tier {tier.url} failed: {exc}")
            return
        for name in gone:
            log.info("saverules: durable retention deleted %s", tier.prefix(name))

    def finish(self, timeout: float | None = None) -> None:
        """Drain the uploads, apply both tiers' retention once more, and check the last promotion arrived.

        Raises :class:`DurableError` naming the step and why when the last
        promotion asked for (the final step's, or a signal save's) did not
        reach the durable tier: still uploading after ``timeout`` seconds, or
        failed.  Earlier failures not yet reported are warned about.
        """
        promoter = self.promoter
        if promoter is None:
            return
        drained = promoter.drain(timeout)
        failures = promoter.failures()
        if drained:
            self._retain_durable()
            if self._released is not None:
                self._released()
        last = promoter.latest
        failed_last = None
        for failure in failures:
            if last is not None and failure.promotion.name == last.name:
                failed_last = failure
            else:
                warn(str(failure))
        if last is None or promoter.reached(last.name):
            if last is not None:
                log.info("saverules: the last promotion, %s (step %d), is in the durable tier %s", last.name,
                         last.step, promoter.tier.url)
            return
        if failed_last is not None:
            why = failed_last.reason
        elif not drained:
            running = last.name in promoter.pending()
            why = (f"its upload was {'still running' if running else 'still queued'} when close() gave up after "
                   f"{timeout:g}s" if timeout is not None else "its upload did not end")
        else:
            why = "its upload did not complete"
        what = "the final step" if last.final else ("a signal save" if last.signal else "the last durable save")
        raise DurableError(
            f"saverules: {what}, step {last.step} ({last.name}), did not reach the durable tier {promoter.tier.url}: "
            f"{why}. The local checkpoint {last.path} holds it: once the tier is reachable, "
            f"saverules.store.remote.DurableTier({promoter.tier.url!r}).upload({str(last.path)!r}) uploads it",
            step=last.step, reason=why,
        )

    def held(self) -> Collection[str]:
        """The names a resume holds in the durable tier (for tests and ``ls``)."""
        with self._lock:
            return set(self._durable.names())


__all__ = ["TieredCommitter", "LOCAL", "DURABLE"]


class AgreedTieredCommitter(TieredCommitter):
    """A :class:`TieredCommitter` whose resume is a collective of every rank (DDP, or a sharded store).

    Rank 0 alone looks at the durable tier and downloads the checkpoint to
    resume into the local store the ranks read; a broadcast then tells every
    rank what it fetched and which durable checkpoints it passed over, so
    that no rank reads the store before the download is in place, every rank
    says the same tier in ``resumed_from``, and when no checkpoint of either
    tier can be resumed every rank raises together.  Give it ``downloads``
    True on every rank that takes part (a Checkpointer that is not read-only).
    """

    def __init__(self, inner: Any, *args: Any, ranks: Any, **kwargs: Any) -> None:
        super().__init__(inner, *args, **kwargs)
        self.ranks = ranks

    def _fetch_newer(self, cache: VerifyCache) -> tuple[str | None, list[tuple[str, str]]]:
        mine: BaseException | None = None
        outcome: Any = None
        if self.ranks.rank == 0:
            try:
                outcome = ("ok", super()._fetch_newer(cache))
            except Exception as exc:  # told to every rank first, then raised here
                text = str(exc).replace("saverules: ", "", 1) or type(exc).__name__
                mine, outcome = exc, ("error", text)
        kind, what = self.ranks.broadcast(outcome, "fetch the newest checkpoint of the durable tier")
        if mine is not None:
            raise mine
        if kind == "error":
            raise CheckpointError(f"saverules: rank 0 could not fetch the newest durable checkpoint: {what}")
        fetched, rejected = what
        return fetched, [(str(a), str(b)) for a, b in rejected]
