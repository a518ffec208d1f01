"""Properties of the engine over generated policies and runs, checked against the
naive interpreter in tests/helpers/oracle.py.

Run with HYPOTHESIS_PROFILE=thorough for 2000 examples per property.
"""
from __future__ import annotations

import json
import math

from hypothesis import given
from hypothesis import strategies as st
from oracle import Oracle, oracle_retain, oracle_simulation, steps_of
from strategies import (
    METRICS,
    durations,
    has_shares,
    intervals,
    metric_functions,
    policy_docs,
    progress_sequences,
    replay,
    retentions,
    shares,
    step_counts,
    step_policy_docs,
    step_rules,
)

from saverules import Checkpoint, Policy, PolicyError, Progress
from saverules.engine.policy import Retention
from saverules.engine.simulate import progress_at

totals = st.integers(1, 10**6)
small_totals = st.one_of(st.integers(1, 60), st.integers(1, 600), st.integers(1, 3000))
step_seconds = st.none() | st.floats(0.01, 120, allow_nan=False) | st.sampled_from([0.4, 1.0, 0.1, 3.0])


def _run_engine(policy, items, total):
    """The engine's saves, or the index of the item at which it raised PolicyError."""
    decider = policy.compile(total)
    saves = []
    for i, item in enumerate(items):
        if isinstance(item, tuple):
            decider.note_save(item[1], item[2])
            continue
        try:
            d = decider(item)
        except PolicyError:
            return saves, i
        if d.save:
            saves.append((item.step, d.reasons))
    return saves, None


def _run_oracle(policy, items, total):
    oracle = Oracle(policy, total)
    saves = []
    for i, item in enumerate(items):
        if isinstance(item, tuple):
            oracle.note_save(item[1], item[2])
            continue
        try:
            save, reasons = oracle.decide(item)
        except PolicyError:
            return saves, i
        if save:
            saves.append((item.step, reasons))
    return saves, None


@st.composite
def sim_cases(draw, final=None, long_max=10**6):
    """(policy doc, total, steps_per_epoch, step_seconds, long) for a simulation.

    Short runs take any policy.  Long runs (up to ``long_max`` steps) take a
    sparse one, so that a simulation that must visit every firing stays quick.
    """
    long = draw(st.integers(0, 3)) == 0
    if long:
        total = draw(st.integers(5001, long_max))
        doc = draw(policy_docs(with_shares=True, final=final, sparse=True))
        steps_per_epoch = draw(st.none() | st.integers(max(1, total // 300), 10**6))
        seconds = draw(st.none() | st.floats(0.01, 2, allow_nan=False))
    else:
        total = draw(st.integers(1, 60) | st.integers(1, 5000))
        doc = draw(policy_docs(with_shares=True, final=final))
        steps_per_epoch = draw(st.none() | st.integers(1, 50) | st.integers(1, 5000))
        seconds = draw(step_seconds)
    return doc, total, steps_per_epoch, seconds, long


@st.composite
def policy_and_run(draw, max_len=40):
    """A policy, a run total (or None: the loop does not know it) and a progress sequence."""
    total = draw(st.none() | totals | st.integers(1, 200) | st.integers(1, 60))
    shares_ok = total is not None or draw(st.integers(0, 4)) == 0  # shares with no total must raise
    doc = draw(policy_docs(with_shares=shares_ok, run=True) | step_policy_docs())
    items = draw(progress_sequences(total, max_len=max_len))
    compile_total = total if draw(st.booleans()) else None
    return doc, total, compile_total, items


# -- the decider against the oracle --------------------------------------------------


@given(policy_and_run())
def test_decider_matches_oracle_on_any_progress_sequence(case):
    doc, total, compile_total, items = case
    policy = Policy.model_validate(doc)
    engine = _run_engine(policy, items, compile_total)
    assert engine == _run_oracle(policy, items, compile_total)
    if engine[1] is not None:  # refused: a share of the run, with no total known yet
        assert has_shares(doc) and compile_total is None
        assert all(isinstance(i, tuple) or i.total_steps is None for i in items[: engine[1] + 1])


@st.composite
def step_runs(draw):
    """Short runs of crossing rules nested in all / any / not, with jumps of a few steps:
    where a jump may cross the multiples of two children at once."""
    total = draw(st.integers(1, 120))
    steps, step = [], 0
    for _ in range(draw(st.integers(1, 40))):
        step += draw(st.integers(1, 3) | st.integers(1, 12))
        steps.append(step)
    items = [Progress(s, total if draw(st.booleans()) else None) for s in steps]
    return draw(step_policy_docs()), total, items


@given(step_runs())
def test_combinators_of_step_rules_match_the_oracle_when_steps_jump(case):
    doc, total, items = case
    policy = Policy.model_validate(doc)
    assert _run_engine(policy, items, total) == _run_oracle(policy, items, total)


@given(step_policy_docs(), st.integers(1, 300), st.none() | st.integers(1, 40))
def test_simulation_of_step_rules_equals_oracle_brute_force(doc, total, steps_per_epoch):
    policy = Policy.model_validate(doc)
    assert policy.simulate(total, steps_per_epoch).saves == oracle_simulation(policy, total, steps_per_epoch).saves


# -- the simulation against per-step brute force -----------------------------------------


@given(
    policy_docs(with_shares=True) | step_policy_docs(),
    small_totals,
    st.none() | st.integers(1, 700),
    step_seconds,
    metric_functions(),
)
def test_simulate_equals_oracle_brute_force(doc, total, steps_per_epoch, seconds, metrics):
    policy = Policy.model_validate(doc)
    sim = policy.simulate(total, steps_per_epoch, seconds, metrics)
    ref = oracle_simulation(policy, total, steps_per_epoch, seconds, metrics)
    assert sim.saves == ref.saves
    assert sim.kept == ref.kept
    assert sim.max_gap_steps == ref.max_gap_steps
    assert sim.max_gap_seconds == ref.max_gap_seconds
    assert sim.peak_kept == ref.peak_kept
    assert sim.peak_on_disk == ref.peak_on_disk
    assert sum(sim.fired.values()) == sum(len(r) for _, r in ref.saves)


@given(sim_cases(long_max=40_000))
def test_simulate_equals_the_decider_asked_at_every_step(case):
    """Longer runs than the oracle can walk: the event-driven simulation against the
    real decider called once per step, as a training loop calls it."""
    doc, total, steps_per_epoch, seconds, _ = case
    policy = Policy.model_validate(doc)
    sim = policy.simulate(total, steps_per_epoch, seconds)
    decider = policy.compile(total)
    saves = []
    for step in range(1, total + 1):
        d = decider(progress_at(step, total, steps_per_epoch, seconds))
        if d.save:
            saves.append((step, d.reasons))
    assert sim.saves == saves


# -- the final guarantee ----------------------------------------------------------------


@st.composite
def final_runs(draw):
    known = draw(st.booleans())
    total = draw(totals | st.integers(1, 100))
    doc = draw(policy_docs(with_shares=known, final=True))
    # steps that jump, ending exactly at the last step
    cuts = draw(st.lists(st.integers(1, total), max_size=30)) + draw(
        st.lists(st.integers(max(1, total - 50), total), max_size=10)
    )
    steps = sorted(set(cuts) | {total})
    clock = draw(st.booleans())
    seconds = draw(st.floats(0.01, 60, allow_nan=False))
    progresses = [
        Progress(
            step,
            total_steps=total if known else None,
            is_last=True if step == total and (not known or draw(st.booleans())) else None,
            time=step * seconds if clock else None,
            epoch_end=draw(st.integers(0, 5)) == 0,
            signal=draw(st.sampled_from([False, False, False, "SIGTERM", True])),
            metrics={"val_loss": draw(st.floats(0, 5))} if draw(st.integers(0, 5)) == 0 else None,
        )
        for step in steps
    ]
    resume = draw(st.integers(0, len(progresses)))
    how = draw(st.sampled_from(["state", "fresh"]))
    return doc, total, known, progresses, resume, how


@given(final_runs())
def test_final_step_is_saved_exactly_once(case):
    doc, total, known, progresses, resume, how = case
    policy = Policy.model_validate(doc)
    first = policy.compile(total if known else None)
    saves = replay(first, progresses[:resume])
    second = policy.compile(total if known else None)
    if how == "state":
        second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    saves += replay(second, progresses[resume:])
    at_end = [reasons for step, reasons in saves if step == total]
    assert len(at_end) == 1, saves
    assert "final" in at_end[0]
    assert all(step <= total for step, _ in saves)


@given(sim_cases(final=True))
def test_simulation_always_ends_with_the_final_step(case):
    doc, total, steps_per_epoch, seconds, _ = case
    sim = Policy.model_validate(doc).simulate(total, steps_per_epoch, seconds)
    assert sim.saves[-1][0] == total and "final" in sim.saves[-1][1]
    assert sim.saved_steps.count(total) == 1
    assert sim.saved_steps == sorted(set(sim.saved_steps))
    assert total in sim.kept


# -- resume ----------------------------------------------------------------------------


@given(policy_and_run(), st.data())
def test_resume_from_a_json_state_dict_changes_no_later_decision(case, data):
    doc, total, compile_total, items = case
    policy = Policy.model_validate(doc)
    cut = data.draw(st.integers(0, len(items)), label="cut")
    whole = policy.compile(compile_total)
    for item in items[:cut]:
        if isinstance(item, tuple):
            whole.note_save(item[1], item[2])
        else:
            _outcome(whole, item)
    state = json.loads(json.dumps(whole.state_dict()))
    assert state["version"] == 2
    resumed = policy.compile(data.draw(st.sampled_from([compile_total, None]), label="resumed_total"))
    resumed.load_state_dict(state)
    for item in items[cut:]:
        if isinstance(item, tuple):
            whole.note_save(item[1], item[2])
            resumed.note_save(item[1], item[2])
            continue
        assert _outcome(resumed, item) == _outcome(whole, item), item
    assert resumed.state_dict() == whole.state_dict()


def _outcome(decider, progress):
    try:
        return decider(progress)
    except PolicyError:  # a share of the run while no total is known: both must refuse
        return "refused"


# -- gaps --------------------------------------------------------------------------------


@given(sim_cases(), st.data())
def test_every_steps_never_leaves_a_gap_larger_than_every(case, data):
    doc, total, steps_per_epoch, seconds, long = case
    every = data.draw(intervals(True, sparse=long), label="every")
    doc = {**doc, "rules": list(doc["rules"]) + [{"kind": "every_steps", "every": every}]}
    policy = Policy.model_validate(doc)
    sim = policy.simulate(total, steps_per_epoch, seconds)
    resolved = steps_of(policy.rules[-1].every, total)
    assert sim.max_gap_steps <= resolved
    points = [0] + sim.saved_steps + [total]
    assert all(b - a <= resolved for a, b in zip(points, points[1:]))


@given(policy_docs(with_shares=True), durations, st.integers(1, 1500), st.data())
def test_every_time_never_leaves_more_than_every_plus_one_step_unsaved(doc, every, total, data):
    """With an irregular clock, asked at every step: between two saves (or the first
    decision and the first save) the clock advances by less than `every` plus the last step."""
    doc = {**doc, "rules": list(doc["rules"]) + [{"kind": "every_time", "every": every}]}
    policy = Policy.model_validate(doc)
    seconds = policy.rules[-1].every.seconds
    durations_ = data.draw(
        st.lists(
            st.floats(0, seconds * 1.5, allow_nan=False) | st.just(0.0) | st.floats(0, 3 * seconds, allow_nan=False),
            min_size=total,
            max_size=total,
        ),
        label="step durations",
    )
    decider = policy.compile(total)
    clock = data.draw(st.floats(0, 10**5, allow_nan=False), label="start")
    anchor = None
    previous_time = None
    for step, dt in zip(range(1, total + 1), durations_):
        clock += dt
        save = decider(Progress(step, total, time=clock)).save
        if anchor is None:
            anchor = clock  # the first decision starts the interval
        elif previous_time is not None:
            # the step before this one was still inside the interval
            assert previous_time < anchor + seconds
            assert clock - anchor < seconds + (clock - previous_time) + 1e-6 * max(1.0, clock)
        if save:
            anchor = clock
            previous_time = None
        else:
            previous_time = clock
            # an unsaved step is one at which less than `every` has passed
            assert clock < anchor + seconds


# -- tail ----------------------------------------------------------------------------------


@given(sim_cases(), st.one_of(step_counts(), shares()))
def test_tail_halves_the_distance_to_the_end_with_each_save(case, interval):
    doc, total, steps_per_epoch, seconds, _ = case
    doc = {**doc, "rules": list(doc["rules"]) + [{"kind": "tail", "interval": interval}]}
    policy = Policy.model_validate(doc)
    tail_reason = f"tail(interval={interval})"
    resolved = steps_of(policy.rules[-1].interval, total)
    sim = policy.simulate(total, steps_per_epoch, seconds)
    zone_start = total - resolved
    last = 0
    for step, reasons in sim.saves:
        if tail_reason in reasons:
            a = max(last, zone_start)
            assert total - step <= (total - a) // 2
            assert step > zone_start
        last = step


@given(st.one_of(step_counts(), shares()), totals)
def test_tail_alone_reaches_the_final_step(interval, total):
    policy = Policy.model_validate({"version": 1, "final": False, "rules": [{"kind": "tail", "interval": interval}]})
    sim = policy.simulate(total)
    assert sim.saved_steps[-1] == total
    distances = [total - s for s in sim.saved_steps]
    zone = min(total, steps_of(policy.rules[0].interval, total))
    bound = zone
    for d in distances:  # each save at least halves what was left
        assert d <= bound // 2 if bound > 1 else d == 0
        bound = d


# -- retention ------------------------------------------------------------------------------


@st.composite
def checkpoint_lists(draw):
    n = draw(st.integers(0, 25))
    steps = sorted(set(draw(st.lists(st.integers(1, 10**5) | st.integers(1, 200), min_size=n, max_size=n))))
    value = st.floats(-3, 3, allow_nan=False) | st.sampled_from([0.0, 1.0, 1.0]) | st.just(math.nan)
    out = []
    final_last = draw(st.booleans())
    for i, step in enumerate(steps):
        metrics = draw(st.none() | st.fixed_dictionaries({}, optional={m: value for m in METRICS}))
        out.append(Checkpoint(step, float(step), metrics, final_last and i == len(steps) - 1))
    return out


def _best_index(retention, checkpoints):
    best = retention.keep_best
    found = None
    for i, c in enumerate(checkpoints):
        v = (c.metrics or {}).get(best.metric)
        if v is None or not math.isfinite(v):
            continue
        if found is None or (v < found[0] if best.mode == "min" else v > found[0]):
            found = (v, i)  # strict: on a tie the earlier one stays best
    return None if found is None else found[1]


@given(st.none() | retentions.map(Retention.model_validate), checkpoint_lists())
def test_retention_invariants(retention, checkpoints):
    policy = Policy(version=1, retention=retention)
    mask = policy.retain(checkpoints)
    why = policy.explain_retention(checkpoints)
    assert len(mask) == len(checkpoints) == len(why)
    assert mask == [bool(w) for w in why]
    assert mask == oracle_retain(retention, checkpoints)
    if not checkpoints:
        return
    assert mask[-1]  # the newest
    assert all(keep for keep, c in zip(mask, checkpoints) if c.final)
    if retention is None:
        assert all(mask)
        return
    assert sum(mask[-retention.keep_last:]) == min(retention.keep_last, len(checkpoints))
    if retention.keep_best is not None:
        best = _best_index(retention, checkpoints)
        if best is not None:
            assert mask[best] and "keep_best" in why[best]
    # the masks are ORed: the whole table keeps exactly what its rules keep one by one
    parts = [Retention(keep_last=retention.keep_last)]
    if retention.keep_every is not None:
        parts.append(Retention(keep_every=retention.keep_every))
    if retention.keep_best is not None:
        parts.append(Retention(keep_best=retention.keep_best))
    ored = [any(col) for col in zip(*(Policy(version=1, retention=r).retain(checkpoints) for r in parts))]
    assert mask == ored
    # keep_last alone, the default of 1: the newest and the final ones only
    lone = Policy(version=1, retention=Retention()).retain(checkpoints)
    assert lone == [i == len(checkpoints) - 1 or c.final for i, c in enumerate(checkpoints)]


@given(policy_docs(with_shares=True), small_totals, st.none() | st.integers(1, 500), metric_functions(), st.data())
def test_peak_kept_is_at_most_keep_last_plus_pinned(doc, total, steps_per_epoch, metrics, data):
    retention = data.draw(retentions, label="retention")
    policy = Policy.model_validate({**doc, "retention": retention})
    sim = policy.simulate(total, steps_per_epoch, None, metrics)
    r = policy.retention
    pinned = 1  # the final checkpoint
    if r.keep_every is not None:
        pinned += sum(1 for s in sim.saved_steps if s % r.keep_every == 0)
    if r.keep_best is not None:
        pinned += r.keep_best.n
    assert sim.peak_kept <= r.keep_last + pinned
    assert set(sim.kept) <= set(sim.saved_steps)
    if sim.saves:
        assert sim.kept[-1] == sim.saved_steps[-1]


# -- many rules: a decision looks only at the rules that can fire ----------------------------


@given(st.data())
def test_decider_with_many_rules_matches_oracle(data):
    """Policies of dozens of rules: the decider evaluates only the rules whose bound has come
    or whose event the Progress carries, and must decide exactly as the oracle, which
    evaluates every rule at every decision."""
    total = data.draw(st.none() | st.integers(1, 400))
    doc = data.draw(policy_docs(with_shares=total is not None, max_rules=60))
    doc["rules"] += data.draw(st.lists(step_rules(), min_size=10, max_size=40))
    items = data.draw(progress_sequences(total, max_len=60))
    policy = Policy.model_validate(doc)
    assert _run_engine(policy, items, total) == _run_oracle(policy, items, total)


# -- more saves than a simulation lists: the rest counted exactly, or said to be unknown ---


@given(sim_cases(long_max=200_000), st.integers(1, 40))
def test_a_capped_simulation_lists_a_prefix_and_counts_the_rest_exactly(case, cap):
    doc, total, steps_per_epoch, seconds, _ = case
    policy = Policy.model_validate(doc)
    full = policy.simulate(total, steps_per_epoch, seconds, max_saves=None)
    capped = policy.simulate(total, steps_per_epoch, seconds, max_saves=cap)
    assert full.complete and full.save_count == len(full.saves) and full.fired_total == full.fired
    if len(full.saves) <= cap:
        assert capped.complete and capped.saves == full.saves and capped.kept == full.kept
        return
    assert not capped.complete
    assert capped.saves == full.saves[:cap] and capped.listed_to == full.saves[cap][0] - 1  # up to the next save
    if capped.save_count is None:  # unknown: said so, never a wrong number
        assert capped.fired_total is None and capped.unsaved_tail is None
        return
    assert capped.save_count == len(full.saves)
    assert capped.fired_total == full.fired
    assert capped.unsaved_tail == full.unsaved_tail
    if capped.last_saves:
        assert capped.last_saves == full.saves[-len(capped.last_saves):]


@given(step_policy_docs(), st.integers(1, 400), st.none() | st.integers(1, 40), st.integers(1, 5))
def test_capped_simulation_of_step_rules_counts_like_brute_force(doc, total, steps_per_epoch, cap):
    policy = Policy.model_validate(doc)
    ref = oracle_simulation(policy, total, steps_per_epoch)
    sim = policy.simulate(total, steps_per_epoch, max_saves=cap)
    assert sim.saves == ref.saves[:cap]
    assert sim.save_count in (None, len(ref.saves))
    if sim.complete:
        assert sim.save_count == len(ref.saves)


@given(
    st.lists(st.tuples(st.integers(0, 300), st.integers(1, 400), st.integers(1, 40)), max_size=12),
    st.integers(0, 300),
    st.integers(1, 400),
)
def test_counting_a_union_of_pieces_equals_marking_each_step(pieces, lo, span):
    from saverules.engine.count import WORK, _Budget, count_union

    hi = lo + span
    expected = sum(1 for m in range(lo + 1, hi + 1) if any(a < m <= b and m % k == 0 for a, b, k in pieces))
    assert count_union(pieces, lo, hi, _Budget(WORK)) == expected
