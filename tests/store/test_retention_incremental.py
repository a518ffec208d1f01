"""Incremental retention over the writer's index decides exactly as a plan over the whole store."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

import saverules
from saverules.store.manifest import CheckpointInfo, info_from_manifest
from saverules.store.retain import Retainer, plan
from saverules.store.verify import VerifyCache

ROOT = Path("/nonexistent-saverules-store")  # never read: the index is built from an empty scan


def _policy(keep_last: int, keep_every: int | None, best: tuple[str, int] | None) -> saverules.Policy:
    text = 'version = 1\n[[rules]]\nkind = "every_steps"\nevery = 1\n[retention]\n'
    text += f"keep_last = {keep_last}\n"
    if keep_every is not None:
        text += f"keep_every = {keep_every}\n"
    if best is not None:
        text += f'keep_best = {{ metric = "loss", mode = "{best[0]}", n = {best[1]} }}\n'
    return saverules.loads(text)


def _info(step: int, loss: float | None, final: bool, total: int | None) -> CheckpointInfo:
    manifest: dict[str, Any] = {
        "step": step, "epoch": 0, "time": float(step), "utc": "2026-01-01T00:00:00+00:00",
        "reasons": ["final"] if final else ["every_steps(every=1)"], "final": final,
        "metrics": {"loss": loss} if loss is not None else None, "total_steps": total, "files": {},
    }
    return info_from_manifest(ROOT / f"step-{step:08d}", ROOT, manifest, True, None)


saves = st.lists(
    st.tuples(st.one_of(st.none(), st.sampled_from([0.5, 1.0, 1.5, 2.0, float("nan")]),
                        st.floats(0, 10, allow_nan=False)),
              st.booleans(), st.sampled_from([None, 100, 200])),
    min_size=1, max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(saves=saves, keep_last=st.integers(1, 4), keep_every=st.one_of(st.none(), st.integers(1, 5)),
       best=st.one_of(st.none(), st.tuples(st.sampled_from(["min", "max"]), st.integers(1, 3))))
def test_incremental_plan_equals_the_plan_over_the_whole_store(tmp_path_factory, saves, keep_last, keep_every,
                                                               best) -> None:
    policy = _policy(keep_last, keep_every, best)
    root = tmp_path_factory.mktemp("empty")
    retainer = Retainer(root, policy, VerifyCache(), deep=False, warned=set())
    store: list[CheckpointInfo] = []  # the oracle's store: every save, minus what the whole plan drops
    for step, (loss, final, total) in enumerate(saves, start=1):
        info = _info(step, loss, final, total)
        store.append(info)
        expected = sorted(i.path for i in plan(store, info.path, policy))
        got = retainer.plan(info)
        assert sorted(i.path for i in got) == expected, step
        for victim in got:
            retainer.forget(victim.path)
        store = [i for i in store if i.path not in set(expected)]
        assert [i.path for i in retainer.index.good()] == [i.path for i in store]
