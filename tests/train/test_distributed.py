"""SyncedDecider: every rank takes the same decision, with few collectives."""
from __future__ import annotations

import json
import math
import os

import pytest
from ddp_fake import ScriptedDecider, ThreadGroup

from saverules.distributed import SyncedDecider, signal_code, signal_from_code, sync_schedule
from saverules.engine.progress import Progress

N = 1000


def ramp_schedule(total, steady, first=1):
    """The sync steps docs/distributed.md promises for a steady step rate: the first
    call, then intervals 1, 2, 4, ... doubling until they reach ``steady``
    steps, then every ``steady`` steps, plus the last step."""
    steps = [first]
    k = 1
    s = first
    while True:
        s = s + k
        if s >= total:
            break
        steps.append(s)
        k = min(2 * k, steady)
    steps.append(total)
    return steps


def drive(group, make_decider, clock, total=N, signal_at=None, metrics_every=None, metric_value=None, **kw):
    """Run ``total`` steps on every rank; return per rank (decisions, wrapper, inner)."""

    def body(rank):
        inner = make_decider()
        sd = group.wrap(inner, rank, **kw)
        out = []
        for step in range(1, total + 1):
            sig = "SIGUSR1" if signal_at is not None and (step, rank) == signal_at else False
            metrics = None
            if metrics_every and step % metrics_every == 0:
                metrics = {"loss": metric_value(step, rank)}
            d = sd(Progress(step, total, 0, step == total, step == total, clock(step, rank), metrics, sig))
            out.append((step, d.save, d.reasons))
        return out, sd, inner

    return group.run(body)


def saved(decisions):
    return [(s, r) for s, ok, r in decisions if ok]


def test_step_only_policy_needs_no_collective():
    group = ThreadGroup(2)
    res = drive(group, lambda: ScriptedDecider(every=100), clock=lambda s, r: s * 0.01 * (1 + r))
    (d0, w0, _), (d1, w1, _) = res
    assert w0.deterministic and w1.deterministic
    assert d0 == d1
    assert [s for s, _ in saved(d0)] == list(range(100, N + 1, 100))
    assert w0.collectives == 0 and w1.collectives == 0
    assert group.calls == 0


def test_skewed_clocks_agree_on_rank0_time():
    group = ThreadGroup(2)
    # rank 0 runs 128 steps per second (exact binary fractions); rank 1's
    # clock runs three times as fast and starts 1000 s ahead.
    clock = lambda s, r: s / 128 if r == 0 else 1000 + 3 * s / 128
    (d0, w0, i0), (d1, w1, i1) = drive(group, lambda: ScriptedDecider(every=250, seconds=2.0), clock)
    assert d0 == d1
    # Every time the inner deciders saw is a reading of rank 0's clock, taken
    # at the last sync step at or before the step.
    sync_steps = ramp_schedule(N, 128)
    assert w0.syncs == w1.syncs == len(sync_steps)
    for p0, p1 in zip(i0.seen, i1.seen):
        assert p0 == p1
        last_sync = max(t for t in sync_steps if t <= p0.step)
        assert p0.time == last_sync / 128
    # Lateness: a time save comes at the first sync step at or after the step
    # where rank 0's clock crossed the threshold, less than one interval late.
    saves = saved(d0)
    time_saves = [s for s, r in saves if any(x.startswith("every_time") for x in r)]
    assert len(time_saves) >= 3, saves
    for s in time_saves:
        prev = max(t for t, _ in saves if t < s)
        t_prev = i0.seen[prev - 1].time
        due = next(t for t in range(prev + 1, N + 1) if t / 128 - t_prev >= 2.0)
        assert s == min(t for t in sync_steps if t >= due)
        assert s - due < 128


def test_sync_schedule_and_collective_count_match_the_documented_ramp():
    group = ThreadGroup(2)
    clock = lambda s, r: s / 128 + 5.0 * r  # 128 steps per second on rank 0
    (d0, w0, i0), (d1, w1, _) = drive(group, lambda: ScriptedDecider(seconds=3600.0, signals=True), clock)
    expected = ramp_schedule(N, 128)
    # The steps where the inner decider got a fresh time are the sync steps.
    fresh = [p.step for p in i0.seen if p.time == p.step / 128]
    assert fresh == expected
    assert w0.collectives == w1.collectives == len(expected) == 15


def test_fast_steps_sync_about_once_per_second():
    group = ThreadGroup(2)
    clock = lambda s, r: s * 1e-4  # 10k steps/s: 20k steps are 2 s of training
    total = 20000
    (d0, w0, _), (d1, w1, _) = drive(group, lambda: ScriptedDecider(signals=True), clock, total=total)
    expected = ramp_schedule(total, 10000)
    assert w0.collectives == len(expected)
    # ramp 1,2,4,...,8192 then the last step: far below one per step
    assert w0.collectives <= 2 + math.ceil(math.log2(10000)) + math.ceil(total * 1e-4)


def test_signal_on_one_rank_is_acted_on_by_all_at_the_next_sync():
    group = ThreadGroup(2)
    clock = lambda s, r: s * 0.01 + 7.0 * r
    (d0, w0, _), (d1, w1, _) = drive(
        group, lambda: ScriptedDecider(signals=True, final=False), clock, signal_at=(437, 1)
    )
    assert d0 == d1
    sig = [(s, r) for s, r in saved(d0)]
    assert len(sig) == 1
    step, reasons = sig[0]
    sync_steps = ramp_schedule(N, 100)
    assert step == min(t for t in sync_steps if t >= 437)
    assert step - 437 < 100
    assert reasons == ("on_signal(SIGUSR1)",)


def run_with_signals(group, make_decider, signals, total=200, step_seconds=0.01, **kw):
    """Drive ``total`` steps; ``signals`` maps (step, rank) to a signal name.
    Returns per rank the list of (step, save, reasons, last_signal, last_signals)."""

    def body(rank):
        sd = group.wrap(make_decider(), rank, **kw)
        out = []
        for step in range(1, total + 1):
            sig = signals.get((step, rank), False)
            d = sd(Progress(step, total, 0, step == total, step == total, step * step_seconds + 3.0 * rank,
                            None, sig))
            out.append((step, d.save, d.reasons, sd.last_signal, sd.last_signals))
        return out, sd

    return group.run(body)


def test_different_signals_on_two_ranks_agree_and_sigterm_comes_first():
    group = ThreadGroup(2)
    # rank 0 gets SIGUSR1, rank 1 SIGTERM, both before the same sync step
    (o0, w0), (o1, w1) = run_with_signals(
        group, lambda: ScriptedDecider(signals=True, final=False), {(20, 0): "SIGUSR1", (21, 1): "SIGTERM"})
    assert o0 == o1
    acted = [(s, reasons, sig, sigs) for s, save, reasons, sig, sigs in o0 if sigs]
    sync = min(t for t in ramp_schedule(200, 100) if t >= 21)
    assert acted == [(sync, ("on_signal(SIGTERM)",), "SIGTERM", ("SIGTERM", "SIGUSR1"))]


def test_a_later_sigterm_on_the_same_rank_is_not_hidden_by_an_earlier_sigusr1():
    group = ThreadGroup(2)
    (o0, _), (o1, _) = run_with_signals(
        group, lambda: ScriptedDecider(signals=True, final=False), {(40, 1): "SIGUSR1", (41, 1): "SIGTERM"})
    assert o0 == o1
    acted = [(s, sig, sigs) for s, _, _, sig, sigs in o0 if sigs]
    assert len(acted) == 1
    assert acted[0][1:] == ("SIGTERM", ("SIGTERM", "SIGUSR1"))


def test_sync_signals_agrees_on_signals_for_a_step_only_policy():
    group = ThreadGroup(2)
    make = lambda: ScriptedDecider(every=50)
    # without sync_signals: no collective, each rank sees only its own signal
    (p0, q0), (p1, q1) = run_with_signals(group, make, {(30, 1): "SIGTERM"})
    assert q0.deterministic and q0.collectives == q1.collectives == 0
    assert [s for s, *_, sigs in p1 if sigs] == [30] and not any(sigs for *_, sigs in p0)
    # with it: the same decisions, and the signal reaches both ranks at the same sync step
    (o0, w0), (o1, w1) = run_with_signals(ThreadGroup(2), make, {(30, 1): "SIGTERM"}, sync_signals=True)
    assert not w0.deterministic
    assert o0 == o1
    assert [(s, ok) for s, ok, *_ in o0] == [(s, ok) for s, ok, *_ in p0]
    sync = min(t for t in ramp_schedule(200, 100) if t >= 30)
    assert [(s, sig) for s, _, _, sig, _ in o0 if sig] == [(sync, "SIGTERM")]
    assert w0.collectives == w1.collectives == len(ramp_schedule(200, 100))


@pytest.mark.parametrize("rate", [1, 3, 8, 100, 128, 10000])
def test_sync_schedule_is_the_documented_ramp(rate):
    assert sync_schedule(N, 1 / rate) == ramp_schedule(N, rate)


def test_sync_schedule_predicts_the_collectives_of_a_run():
    group = ThreadGroup(2)
    for rate, cap in ((50, None), (2.5, None), (1000, 64)):
        kw = {} if cap is None else {"max_interval": cap}
        (_, w0, _), (_, w1, _) = drive(group, lambda: ScriptedDecider(seconds=30.0, signals=True),
                                       lambda s, r: s / rate + 9.0 * r, **kw)
        expected = sync_schedule(N, 1 / rate, **kw)
        assert w0.collectives == w1.collectives == w0.syncs == len(expected)
        if cap:
            assert max(b - a for a, b in zip(expected, expected[1:])) <= cap


@pytest.mark.parametrize("step_seconds", [0.4, 0.3, 0.07, 0.0123])
def test_steady_syncs_are_at_least_sync_seconds_apart_and_less_than_one_step_more(step_seconds):
    steps = sync_schedule(5000, step_seconds)
    gaps = [(b - a) * step_seconds for a, b in zip(steps, steps[1:-1])]
    steady = gaps[len(gaps) // 2:]
    assert all(1.0 - 1e-9 <= g < 1.0 + step_seconds for g in steady), steady
    # the ramp before that has at most log2(steps per second) + 2 syncs
    ramp = [g for g in gaps if g < 1.0 - 1e-9]
    assert len(ramp) <= math.log2(1 / step_seconds) + 2


def test_sync_schedule_after_a_resume_and_its_arguments():
    assert sync_schedule(20, 1.0, start_step=10) == [11, 12, 13, 14, 15, 16, 17, 18, 19, 20]
    assert sync_schedule(100, 0.1, sync_seconds=2.0, start_step=50) == [51, 52, 54, 58, 66, 82, 100]
    assert sync_schedule(1, 0.5) == [1]
    for bad in (dict(total_steps=0, step_seconds=1.0), dict(total_steps=5, step_seconds=-1.0),
                dict(total_steps=5, step_seconds=1.0, sync_seconds=0),
                dict(total_steps=5, step_seconds=1.0, start_step=5),
                dict(total_steps=5, step_seconds=1.0, max_interval=0)):
        with pytest.raises(ValueError):
            sync_schedule(**bad)


def test_signal_just_before_the_end_is_not_lost():
    group = ThreadGroup(2)
    (d0, _, _), (d1, _, _) = drive(
        group, lambda: ScriptedDecider(signals=True, final=False), lambda s, r: s * 0.01, signal_at=(999, 1)
    )
    assert d0 == d1
    assert saved(d0) == [(N, ("on_signal(SIGUSR1)",))]


def test_metric_steps_sync_and_use_rank0_metrics():
    group = ThreadGroup(2)
    # rank 1 reports a different, ever-improving loss; rank 0's improves only
    # until step 300.
    value = lambda s, r: (1000 - s) if r == 1 else abs(300 - s) + 1
    (d0, w0, i0), (d1, w1, i1) = drive(
        group,
        lambda: ScriptedDecider(metric="loss", final=False),
        lambda s, r: s * 0.01,
        metrics_every=50,
        metric_value=value,
    )
    assert d0 == d1
    assert [s for s, _ in saved(d0)] == [50, 100, 150, 200, 250, 300]
    for p in i1.seen:
        if p.metrics is not None:
            assert p.metrics == {"loss": value(p.step, 0)}
    # a metric sync is one all-reduce plus one object broadcast
    metric_syncs = N // 50
    assert w0.collectives == w1.collectives
    assert w0.collectives >= 2 * metric_syncs


def test_metrics_synced_needs_no_extra_collective():
    group = ThreadGroup(2)
    (d0, w0, _), (d1, w1, _) = drive(
        group,
        lambda: ScriptedDecider(metric="loss", final=False),
        lambda s, r: s * 0.01,
        metrics_every=10,
        metric_value=lambda s, r: abs(500 - s),
        metrics_synced=True,
    )
    assert d0 == d1
    assert [s for s, _ in saved(d0)] == list(range(10, 501, 10))
    # metric rules only: only the first call and the last step sync, plus the ramp
    assert w0.collectives == len(ramp_schedule(N, 100))


def test_max_interval_caps_the_gap():
    group = ThreadGroup(2)
    (_, w0, i0), _ = drive(
        group, lambda: ScriptedDecider(signals=True), lambda s, r: s * 1e-5, max_interval=64
    )
    fresh = [p.step for p in i0.seen if p.time is not None and math.isclose(p.time, p.step * 1e-5)]
    gaps = [b - a for a, b in zip(fresh, fresh[1:])]
    assert max(gaps) <= 64


def test_state_dict_is_the_inner_state_and_resume_syncs_first():
    group = ThreadGroup(2)

    def body(rank):
        inner = ScriptedDecider(seconds=1.0)
        sd = group.wrap(inner, rank)
        for step in range(1, 301):
            sd(Progress(step, 600, time=step * 0.01 * (1 + rank)))
        state = sd.state_dict()
        assert state == inner.state_dict()
        inner2 = ScriptedDecider(seconds=1.0)
        sd2 = group.wrap(inner2, rank)
        sd2.load_state_dict(json.loads(json.dumps(state)))
        before = sd2.collectives
        sd2(Progress(301, 600, time=3.01 * (1 + rank)))
        return state, sd2.collectives - before, sd2.next_sync

    (s0, c0, n0), (s1, c1, n1) = group.run(body)
    assert s0 == s1
    assert c0 == c1 == 1
    assert n0 == n1 == 302


def test_note_save_uses_the_synced_clock():
    group = ThreadGroup(2)

    def body(rank):
        inner = ScriptedDecider(seconds=100.0)
        sd = group.wrap(inner, rank)
        for step in range(1, 11):
            sd(Progress(step, 100, time=step * 1.0 + rank * 50))
        sd.note_save(10, time=10.0 + rank * 50)
        return inner.last_time, sd.next_sync

    (t0, n0), (t1, n1) = group.run(body)
    assert t0 == t1
    assert n0 == n1


def test_single_process_is_a_pass_through():
    inner = ScriptedDecider(seconds=1.0, signals=True)
    sd = SyncedDecider(inner, rank=0, world_size=1)
    assert sd.deterministic
    d = sd(Progress(5, 10, time=3.0, signal="SIGTERM"))
    assert d.save and d.reasons == ("on_signal(SIGTERM)",)
    assert sd.collectives == 0
    assert sd.watches_time and sd.watches_signals and not sd.watches_metrics


def test_bad_arguments():
    with pytest.raises(ValueError, match="sync_seconds"):
        SyncedDecider(ScriptedDecider(), rank=0, world_size=2, sync_seconds=0)
    with pytest.raises(ValueError, match="max_interval"):
        SyncedDecider(ScriptedDecider(), rank=0, world_size=2, max_interval=0)


@pytest.mark.parametrize("sig", [True, "SIGTERM", "sigusr1", "USR1", 15, "NOT_A_SIGNAL"])
def test_signal_codes_round_trip(sig):
    code = signal_code(sig)
    back = signal_from_code(code)
    if sig is True or sig == "NOT_A_SIGNAL":
        assert code == -1 and back is True
    else:
        assert code > 0 and back.startswith("SIG")
        assert signal_code(back) == code
    assert signal_code(False) == 0 and signal_from_code(0) is False


# -- real gloo process group ----------------------------------------------------


def _gloo_worker(rank, world, tmpdir, store_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    try:
        inner = ScriptedDecider(every=300, seconds=1.5, signals=True, metric="loss")
        sd = SyncedDecider(inner)
        assert sd.rank == rank and sd.world_size == world and not sd.deterministic
        out = []
        total = 800
        for step in range(1, total + 1):
            t = step * 0.01 if rank == 0 else 500.0 + step * 0.02  # skewed clock on rank 1
            sig = "SIGTERM" if (step == 333 and rank == 1) else False
            metrics = {"loss": float((step * 7 + rank * 13) % 101)} if step % 100 == 0 else None
            d = sd(Progress(step, total, 0, step == total, step == total, t, metrics, sig))
            out.append([step, d.save, list(d.reasons)])
        with open(os.path.join(tmpdir, f"rank{rank}.json"), "w") as f:
            json.dump({"decisions": out, "collectives": sd.collectives, "syncs": sd.syncs,
                       "times": [p.time for p in inner.seen]}, f)
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_agree(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_gloo_worker, args=(2, str(tmp_path), str(tmp_path / "store")), nprocs=2, join=True)
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["decisions"] == r1["decisions"]
    assert r0["times"] == r1["times"]
    saves = [(s, tuple(r)) for s, ok, r in r0["decisions"] if ok]
    steps = [s for s, _ in saves]
    assert 300 in steps and 600 in steps and 800 in steps
    # the signal on rank 1 at step 333 is saved on both ranks within one interval
    sig_steps = [s for s, r in saves if any("on_signal" in x for x in r)]
    assert len(sig_steps) == 1 and 333 <= sig_steps[0] < 333 + 100
    # metric steps 100..800 each cost 2 calls; the ramp and the last step are shared
    metric_steps = set(range(100, 801, 100))
    ramp = set(ramp_schedule(800, 100))
    assert r0["collectives"] == r1["collectives"]
    assert r0["collectives"] <= len(ramp | metric_steps) + len(metric_steps)
    assert r0["syncs"] == r1["syncs"] <= len(ramp | metric_steps)


# -- with the real engine ---------------------------------------------------------

POLICY = """
version = 1
final = true

[[rules]]
kind = "every_steps"
every = 300

[[rules]]
kind = "every_time"
every = "2s"

[[rules]]
kind = "on_signal"
signals = ["SIGTERM", "SIGUSR1"]

[[rules]]
kind = "improved"
metric = "loss"
mode = "min"
"""


def test_real_policy_skewed_clocks_signal_on_one_rank():
    import saverules

    group = ThreadGroup(2)
    policy = saverules.loads(POLICY)
    clock = lambda s, r: s / 128 if r == 0 else 1000 + 3 * s / 128
    value = lambda s, r: float((s * 7 + r * 13) % 101)

    def make():
        return policy.compile(total_steps=N)

    res = drive(group, make, clock, signal_at=(437, 1), metrics_every=100, metric_value=value)
    (d0, w0, i0), (d1, w1, i1) = res
    assert not w0.deterministic
    assert d0 == d1
    saves = saved(d0)
    steps = [s for s, _ in saves]
    assert {300, 600, 900, N} <= set(steps)
    sig = [s for s, r in saves if any(x.startswith("on_signal") for x in r)]
    assert len(sig) == 1 and 437 <= sig[0] < 437 + 128
    assert w0.state_dict() == w1.state_dict() == i0.state_dict()
    # metric steps force a sync: 10 metric steps, each one all-reduce and one broadcast
    ramp = set(ramp_schedule(N, 128))
    metric_steps = set(range(100, N + 1, 100))
    assert w0.syncs == w1.syncs
    assert w0.collectives == w1.collectives == w0.syncs + len(metric_steps)
    assert w0.syncs <= len(ramp | metric_steps) + 1


def test_real_step_only_policy_is_collective_free():
    import saverules

    group = ThreadGroup(2)
    policy = saverules.loads('version = 1\nfinal = true\n[[rules]]\nkind = "every_steps"\nevery = 250\n')
    (d0, w0, _), (d1, w1, _) = drive(group, lambda: policy.compile(total_steps=N), lambda s, r: s * 0.1 * (r + 1))
    assert w0.deterministic and w0.collectives == 0 and w1.collectives == 0
    assert d0 == d1 and [s for s, _ in saved(d0)] == [250, 500, 750, 1000]


def test_the_collective_table_in_the_docs_is_what_sync_schedule_gives():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "distributed.md").read_text()
    rows = re.findall(r"^\| ([\d.]+) (s|ms)\b[^|]*\| [\d.]+ \| (\d+) \| (\d+)\b", text, re.M)
    assert len(rows) >= 5
    for value, unit, first, steady in rows:
        step_seconds = float(value) / (1000 if unit == "ms" else 1)
        assert len(sync_schedule(1000, step_seconds)) == int(first), (value, unit)
        # steady training: syncs per 1000 steps over a long run, the ramp and the last step left out
        per_1000 = (len(sync_schedule(200_000, step_seconds)) - len(sync_schedule(1000, step_seconds))) / 199
        assert abs(per_1000 - int(steady)) < 1, (value, unit, per_1000)
