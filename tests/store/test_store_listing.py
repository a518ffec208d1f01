"""What the store reports: latest(), list() and its training clock."""
from __future__ import annotations

import time

import pytest
import torch
from store_common import (
    policy,
    small_state,
)

import saverules
from saverules import Progress
from saverules.torch import (
    Checkpointer,
)

# --------------------------------------------------------------------------
# latest(), list(), clock()
# --------------------------------------------------------------------------


def test_latest_is_none_on_an_empty_store(tmp_path):
    ck = Checkpointer(policy(), tmp_path)
    assert ck.latest() is None
    assert ck.list() == []
    assert ck.load_latest({"model": torch.nn.Linear(3, 2)}) is None


def test_latest_and_list(tmp_path):
    ck = Checkpointer(policy(), tmp_path)
    for s in (2, 4, 6):
        ck.save(Progress(s, time=float(s), metrics={"loss": 1.0 / s}), small_state(), reason="manual")
    info = ck.latest()
    assert info.step == 6 and info.time == 6.0 and info.reasons == ("manual",) and info.verified is True
    assert info.path == tmp_path / "step-00000006"
    assert info.utc.tzinfo is not None
    assert info.size == (info.path / "state.pt").stat().st_size
    assert info.metrics == {"loss": 1.0 / 6}
    listed = ck.list()
    assert [i.step for i in listed] == [2, 4, 6]
    assert all(i.verified and i.ok and i.error is None for i in listed)
    assert listed[0].as_checkpoint() == saverules.Checkpoint(2, 2.0, {"loss": 0.5}, False)


def test_clock_is_continuous_across_resumes(tmp_path):
    ck = Checkpointer(policy(), tmp_path)
    ck._clock_offset = 100.0  # as if 100 s of training had happened already
    t = ck.clock()
    assert 100.0 <= t < 105.0
    ck.save(Progress(2, time=t), small_state())
    time.sleep(0.05)
    fresh = Checkpointer(policy(), tmp_path)
    assert fresh.clock() < 5.0
    p = fresh.load_latest(small_state())
    assert p.time == pytest.approx(t)
    c = fresh.clock()
    assert t <= c < t + 5.0
    time.sleep(0.02)
    assert fresh.clock() > c


def test_time_defaults_to_the_checkpointer_clock(tmp_path):
    ck = Checkpointer(policy(), tmp_path)
    ck._clock_offset = 50.0
    ck.save(Progress(2), small_state())
    assert 50.0 <= ck.latest().time < 55.0
