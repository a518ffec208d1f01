"""Retention: once a new checkpoint is committed, delete what ``policy.retain`` drops.

A writer plans from its :class:`~saverules.store.index.StoreIndex`, not from
the disk, and incrementally: once the store is pruned (every checkpoint in
it kept by the policy), a new newest checkpoint can only take the place of a
few others (the previous newest, the one leaving ``keep_last``, the one it
pushes out of ``keep_best``, an earlier final), so the policy's own
``retain`` is asked about those alone, in the store's order with everything
that decides for them (:meth:`Retainer.plan`).  Anything else (the first
save of a process, a checkpoint that is not the newest, a run with another
total, a policy object without a ``retention`` table) is planned from the
whole index, as :func:`plan` does.

Before anything is deleted the checkpoints that push it out are checked
again (re-hashed when the Checkpointer verifies, each once per process, the
results cached), so that a damaged checkpoint, or one another process
removed, is never counted in place of a good one that would go; when one of
them fails, the store is read again and the plan made from what is really
there.  A checkpoint to delete that turns out damaged is left on disk for
inspection, uncounted, with a warning.  The checkpoint just written always stays
until the next one is committed, and so does every checkpoint the ``protected``
callable names (a two-tier store: the local copies whose upload to the durable
tier is queued or running, and the checkpoint a resume came from): what the
policy drops among them stays until :meth:`Retainer.sweep` runs once they are
released.  A checkpoint is deleted by renaming it to
``.del-...`` first, so a crash mid-delete never leaves a half-deleted
directory that looks like a checkpoint; one that another process removed
first is simply gone.
"""
from __future__ import annotations

import bisect
import os
import threading
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

from ..engine.progress import Checkpoint
from ..engine.retention import _metric as metric_value  # the one reading of a metric retention ranks by
from .errors import CheckpointError, log, warn
from .fs import fs
from .index import StoreIndex
from .layout import DEL_PREFIX, hidden_name
from .manifest import CheckpointInfo
from .removed import record, removal
from .verify import VerifyCache, scan, sort_key


def retention_view(infos: Sequence[CheckpointInfo]) -> list[Checkpoint]:
    """What retention sees of ``infos`` (usable checkpoints, oldest first).

    Retention always keeps the run's final checkpoint.  A run that was
    extended (resumed with a larger total) saved a final of its own, and the
    final of the shorter run before it is then just another checkpoint: only
    the finals of the current run, the run of the newest checkpoint (same
    ``total_steps``), are pinned as final.  Without any total in the
    manifests the newest final stands for the run's.  ``saverules.ls`` and
    the store both judge through this view, so they agree on what is kept.
    """
    if not infos:
        return []
    totals = [_total(i) for i in infos]
    current = totals[-1]
    finals = [k for k, i in enumerate(infos) if i.final]
    if current is not None:
        pinned = {k for k in finals if totals[k] == current}
    else:
        pinned = set(finals[-1:])
    return [Checkpoint(_step(i), i.time, i.metrics, k in pinned) for k, i in enumerate(infos)]


def _step(info: CheckpointInfo) -> int:
    if info.step is None:
        raise ValueError(f"{info.path} has no valid manifest ({info.error}): retention sees only usable checkpoints")
    return info.step


def _total(info: CheckpointInfo) -> Any:
    return (getattr(info, "manifest", None) or {}).get("total_steps")


def plan(infos: Sequence[CheckpointInfo], newest: Path, policy: Any) -> list[CheckpointInfo]:
    """The usable checkpoints of ``infos`` (oldest first) that the policy drops, never ``newest``."""
    valid = [i for i in infos if i.ok and i.step is not None]
    if not valid:
        return []
    keep = policy.retain(retention_view(valid))
    if len(keep) != len(valid):
        raise CheckpointError(f"policy.retain returned {len(keep)} answers for {len(valid)} checkpoints")
    return [info for info, k in zip(valid, keep) if not k and info.path != newest]


def _order(rank: tuple[float, tuple[Any, ...], CheckpointInfo]) -> tuple[float, tuple[Any, ...]]:
    return rank[0], rank[1]  # better value first; ties: the earlier checkpoint, as the policy ranks them


_NO_TABLE = object()  # a policy object that does not say what its retention table is


class Retainer:
    """Retention for one writing Checkpointer, over its index of the store (see the module)."""

    def __init__(self, root: Path, policy: Any, cache: VerifyCache, deep: bool, warned: set,
                 protected: Callable[[], Collection[str]] | None = None) -> None:
        self.index = StoreIndex(root)
        #: The names retention must not delete now (see the module); asked before every deletion.
        self.protected = protected
        #: Retention runs after a commit (the writer) and after an upload (the promoter thread): one at a time.
        self.lock = threading.RLock()
        self.root, self.policy, self.cache, self.deep, self.warned = root, policy, cache, deep, warned
        self.table = getattr(policy, "retention", _NO_TABLE)
        self._pruned = False  # every checkpoint in the index is kept by the policy
        # keep_best's ranking, best first: (sign * value, sort key, info); and the finals, oldest first.
        self._ranked: list[tuple[float, tuple[Any, ...], CheckpointInfo]] = []
        self._finals: list[CheckpointInfo] = []

    # -- the index and what it ranks ------------------------------------------------------

    def _best(self) -> Any:
        return getattr(self.table, "keep_best", None) if self.table is not _NO_TABLE else None

    def _rank(self, info: CheckpointInfo) -> tuple[float, tuple[Any, ...], CheckpointInfo] | None:
        best = self._best()
        if best is None:
            return None
        value = metric_value(info, best.metric)
        if value is None:
            return None
        return (value if best.mode == "min" else -value, sort_key(info), info)

    def _rebuild(self, infos: Sequence[CheckpointInfo] | None = None) -> None:
        """(Re)build the index from the disk, or from ``infos`` just read, and what it ranks."""
        if infos is None:
            self.index.build()
        else:
            self.index.drop()
            self.index.build_from(infos)
        for info in self.index.bad:
            self._warn_bad(info)
        ranked = [r for r in map(self._rank, self.index.good()) if r is not None]
        self._ranked = sorted(ranked, key=_order)
        self._finals = [i for i in self.index.good() if i.final]

    def _add(self, info: CheckpointInfo) -> int:
        self.forget(info.path)
        pos = self.index.add(info)
        rank = self._rank(info)
        if rank is not None:
            bisect.insort(self._ranked, rank, key=_order)
        if info.final:
            bisect.insort(self._finals, info, key=sort_key)
        return pos

    def forget(self, path: Path) -> None:
        """The checkpoint at ``path`` is gone from the store: out of the index and the rankings."""
        gone = self.index.remove(path)
        if gone is None:
            return
        if gone.final:
            self._finals = [i for i in self._finals if i is not gone]
        rank = self._rank(gone)
        if rank is not None:
            i = bisect.bisect_left(self._ranked, _order(rank), key=_order)
            while i < len(self._ranked) and self._ranked[i][2] is not gone:
                i += 1
            if i < len(self._ranked):
                del self._ranked[i]

    def _warn_bad(self, info: CheckpointInfo) -> None:
        if str(info.path) not in self.warned:
            self.warned.add(str(info.path))
            warn(
                f"saverules: checkpoint {info.path} failed verification ({info.error}); it is not counted "
                "by retention and is left on disk for you to inspect or delete"
            )

    # -- planning ------------------------------------------------------------------------------

    def plan(self, info: CheckpointInfo) -> list[CheckpointInfo]:
        """Add the committed checkpoint ``info`` to the index; the checkpoints retention drops now."""
        fresh = not self.index.built
        if fresh:
            self._rebuild()
        good = self.index.good()
        previous = good[-1] if good and good[-1].path != info.path else None
        pos = self._add(info)
        if self.table is None:  # no [retention] table: everything is kept
            self._pruned = True
            return []
        whole = (fresh or not self._pruned or self.table is _NO_TABLE or pos != len(good) - 1
                 or (previous is not None and _total(previous) != _total(info)))
        drop = plan(good if whole else self._deciding(), info.path, self.policy)
        self._pruned = True  # once ``drop`` is deleted (retain() notes a deletion that fails)
        return drop

    def _deciding(self) -> list[CheckpointInfo]:
        """The checkpoints whose fate a new newest one can change, with all that decides it, in order.

        In a pruned store a new newest checkpoint changes only: which is newest
        (the previous one), the ``keep_last`` window (the one leaving it), the
        best ``n`` (the one pushed out), and which final is pinned (the newest
        two finals).  Positions from the end, ranks among the best and the
        newest final are the same in this list as in the whole store, so the
        policy decides these exactly as over the whole store.
        """
        good = self.index.good()
        count = len(good)
        tail = max(int(getattr(self.table, "keep_last", 1) or 1), 1) + 1
        picked: dict[Path, CheckpointInfo] = {i.path: i for i in good[max(0, count - tail):]}
        best = self._best()
        if best is not None:
            for _v, _k, info in self._ranked[: best.n + 1]:
                picked[info.path] = info
        for info in self._finals[-2:]:
            picked[info.path] = info
        return sorted(picked.values(), key=sort_key)

    # -- applying --------------------------------------------------------------------------------

    def retain(self, info: CheckpointInfo) -> None:
        """Apply the policy's retention after ``info`` was committed."""
        with self.lock:
            drop = self.plan(info)
            if drop:
                drop = self._confirmed(drop, info.path)
            self._apply(drop)

    def sweep(self) -> None:
        """Apply the policy's retention again, over the whole index (a protected checkpoint was released)."""
        with self.lock:
            if not self.index.built:
                return  # nothing was committed by this writer yet: the next commit plans from the disk
            good = self.index.good()
            if not good or self.table is None:
                return
            drop = plan(good, good[-1].path, self.policy)
            if drop:
                drop = self._confirmed(drop, good[-1].path)
            self._apply(drop)

    def _apply(self, drop: list[CheckpointInfo]) -> None:
        held = set(self.protected()) if self.protected is not None else set()
        failed = False
        removed = []
        for victim in drop:
            if victim.name in held:
                log.info("retention keeps checkpoint %s for now: it is protected (its upload to the durable tier "
                         "is pending, or a resume came from it)", victim.path)
                failed = True  # the store is not pruned: the next plan looks at the whole index
                continue
            done = self._delete(victim.path)
            failed = failed or done is None
            if done == "deleted":
                removed.append(removal(victim.name, victim.step, self.policy))
        record(self.root, removed, self.warned)  # for `ls` and summaries: see saverules.store.removed
        self._pruned = not failed

    def _confirmed(self, drop: list[CheckpointInfo], newest: Path) -> list[CheckpointInfo]:
        """``drop``, once every checkpoint kept in their place is still there (``deep``: and re-hashes right).

        When one is gone or damaged, the index was out of date: the store is
        read again (``deep``: every checkpoint hashed, each once per process)
        and the plan made from what is really there.
        """
        gone = {i.path for i in drop}
        kept = [i for i in self._deciding() if i.path not in gone]
        if all(self.cache.get(i.path, self.root, self.deep).ok for i in kept):
            return [i for i in drop if self._still_good(i)]
        log.info("the store %s changed behind its writer: reading it again", self.root)
        self._rebuild(scan(self.root, verify=self.deep, _cache=self.cache))
        return plan(self.index.good(), newest, self.policy)

    def _still_good(self, victim: CheckpointInfo) -> bool:
        """Whether a checkpoint to delete still verifies; a damaged one is left on disk, uncounted, with a warning.

        Taking a checkpoint that is not kept out of the count changes nothing
        for the others (it is older than ``keep_last``, not among the best, not
        a pinned final), so the rest of the plan stands.
        """
        found = self.cache.get(victim.path, self.root, self.deep)
        if found.ok:
            return True
        self.forget(victim.path)
        if os.path.lexists(victim.path):
            self._warn_bad(found)
        return False

    def _delete(self, path: Path) -> str | None:
        """Delete one checkpoint: "deleted", "gone" (another process removed it first), or None when it could not
        be (a warning says why)."""
        trash = path.parent / hidden_name(DEL_PREFIX, path.name)
        try:
            fs.rename(str(path), str(trash))
        except FileNotFoundError:
            if os.path.lexists(path):
                raise
            log.info("checkpoint %s was already removed by someone else", path)
            self.forget(path)
            self.cache.forget(path)
            return "gone"
        except OSError as exc:
            warn(f"saverules: retention could not delete {path}: {exc}")
            return None
        self.forget(path)
        self.cache.forget(path)
        try:
            fs.rmtree(str(trash))
        except OSError as exc:
            warn(f"saverules: retention could not finish deleting {trash}: {exc}")
        log.info("retention deleted checkpoint %s", path)
        return "deleted"
