"""SyncedDecider.note_cost: rank 0's save cost reaches every rank's decider at the next sync step.

Two ranks in one process (tests/helpers/ddp_fake.ThreadGroup: a real MAX all-reduce between
threads) with the real compiled adaptive policy; the two-process runs of the reference loop are in
test_adaptive_ddp.py.
"""
from __future__ import annotations

import json
import math

import pytest
from ddp_fake import ThreadGroup

import saverules
from saverules.distributed import SyncedDecider
from saverules.engine.progress import Progress

POLICY = saverules.loads("""
version = 1
[[rules]]
kind = "adaptive"
max_overhead = "10%"
min_every = "1s"
""")
DT = 0.05  # seconds of training clock a step: 20 steps a second, a sync every 20 steps once ramped up
TOTAL = 900
COSTS = [0.2, 0.2, 0.5, 0.5, 0.5, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3]  # rank 0's measured stalls, save by save


def interval(costs):
    """The adaptive interval, written out: max(min_every, c / max_overhead), c the mean of the last 3."""
    if not costs:
        return 1.0
    last = costs[-3:]
    return max(1.0, sum(last) / len(last) / 0.10)


def run_pair(group, total=TOTAL, rank1_cost=99.0):
    """Both ranks decide every step; after each save rank 0 reports the next of COSTS and rank 1
    an absurd cost. Per rank: the steps with (save, reasons, save_cost, sync?) and the wrapper."""

    def body(rank):
        sd = group.wrap(POLICY.compile(total), rank)
        rows = []
        saves = 0
        for step in range(1, total + 1):
            syncs = sd.syncs
            d = sd(Progress(step, total, time=step * DT))
            rows.append((step, d.save, d.reasons, sd.save_cost, sd.syncs > syncs))
            if d.save:
                sd.note_cost(COSTS[min(saves, len(COSTS) - 1)] if rank == 0 else rank1_cost)
                saves += 1
        return rows, sd

    return group.run(body)


def test_ranks_agree_and_each_save_follows_the_formula_from_rank0s_costs():
    (rows0, sd0), (rows1, sd1) = run_pair(ThreadGroup(2))
    assert rows0 == rows1  # decisions, reasons, the cost estimate and the sync steps: identical
    assert sd0.collectives == sd1.collectives == sd0.syncs  # the costs ride in the syncs: no collective of their own
    assert sd0.syncs < TOTAL / 10
    sync_steps = [s for s, *_, synced in rows0 if synced]
    saves = [s for s, save, *_ in rows0 if save]
    assert len(saves) >= 6
    assert all(c is None or c[0] < 99.0 for *_, c, _ in rows0)  # rank 1's reports are left out
    # each save: the first sync step whose clock reaches the last save's plus the planned interval,
    # the interval planned from the costs of every earlier save
    anchor = DT  # the clock starts at the first decision
    for k, step in enumerate(saves[:-1] if saves[-1] == TOTAL else saves):
        due = anchor + interval(COSTS[:k])
        expected = next(s for s in sync_steps if s * DT >= due - 1e-9)
        assert step == expected, (k, step, expected, due)
        reasons = dict((s, r) for s, _, r, *_ in rows0)[step]
        assert reasons[0].startswith("adaptive(max_overhead=10%, min_every=1s, interval=")
        anchor = step * DT
    # the estimate every rank holds is the mean of rank 0's last three reports
    est = rows0[-1][3]
    applied = COSTS[:len(saves) - 1]
    assert est is not None and math.isclose(est[0], sum(applied[-3:]) / 3)


def test_the_costs_ride_in_the_state_and_a_resume_plans_with_them():
    group = ThreadGroup(2)

    def body(rank):
        sd = group.wrap(POLICY.compile(TOTAL), rank)
        for step in range(1, 301):
            if sd(Progress(step, TOTAL, time=step * DT)) and rank == 0:
                sd.note_cost(0.4)
        state = json.loads(json.dumps(sd.state_dict()))
        again = group.wrap(POLICY.compile(TOTAL), rank)
        again.load_state_dict(state)
        return state["costs"], again.save_cost, again.inner.next_time, sd.save_cost

    (c0, e0, n0, before0), (c1, e1, n1, before1) = group.run(body)
    assert c0 == c1 and len(c0) == 3 and all(c == [0.4, 0.4] for c in c0)
    assert e0 == e1 == before0 == before1 == pytest.approx((0.4, 0.4))
    assert n0 == n1  # the same next clock threshold: the interval continues, 0.4 / 10% = 4 s


def test_a_cost_reported_after_the_last_sync_waits_for_the_next_one():
    group = ThreadGroup(2)

    def body(rank):
        sd = group.wrap(POLICY.compile(TOTAL), rank)
        for step in range(1, 41):
            sd(Progress(step, TOTAL, time=step * DT))
        if rank == 0:
            sd.note_cost(2.0, 3.0)
        held = sd.save_cost  # not applied yet, on either rank
        step = 41
        while step < sd.next_sync:  # quiet steps between syncs do not apply it
            sd(Progress(step, TOTAL, time=step * DT))
            assert sd.save_cost is None
            step += 1
        sd(Progress(step, TOTAL, time=step * DT))  # the sync step takes it before deciding
        return held, sd.save_cost

    (h0, a0), (h1, a1) = group.run(body)
    assert h0 is None and h1 is None
    assert a0 == a1 == (2.0, 3.0)


def test_single_process_reports_go_straight_to_the_decider():
    sd = SyncedDecider(POLICY.compile(100), rank=0, world_size=1)
    sd(Progress(1, 100, time=0.0))
    sd.note_cost(0.5)
    assert sd.save_cost == (0.5, 0.5)
    assert sd.inner.next_time == pytest.approx(5.0)


@pytest.mark.parametrize("rank", [0, 1])
def test_a_bad_cost_is_refused_on_every_rank(rank):
    sd = SyncedDecider(POLICY.compile(100), rank=rank, world_size=2)
    with pytest.raises(TypeError, match="stall_seconds must be a number of seconds"):
        sd.note_cost("slow")
    with pytest.raises(ValueError, match="write_seconds must be a finite number"):
        sd.note_cost(1.0, -2.0)
