"""One save as the training thread hands it to the writer: the state captured, the checkpoint named.

After the decision to save, the training thread checks what it was given
(:func:`check_inputs`), captures the state (:func:`saverules.store.state.capture`;
copied into a :class:`~saverules.store.snapshot.Snapshot` for an async save),
names the checkpoint from ``[storage].name`` and fills in every field of its
manifest but the files (:func:`prepare`).  The :class:`Job` it returns is all
the writer needs: encode, write and digest, verify, commit, retain.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from ..engine.progress import Progress
from .commit import Committer
from .errors import StateTypeError, type_name
from .manifest import metrics_of, new_manifest
from .snapshot import Snapshot
from .state import Payload, capture

__all__ = ["Job", "check_inputs", "prepare"]


@dataclasses.dataclass
class Job:
    """One save between the training thread and the writer."""

    name: str
    step: int
    manifest: dict[str, Any]
    payload: Payload | None
    snapshot: Snapshot | None = None
    handle: Any = None  # what the committer's start() returned for this save (a sharded save's temporary directory)


def check_inputs(progress: Any, state: Any) -> dict[str, float] | None:
    """Raise on a state that is not a mapping or a progress that is not a Progress; return its metrics."""
    if not isinstance(state, Mapping):
        raise StateTypeError(f"state must be a dict of names to objects and values, got {type_name(state)}")
    if not isinstance(progress, Progress):
        raise TypeError(f"progress must be a saverules.Progress, got {type_name(progress)}")
    return metrics_of(progress)


def prepare(progress: Progress, state: Mapping[str, Any], reasons: Sequence[str], *,
            metrics: dict[str, float] | None, snapshot: Snapshot | None, clock: float, policy: Any,
            run_name: str, fmt: Any, committer: Committer, decider: Any, world_size: int) -> Job:
    """In the training thread: capture the state (into ``snapshot``, when given) and name the checkpoint.

    The committer's ``start`` captures it (every rank of a sharded save, which
    agree on the name there); a format may capture in its own way (``fmt.capture``).
    """
    utc = datetime.now(timezone.utc)
    name = policy.storage.render_name(step=progress.step, epoch=progress.epoch, time=utc, run=run_name)
    grab = getattr(fmt, "capture", None) or capture
    name, payload, handle = committer.start(name, progress.step, lambda: grab(
        state, progress.step, decider.state_dict(), clock, snapshot))
    manifest = new_manifest(name=name, progress=progress, clock=clock, utc=utc, reasons=reasons,
                            metrics=metrics, policy_digest=policy.digest, storage_format=fmt.name,
                            world_size=world_size)
    return Job(name=name, step=int(progress.step), manifest=manifest, payload=payload, snapshot=snapshot, handle=handle)
