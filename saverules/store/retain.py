"""Retention: once a new checkpoint is committed, delete what ``policy.retain`` drops.

The plan is made from the manifests first; only when it deletes something
are the checkpoints re-hashed (each once per process, the results are
cached) and the plan made again, so that a damaged checkpoint is never
counted in place of a good one that would go.  The checkpoint just written
always stays until the next one is committed.  A checkpoint is deleted by
renaming it to ``.del-...`` first, so a crash mid-delete never leaves a
half-deleted directory that looks like a checkpoint.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..engine.progress import Checkpoint
from .errors import CheckpointError, log, warn
from .fs import fs
from .layout import DEL_PREFIX, hidden_name
from .manifest import CheckpointInfo
from .verify import VerifyCache, scan


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
    totals = [(getattr(i, "manifest", None) or {}).get("total_steps") for i in infos]
    current = totals[-1]
    finals = [k for k, i in enumerate(infos) if i.final]
    if current is not None:
        pinned = {k for k in finals if totals[k] == current}
    else:
        pinned = set(finals[-1:])
    return [Checkpoint(i.step, i.time, i.metrics, k in pinned) for k, i in enumerate(infos)]


def retain(root: Path, newest: Path, policy: Any, cache: VerifyCache, deep: bool, warned: set) -> None:
    """Apply the policy's retention to the store ``root`` (``deep``: re-hash before deleting)."""
    plan = _plan(scan(root, verify=False), newest, policy, warned)
    if plan and deep:
        plan = _plan(scan(root, verify=True, _cache=cache), newest, policy, warned)
    for path in plan:
        _delete(path, cache)


def _plan(infos: Sequence[CheckpointInfo], newest: Path, policy: Any, warned: set) -> list[Path]:
    valid = [i for i in infos if i.ok and i.step is not None]
    for info in infos:
        if not info.ok and str(info.path) not in warned:
            warned.add(str(info.path))
            warn(
                f"saverules: checkpoint {info.path} failed verification ({info.error}); it is not counted "
                "by retention and is left on disk for you to inspect or delete"
            )
    if not valid:
        return []
    keep = policy.retain(retention_view(valid))
    if len(keep) != len(valid):
        raise CheckpointError(f"policy.retain returned {len(keep)} answers for {len(valid)} checkpoints")
    return [info.path for info, k in zip(valid, keep) if not k and info.path != newest]


def _delete(path: Path, cache: VerifyCache) -> None:
    trash = path.parent / hidden_name(DEL_PREFIX, path.name)
    try:
        fs.rename(str(path), str(trash))
    except OSError as exc:
        warn(f"saverules: retention could not delete {path}: {exc}")
        return
    cache.forget(path)
    try:
        fs.rmtree(str(trash))
    except OSError as exc:
        warn(f"saverules: retention could not finish deleting {trash}: {exc}")
    log.info("retention deleted checkpoint %s", path)
