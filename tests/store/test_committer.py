"""The Committer interface: the Checkpointer saves and resumes through whichever committer it holds."""
from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping
from pathlib import Path
from typing import Any

import pytest
import torch
from store_common import EVERY_1_KEEP_2, checkpoint_dirs, policy

from saverules import Progress
from saverules.store.commit import Committer, LocalCommitter, Settle
from saverules.store.errors import CheckpointError
from saverules.store.remote.committer import TieredCommitter
from saverules.store.sharded import ShardedCommitter
from saverules.torch import Checkpointer


class Recording:
    """A third committer: the local one, with every call written down (as a new tier would be plugged in)."""

    def __init__(self, inner: LocalCommitter, fail_at: int | None = None) -> None:
        self.inner, self.writes, self.calls, self.fail_at = inner, inner.writes, [], fail_at

    def start(self, name: str, step: int, capture: Callable[[], Any]) -> tuple[str, Any, Any]:
        self.calls.append(("start", step))
        return self.inner.start(name, step, capture)

    def commit(self, name: str, step: int, manifest: Mapping[str, Any], payload: Any, handle: Any, *,
               before: Callable[[], None] | None, settle: Settle) -> None:
        self.calls.append(("commit", step))
        if step == self.fail_at:
            raise CheckpointError(f"saverules: refused step {step}. Nothing was committed")
        self.inner.commit(name, step, manifest, payload, handle, before=before, settle=settle)

    def load_latest(self, cache: Any, skip: Any, state: MutableMapping[str, Any], map_location: Any,
                    if_none_valid: str, mmap: bool) -> Any:
        self.calls.append(("load_latest", None))
        return self.inner.load_latest(cache, skip, state, map_location, if_none_valid, mmap)

    def cleanup(self) -> None:
        self.calls.append(("cleanup", None))
        self.inner.cleanup()


def test_both_committers_implement_the_protocol() -> None:
    methods = {"start", "commit", "load_latest", "cleanup"}
    for cls in (LocalCommitter, ShardedCommitter, Recording, TieredCommitter):
        assert methods <= set(dir(cls)), cls
    assert set(Committer.__annotations__) == {"writes"}


def test_a_checkpointer_saves_resumes_and_retains_through_its_committer(tmp_path: Path) -> None:
    ck = Checkpointer(policy(EVERY_1_KEEP_2), dir=tmp_path)
    rec = Recording(ck._committer.inner, fail_at=3)  # type: ignore[arg-type]
    ck._committer.inner = rec  # the committer of the local tier, inside the one that adds a durable tier
    ck._open_store()  # re-open through the new committer: its cleanup runs
    model = torch.nn.Linear(2, 2)
    for step in (1, 2):
        ck.step(Progress(step), {"model": model})
    with pytest.raises(CheckpointError, match="refused step 3"):
        ck.step(Progress(3), {"model": model})
    ck.step(Progress(4), {"model": model})
    assert checkpoint_dirs(tmp_path) == ["step-00000002", "step-00000004"]  # retention settled
    with torch.no_grad():
        model.weight.zero_()
    assert ck.load_latest({"model": model}).step == 4
    assert float(model.weight.detach().abs().sum()) > 0
    assert rec.calls == [("cleanup", None), ("start", 1), ("commit", 1), ("start", 2), ("commit", 2),
                         ("start", 3), ("commit", 3), ("start", 4), ("commit", 4), ("load_latest", None)]
    ck.close()
