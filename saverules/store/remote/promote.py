"""Promotion: committed local checkpoints uploaded to the durable tier by one background thread.

A durable save commits a local checkpoint and then hands it to the
:class:`Promoter`, which uploads it while training goes on:

* at most one upload runs at a time, on the promoter's own daemon thread;
* the queue has one slot: a newer promotion replaces the queued one (its
  local checkpoint is released at once), except a **final** or **signal**
  promotion, which is never replaced; the newer one then waits behind it, and
  a log line names both steps;
* an upload that fails is tried again as a whole, with the bounded backoff
  of :mod:`.retry` (one warning line per retry), on top of the per-object
  retries of the upload itself; when those are spent the failure is kept for
  the training thread (:meth:`Promoter.failures`, taken by the next
  ``Checkpointer.step()``, reported as ``on_error`` says);
* :meth:`Promoter.pending` names the checkpoints queued or uploading, which
  local retention must not delete;
* :meth:`Promoter.drain` waits for everything queued, with a tqdm bar in bytes.

``upload(local_path, name, on_bytes)`` is the strategy that moves one
checkpoint: :meth:`DurableTier.upload` by default; a sharded store supplies
its own (every rank uploads its files).  ``on_done(promotion, error, seconds)`` runs
on the promoter thread after each upload ends (``error`` None on success):
the Checkpointer applies the durable tier's retention there and releases
the local copy.
"""
from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ...engine.tiers import PromotionQueue, is_signal_reason, must_reach_durable
from ..errors import CheckpointError, log
from .retry import PERMANENT, Retries, RetriesExhausted, retrying
from .transfer import TransferError

#: upload(local checkpoint directory, name in the durable tier, on_bytes): moves one checkpoint.
Upload = Callable[[Path, str, Callable[[int], None]], None]
#: on_done(promotion, error or None, seconds the upload took): after each upload, on the promoter thread.
OnDone = Callable[["Promotion", "PromotionError | None", float], None]

#: Whole-upload retries of a promotion (each upload also retries every object, see DurableTier.retries).
PROMOTION_RETRIES = Retries(attempts=3, first=2.0, longest=30.0)


@dataclasses.dataclass(frozen=True)
class Promotion:
    """One committed local checkpoint to upload.

    ``reasons`` are the durable tier's rules that fired; ``final`` and
    ``signal`` mark a promotion that is never replaced in the queue; ``size``
    is its bytes (files and manifest), for the progress bar.
    """

    name: str
    step: int
    path: Path
    reasons: tuple[str, ...] = ()
    final: bool = False
    signal: bool = False
    size: int = 0

    @classmethod
    def of(cls, name: str, step: int, path: Path, reasons: tuple[str, ...], size: int = 0) -> Promotion:
        """The promotion of a committed checkpoint for its durable ``reasons`` (engine.tiers.promoted)."""
        return cls(name=name, step=step, path=path, reasons=reasons, final="final" in reasons,
                   signal=any(is_signal_reason(r) for r in reasons), size=size)

    @property
    def sticky(self) -> bool:
        """Never replaced by a newer promotion: a final or a signal save (engine.tiers.must_reach_durable)."""
        return self.final or self.signal or must_reach_durable(self.reasons)

    def why(self) -> str:
        return "the final save" if self.final else "a signal save"


class PromotionError(CheckpointError):
    """A promotion did not reach the durable tier; ``promotion`` says which, ``reason`` why."""

    def __init__(self, message: str, promotion: Promotion, reason: str):
        super().__init__(message)
        self.promotion = promotion
        self.reason = reason


class Abandoned(CheckpointError):
    """An upload stopped half-way because the promoter was closed (nothing was committed)."""


class Promoter:
    """Uploads promotions one at a time on a background thread (see the module)."""

    def __init__(self, tier: Any, upload: Upload | None = None, retries: Retries = PROMOTION_RETRIES,
                 on_done: OnDone | None = None, sleep: Callable[[float], None] | None = None) -> None:
        self.tier = tier
        self._upload: Upload = upload if upload is not None else self._tier_upload
        self.retries = retries
        self.on_done = on_done
        self._cond = threading.Condition()
        #: Which promotions wait and which one uploads: the engine's pure model, run under ``_cond``.
        self._queue: PromotionQueue[str] = PromotionQueue()
        self._items: dict[str, Promotion] = {}
        self._failures: list[PromotionError] = []
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._stop = threading.Event()
        self._sleep: Callable[[float], None] = sleep if sleep is not None else self._pause
        #: The bytes of the promotions queued and running, and of the running one sent so far.
        self._sent = 0
        #: Promotions that reached the durable tier, oldest first; the newest promotion asked for.
        self.done: list[Promotion] = []
        self.latest: Promotion | None = None
        self._finished = 0  # bytes of the uploads ended so far (for the progress bar)

    @property
    def _running(self) -> Promotion | None:
        name = self._queue.running
        return None if name is None else self._items[name]

    def _waiting(self) -> list[Promotion]:
        return [self._items[n] for n in self._queue.waiting]

    def _pause(self, seconds: float) -> None:
        self._stop.wait(seconds)  # a retry's backoff; close() cuts it short

    def _tier_upload(self, path: Path, name: str, on_bytes: Callable[[int], None]) -> None:
        self.tier.upload(path, name, on_bytes=on_bytes)

    # -- the training side -----------------------------------------------------------------

    def enqueue(self, promotion: Promotion) -> list[Promotion]:
        """Queue ``promotion``; return the queued promotions it replaced (their local copies are released)."""
        with self._cond:
            if self._stopping:
                raise CheckpointError(f"saverules: promotion of step {promotion.step} after the promoter was closed")
            ahead = [self._items[n] for n in self._queue.pinned_waiting()]
            gone = self._queue.offer(promotion.name, pinned=promotion.sticky)
            self._items[promotion.name] = promotion
            replaced = [self._items.pop(gone)] if gone is not None else []
            running = self._running
            for old in replaced:
                log.warning("saverules: the promotion of step %d (%s) replaces the queued promotion of step %d, "
                            "which is not uploaded: the upload of step %s is still running",
                            promotion.step, promotion.name, old.step, running.step if running is not None else "?")
            for old in ahead:
                log.warning("saverules: the promotion of step %d (%s) waits behind the queued promotion of step %d, "
                            "%s, which is never replaced", promotion.step, promotion.name, old.step, old.why())
            self.latest = promotion
            self._start()
            self._cond.notify_all()
            return replaced

    def pending(self) -> set[str]:
        """The names of the checkpoints queued or uploading."""
        with self._cond:
            return set(self._queue.pending())

    def busy(self) -> bool:
        with self._cond:
            return len(self._queue) > 0

    def failures(self) -> list[PromotionError]:
        """The promotions that failed since the last call (each after its retries), oldest first."""
        with self._cond:
            out, self._failures = self._failures, []
            return out

    def reached(self, name: str) -> bool:
        """Whether the promotion of ``name`` reached the durable tier (in this process)."""
        with self._cond:
            return any(p.name == name for p in self.done)

    def pending_bytes(self) -> tuple[int, int]:
        """(bytes of everything queued or uploading, bytes of the running upload sent so far)."""
        with self._cond:
            return sum(self._items[n].size for n in self._queue.pending()), self._sent

    def drain(self, timeout: float | None = None, bar: bool = True) -> bool:
        """Wait until nothing is queued or uploading (at most ``timeout`` seconds); True when so.

        A tqdm bar in bytes shows the uploads (``bar=False``: none).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        progress = None
        with self._cond:
            base = self._finished
        try:
            while True:
                with self._cond:
                    if len(self._queue) == 0:
                        if progress is not None:
                            progress.update(progress.total - progress.n)
                        return True
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        return False
                    queued = sum(p.size for p in self._waiting())
                    running = self._running.size if self._running is not None else 0
                    finished = self._finished - base
                    now = finished + min(self._sent, running)
                    whole = finished + running + queued
                if bar and progress is None:
                    progress = _bar(whole)
                if progress is not None:
                    if whole != progress.total:
                        progress.total = whole
                    progress.update(now - progress.n)
                with self._cond:
                    if len(self._queue) > 0:
                        self._cond.wait(0.2 if left is None else min(0.2, left))
        finally:
            if progress is not None:
                progress.close()

    def close(self, timeout: float | None = 5.0) -> None:
        """Stop taking promotions and let the thread end (what is queued is dropped; drain first)."""
        with self._cond:
            self._stopping = True
            for name in self._queue.waiting:  # dropped: only the running upload is left (it stops at its next chunk)
                self._items.pop(name, None)
            running = self._queue.running
            self._queue = PromotionQueue()
            if running is not None:
                self._queue.offer(running)
                self._queue.start()
            self._cond.notify_all()
        self._stop.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout)

    # -- the promoter thread ---------------------------------------------------------------

    def _start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name="saverules-promoter", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._cond:
                name = None
                while not self._stopping:
                    name = self._queue.start()
                    if name is not None:
                        break
                    self._cond.wait()
                if self._stopping or name is None:
                    return
                promotion, self._sent = self._items[name], 0
            error: BaseException | None = None
            started = time.monotonic()
            try:
                self._one(promotion)
            except BaseException as exc:  # reported to the training thread, never lost on this thread
                error = exc
            seconds = time.monotonic() - started
            failure = None
            if error is None:
                log.info("saverules: promoted %s (step %d, durable: %s) to the durable tier %s in %.1fs",
                         promotion.name, promotion.step, ", ".join(promotion.reasons) or "-",
                         getattr(self.tier, "url", "?"), seconds)
            else:
                reason = _why(error)
                failure = PromotionError(
                    f"saverules: the promotion of {promotion.name} (step {promotion.step}) to the durable tier "
                    f"{getattr(self.tier, 'url', '?')} failed: {reason}. The local checkpoint stays protected; the "
                    "next durable save tries again", promotion, reason)
                failure.__cause__ = error
                log.warning("%s", failure)
            with self._cond:  # recorded first, so that on_done's news finds it; still running until on_done ends
                if failure is None:
                    self.done.append(promotion)
                else:
                    self._failures.append(failure)
            try:
                if self.on_done is not None:
                    self.on_done(promotion, failure, seconds)
            except Exception as exc:  # the callback's failure (retention) must not stop the uploads
                log.warning("saverules: after the promotion of %s: %s", promotion.name, exc)
            with self._cond:
                if self._queue.running == promotion.name:
                    self._queue.finish()
                if promotion.name not in self._queue.pending():
                    self._items.pop(promotion.name, None)
                self._finished += promotion.size
                self._cond.notify_all()

    def _one(self, promotion: Promotion) -> None:
        sent = [0]

        def on_bytes(n: int) -> None:
            if self._stopping:
                raise Abandoned(f"saverules: the upload of {promotion.name} was abandoned: the promoter was closed")
            sent[0] += n
            with self._cond:
                self._sent = max(0, self._sent + n)

        def attempt() -> None:
            if not promotion.path.exists():
                raise FileNotFoundError(f"the local checkpoint {promotion.path} is gone")
            with self._cond:
                self._sent = 0
            try:
                self._upload(promotion.path, promotion.name, on_bytes)
            except RetriesExhausted as exc:  # the per-object retries are spent: the whole upload tries again
                raise ConnectionError(str(exc)) from exc

        retrying(f"promotion of {promotion.name} (step {promotion.step})", attempt, self.retries,
                 permanent=PERMANENT + (TransferError,), sleep=self._sleep)


def _why(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.removeprefix("saverules: ")


def _bar(total: int) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="saverules: uploading",
                leave=False, dynamic_ncols=True)


__all__ = ["Promoter", "Promotion", "PromotionError", "Upload", "PROMOTION_RETRIES"]
