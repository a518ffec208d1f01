"""The Checkpointer measures every save's cost and reports it to the decider, so an
adaptive rule's interval follows a save cost that changes during the run."""
from __future__ import annotations

import re
import time

import pytest
import torch

import saverules
from saverules import Progress
from saverules.engine.cost import estimate
from saverules.engine.quantities import format_seconds
from saverules.torch import Checkpointer

ADAPTIVE = """
version = 1
final = false
[[rules]]
kind = "adaptive"
max_overhead = "50%"
min_every = "0.05s"
"""

STEP_SECONDS = 0.005


class SlowerAndSlower:
    """A state object whose state_dict really takes longer at every save (as a growing
    optimizer state or a slow device copy would): the k-th call (from 0) takes 20 ms * 3^k,
    up to 540 ms."""

    def __init__(self):
        self.calls = 0
        self.weights = torch.arange(1024.0)

    def delay(self, k: int) -> float:
        return 0.02 * 3 ** min(k, 3)

    def state_dict(self):
        time.sleep(self.delay(self.calls))
        self.calls += 1
        return {"weights": self.weights.clone()}

    def load_state_dict(self, state):
        self.weights = state["weights"]


class Observed:
    """The Checkpointer's decider, seen from outside: which costs were reported, and which
    were known when each decision was made (a write in flight is reported when done)."""

    def __init__(self, inner):
        self.inner = inner
        self.reports = []
        self.known_at_decision = []

    def __call__(self, progress):
        self.known_at_decision = list(self.reports)
        return self.inner(progress)

    def note_cost(self, stall, write=None):
        self.reports.append((stall, write))
        self.inner.note_cost(stall, write)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _interval(reason: str) -> str:
    match = re.fullmatch(r"adaptive\(.*, interval=([^,()]+)\)", reason)
    assert match, reason
    return match.group(1)


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_slower_save_makes_the_adaptive_interval_grow(tmp_path, async_save):
    policy = saverules.loads(ADAPTIVE)
    rule = policy.rules[0]
    slow = SlowerAndSlower()
    ckpt = Checkpointer(policy, tmp_path / "ckpt", async_save=async_save, verify="none")
    ckpt.decider = seen = Observed(ckpt.decider)
    reports = seen.reports
    saves = []  # (training clock at the save, interval named in the reason, costs known at the decision)
    step = 0
    deadline = time.monotonic() + 60
    while len(saves) < 6:
        assert time.monotonic() < deadline, f"only {len(saves)} saves in 60 s"
        step += 1
        time.sleep(STEP_SECONDS)  # a training step
        now = ckpt.clock()
        decision = ckpt.step(Progress(step, time=now), {"model": slow})
        if decision.save:
            (reason,) = decision.reasons
            saves.append((now, _interval(reason), seen.known_at_decision))
    ckpt.close()

    # every committed save was measured: the stall includes the slow state_dict, the
    # write at least the stall (equal when synchronous)
    assert len(reports) == 6
    for k, (stall, write) in enumerate(reports):
        assert stall >= slow.delay(k)
        assert write >= stall if async_save else write == stall
    assert ckpt.decider.state_dict()["costs"] == [list(r) for r in reports[-3:]]

    # each save names the interval it was planned with: from the mean of the last three
    # costs measured before it (min_every before the first)
    assert saves[0][1] == "0.05s" and saves[0][2] == []
    for _, named, known in saves:
        assert named == format_seconds(rule.interval(estimate(known)))

    # the saves grow apart: each gap is at least the interval planned for it, and that
    # interval grows with the cost (at least 2 x the slowest state_dict's mean)
    gaps = [b[0] - a[0] for a, b in zip(saves, saves[1:])]
    planned = [rule.interval(estimate(known)) for _, _, known in saves[1:]]
    for gap, t in zip(gaps, planned):
        assert gap >= t
    known = len(saves[-1][2])
    assert known >= len(saves) - 2  # an asynchronous write may still be in flight at the next decision
    assert planned[-1] >= 2 * sum(slow.delay(k) for k in range(known - 3, known)) / 3
    assert planned[-1] > 3 * planned[0] and gaps[-1] > 3 * gaps[0]


def test_the_save_cost_survives_a_resume(tmp_path):
    policy = saverules.loads(ADAPTIVE)
    slow = SlowerAndSlower()
    ckpt = Checkpointer(policy, tmp_path / "ckpt", verify="none")
    for step in range(1, 4):
        ckpt.save(Progress(step, time=float(step)), {"model": slow})
    measured = ckpt.decider.save_cost
    assert measured is not None and measured[0] >= (slow.delay(0) + slow.delay(1) + slow.delay(2)) / 3
    ckpt.close()

    resumed = Checkpointer(policy, tmp_path / "ckpt", verify="none")
    resumed.load_latest({"model": SlowerAndSlower()})
    # a checkpoint holds the decider's state from just before its own save was measured
    assert resumed.decider.state_dict()["costs"] == ckpt.decider.state_dict()["costs"][:2]
