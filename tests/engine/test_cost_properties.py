"""Properties of the cost-aware parts of the engine: the adaptive rule, the save-cost
estimate in the decider's state, `improved.top`, and the cost report of `check`,
against the naive interpreter in tests/helpers/oracle.py and brute force.

Run with HYPOTHESIS_PROFILE=thorough for 2000 examples per property.
"""
from __future__ import annotations

import json
import math
from fractions import Fraction

from hypothesis import given
from hypothesis import strategies as st
from oracle import Oracle, oracle_daly, oracle_interval, oracle_simulation
from strategies import METRICS, durations, leaf_rules, policy_docs, progress_sequences

from saverules import Policy, PolicyError, Progress
from saverules.engine.cost import cost_report, daly_interval, estimate, rework_per_failure
from saverules.engine.rules import AdaptiveRule
from saverules.engine.simulate import progress_at

# -- strategies --------------------------------------------------------------------------

overheads = st.one_of(
    st.sampled_from(["0.5%", "1%", "2%", "5%", "10%", "50%", "99.5%"]),
    st.integers(1, 99).map(lambda p: f"{p}%"),
    st.integers(1, 199).map(lambda h: f"{h // 2}.5%"),
)
costs = st.one_of(st.floats(0, 600, allow_nan=False), st.sampled_from([0.0, 1.0, 2.5, 30.0]), st.floats(0, 2))


@st.composite
def adaptive_rules(draw, min_every=durations):
    """An adaptive rule as plain data: a target (overhead, mtbf or both) and optional bounds."""
    rule = {"kind": "adaptive"}
    target = draw(st.sampled_from(["overhead", "mtbf", "both"]))
    if target in ("overhead", "both"):
        rule["max_overhead"] = draw(overheads)
    if target in ("mtbf", "both"):
        rule["mtbf"] = draw(durations | st.integers(1, 48).map(lambda h: f"{h}h"))
    low = 60.0
    if draw(st.booleans()):
        rule["min_every"] = text = draw(min_every)
        low = float(Fraction(text[:-1]) * {"s": 1, "m": 60, "h": 3600}[text[-1]])
    if draw(st.booleans()):
        rule["max_every"] = f"{draw(st.integers(math.ceil(low), math.ceil(low) * 50 + 10))}s"
    return rule


@st.composite
def cost_policy_docs(draw, final=None):
    """A policy with one or two adaptive rules, top level or nested, among others."""
    doc = draw(policy_docs(with_shares=True, final=final, max_rules=2))
    rules = list(doc["rules"])
    for _ in range(draw(st.integers(1, 2))):
        rule = draw(adaptive_rules())
        how = draw(st.sampled_from(["top", "top", "after", "all", "any", "not"]))
        if how == "after":
            rule = {**rule, "after": draw(st.integers(0, 50))}
        elif how in ("all", "any"):
            rule = {"kind": how, "rules": [rule, draw(leaf_rules(with_shares=False))]}
        elif how == "not":
            rule = {"kind": "not", "rule": rule}
        rules.insert(draw(st.integers(0, len(rules))), rule)
    return {**doc, "rules": rules}


@st.composite
def costed_sequences(draw, total):
    """A progress sequence with save costs reported along the way (``("note_cost", c, w)``)."""
    items = draw(progress_sequences(total))
    out = []
    for item in items:
        out.append(item)
        if draw(st.integers(0, 2)) == 0:
            c = draw(costs)
            w = c + draw(st.just(0.0) | st.floats(0, 900, allow_nan=False))
            out.append(("note_cost", c, w))
    return out


def _apply(target, item):
    """Feed one item to a Decider or an Oracle; the decision or None for a note."""
    if isinstance(item, tuple):
        if item[0] == "note_save":
            target.note_save(item[1], item[2])
        else:
            target.note_cost(item[1], item[2])
        return None
    try:
        if isinstance(target, Oracle):
            return target.decide(item)
        d = target(item)
        return (d.save, d.reasons if d.save else ())
    except PolicyError:
        return "refused"


# -- the interval ----------------------------------------------------------------------


@given(adaptive_rules(), st.lists(st.tuples(costs, costs), min_size=0, max_size=6))
def test_adaptive_interval_equals_the_formula(doc, reports):
    reports = [(c, c + extra) for c, extra in reports]
    rule = AdaptiveRule.model_validate(doc)
    expected = oracle_interval(rule, reports)
    assert rule.interval(estimate(reports)) == expected
    low = rule.min_every_seconds
    high = rule.max_every.seconds if rule.max_every is not None else math.inf
    assert low <= expected <= high
    if reports:
        last = reports[-3:]
        c = sum(r[0] for r in last) / len(last)
        w = sum(r[1] for r in last) / len(last)
        if rule.max_overhead is not None:
            assert expected >= min(high, c / float(rule.max_overhead.percent / 100)) * (1 - 1e-12)
        assert expected >= min(high, w)
    else:
        assert expected == low

    # the decider plans with the same number: its next clock threshold is anchor + T
    policy = Policy.model_validate({"version": 1, "final": False, "rules": [doc]})
    decider = policy.compile()
    decider(Progress(1, time=100.0))  # the first decision starts the clock
    for c, w in reports:
        decider.note_cost(c, w)
    assert decider.next_time == 100.0 + expected


def _daly_waste(t, c, m):
    """Daly's (2006) expected run time per unit of work, for saves of cost c every t seconds
    of work and exponential failures with mean m (restart time left out: it is a constant
    factor): m * (exp((t + c) / m) - 1) / t."""
    return m * math.expm1((t + c) / m) / t


def _argmin_waste(c, m):
    lo, hi = math.log(1e-9 * m + 1e-300), math.log(100 * m)
    g = (math.sqrt(5) - 1) / 2
    for _ in range(200):  # golden-section search on log t; the waste is unimodal in t
        a, b = hi - g * (hi - lo), lo + g * (hi - lo)
        if _daly_waste(math.exp(a), c, m) < _daly_waste(math.exp(b), c, m):
            hi = b
        else:
            lo = a
    return _daly_waste(math.exp((lo + hi) / 2), c, m)


@given(st.floats(1e-2, 10**7, allow_nan=False), st.floats(-8, math.log10(2) - 1e-9, allow_nan=False)
       | st.floats(math.log10(2), 3, allow_nan=False))
def test_daly_interval_is_the_published_formula_and_near_the_optimum(m, log_ratio):
    """For c < 2M the higher-order interval's waste under Daly's exponential failure model
    is within 0.5% of the true minimum; from c = 2M on the interval is M."""
    c = m * 10**log_ratio
    t = daly_interval(c, m)
    assert t == oracle_daly(c, m)
    if c < 2 * m:
        assert t > 0
        assert _daly_waste(t, c, m) <= 1.005 * _argmin_waste(c, m)
    else:
        assert t == m


# -- decisions ---------------------------------------------------------------------------


@given(cost_policy_docs(), st.none() | st.integers(1, 200) | st.integers(1, 10**6), st.data())
def test_decider_with_costs_matches_the_oracle(doc, total, data):
    policy = Policy.model_validate(doc)
    items = data.draw(costed_sequences(total), label="items")
    decider, oracle = policy.compile(total), Oracle(policy, total)
    for item in items:
        a, b = _apply(decider, item), _apply(oracle, item)
        assert a == b, item
        if a == "refused":
            break


@given(cost_policy_docs(), st.none() | st.integers(1, 200), st.data())
def test_resume_with_costs_in_the_state_changes_no_later_decision(doc, total, data):
    policy = Policy.model_validate(doc)
    items = data.draw(costed_sequences(total), label="items")
    cut = data.draw(st.integers(0, len(items)), label="cut")
    whole = policy.compile(total)
    for item in items[:cut]:
        _apply(whole, item)
    state = json.loads(json.dumps(whole.state_dict()))
    assert len(state["costs"]) <= 3
    resumed = policy.compile(total)
    resumed.load_state_dict(state)
    assert resumed.save_cost == whole.save_cost
    for item in items[cut:]:
        assert _apply(resumed, item) == _apply(whole, item), item
    assert resumed.state_dict() == whole.state_dict()


@st.composite
def irregular_clocks(draw, n):
    """Per-step durations: steady, noisy, with stalls and with zero-length steps."""
    base = draw(st.floats(0.05, 30, allow_nan=False))
    return draw(st.lists(st.floats(0, 3 * base, allow_nan=False) | st.just(base) | st.just(0.0),
                         min_size=n, max_size=n))


@given(adaptive_rules(), st.integers(1, 1200), st.data())
def test_adaptive_never_fires_closer_than_min_every_nor_leaves_more_than_max_every(doc, total, data):
    """Asked at every step, with an irregular clock and a save cost that changes from save
    to save: an adaptive save is at least min_every after the previous save, and an unsaved
    step is less than max_every after it (so at most max_every plus one step goes unsaved)."""
    if "max_every" not in doc:
        doc = {**doc, "max_every": f"{math.ceil(AdaptiveRule.model_validate(doc).min_every_seconds) * 3}s"}
    rule = AdaptiveRule.model_validate(doc)
    policy = Policy.model_validate({"version": 1, "final": False, "rules": [doc]})
    low, high = rule.min_every_seconds, rule.max_every.seconds
    steps = data.draw(irregular_clocks(total), label="step durations")
    clock = data.draw(st.floats(0, 10**5, allow_nan=False), label="start")
    decider = policy.compile(total)
    anchor = None
    for step, dt in zip(range(1, total + 1), steps):
        clock += dt
        d = decider(Progress(step, total, time=clock))
        if anchor is None:
            anchor = clock  # the first decision starts the interval
            assert not d.save
            continue
        if d.save:
            assert clock >= anchor + low
            (reason,) = d.reasons
            assert reason.startswith("adaptive(") and ", interval=" in reason
            anchor = clock
            c = data.draw(costs, label="stall")
            decider.note_cost(c, c + data.draw(st.floats(0, 2 * high, allow_nan=False), label="write"))
        else:
            assert clock < anchor + high


@given(adaptive_rules(min_every=st.integers(1, 120).map(lambda n: f"{n}s")), st.integers(1, 20_000),
       st.floats(0.01, 5, allow_nan=False), st.floats(0.001, 60, allow_nan=False), st.data())
def test_constant_cost_keeps_the_stall_share_under_max_overhead(doc, total, step_seconds, c, data):
    """Saving c seconds at every save: the adaptive rule's saves stall at most max_overhead
    of the run, plus one save (the first, planned before any cost is known)."""
    doc = {k: v for k, v in doc.items() if k != "max_every"}  # a cap may force more saves than the budget
    if "max_overhead" not in doc:
        doc["max_overhead"] = data.draw(overheads, label="max_overhead")
    policy = Policy.model_validate({"version": 1, "rules": [doc]})
    share = float(policy.rules[0].max_overhead.percent / 100)
    sim = policy.simulate(total, None, step_seconds, save_seconds=c)
    run = total * step_seconds
    adaptive = [s for s, reasons in sim.saves if any(r.startswith("adaptive(") for r in reasons)]
    assert len(adaptive) * c <= share * run + c + 1e-9 * run
    # the final save is the guarantee's, not the rule's: at most one more
    assert len(sim.saves) * c <= share * run + 2 * c + 1e-9 * run
    report = cost_report(sim.saved_steps, total, step_seconds, peak_kept=sim.peak_kept, save_seconds=c)
    assert report.saving_share == len(sim.saves) * c / run


@st.composite
def costed_sim_cases(draw):
    doc = draw(cost_policy_docs())
    total = draw(st.integers(1, 60) | st.integers(1, 1500))
    steps_per_epoch = draw(st.none() | st.integers(1, 50) | st.integers(1, 1500))
    seconds = draw(st.none() | st.floats(0.01, 120, allow_nan=False) | st.sampled_from([0.4, 1.0, 3.0]))
    c = draw(st.none() | costs)
    w = None if c is None or draw(st.booleans()) else c + draw(st.floats(0, 600, allow_nan=False))
    return doc, total, steps_per_epoch, seconds, c, w


@given(costed_sim_cases())
def test_simulation_with_costs_equals_per_step_decisions_and_the_oracle(case):
    doc, total, steps_per_epoch, seconds, c, w = case
    policy = Policy.model_validate(doc)
    sim = policy.simulate(total, steps_per_epoch, seconds, save_seconds=c, write_seconds=w)
    ref = oracle_simulation(policy, total, steps_per_epoch, seconds, save_seconds=c, write_seconds=w)
    assert sim.saves == ref.saves and sim.kept == ref.kept and sim.peak_kept == ref.peak_kept
    if c is None:
        return  # a live decider would plan from min_every; the simulation leaves the rule out
    decider = policy.compile(total)
    saves = []
    for step in range(1, total + 1):
        d = decider(progress_at(step, total, steps_per_epoch, seconds))
        if d.save:
            saves.append((step, d.reasons))
            decider.note_cost(c, w)
    assert sim.saves == saves


@given(costed_sim_cases())
def test_the_final_step_is_still_always_saved(case):
    doc, total, steps_per_epoch, seconds, c, w = case
    policy = Policy.model_validate({**doc, "final": True})
    sim = policy.simulate(total, steps_per_epoch, seconds, save_seconds=c, write_seconds=w)
    assert sim.saves[-1][0] == total and "final" in sim.saves[-1][1]
    assert total in sim.kept


# -- improved.top --------------------------------------------------------------------------


@st.composite
def ranked_reports(draw):
    """Metric reports at irregular steps, from a few values so that ties are common."""
    pool = draw(st.lists(st.sampled_from([0.0, 0.5, 1.0, 1.5, 2.0, -1.0]) | st.floats(-3, 3, allow_nan=False),
                         min_size=1, max_size=4))
    items, step = [], 0
    for _ in range(draw(st.integers(1, 40))):
        step += draw(st.integers(1, 3) | st.integers(1, 200))
        metrics = {name: draw(st.sampled_from(pool) | st.just(math.nan))
                   for name in draw(st.sets(st.sampled_from(METRICS), max_size=2))}
        items.append(Progress(step, metrics=metrics or None))
    return items


@given(st.integers(1, 5), st.sampled_from(["min", "max"]), st.sampled_from([0.0, 0.0, 0.25]), ranked_reports(),
       st.data())
def test_improved_top_matches_the_oracle(top, mode, min_delta, items, data):
    rule = {"kind": "improved", "metric": "val_loss", "mode": mode, "min_delta": min_delta, "top": top}
    policy = Policy.model_validate({"version": 1, "final": False, "rules": [rule]})
    decider, oracle = policy.compile(), Oracle(policy)
    cut = data.draw(st.integers(0, len(items)), label="resume at")
    for i, p in enumerate(items):
        if i == cut:
            state = json.loads(json.dumps(decider.state_dict()))
            decider = policy.compile()
            decider.load_state_dict(state)
        assert _apply(decider, p) == _apply(oracle, p), p


def _lightning_top_k(values, k, mode):
    """The bookkeeping of lightning's ModelCheckpoint(save_top_k=k), one value per evaluation
    (lightning/pytorch/callbacks/model_checkpoint.py, check_monitor_top_k and
    _update_best_and_save): save when fewer than k are kept or the value beats the k-th
    kept one strictly; once k are kept the k-th is the first worst in save order."""
    kept, saved, kth = {}, [], None
    better = (lambda a, b: a < b) if mode == "min" else (lambda a, b: a > b)
    for i, v in enumerate(values):
        if len(kept) < k or better(v, kept[kth]):
            if len(kept) == k:
                del kept[kth]
            kept[i] = v
            saved.append(i)
            if len(kept) == k:
                kth = (max if mode == "min" else min)(kept, key=kept.get)
    return saved, kept


@given(st.integers(1, 4), st.sampled_from(["min", "max"]),
       st.lists(st.sampled_from([3.0, 2.0, 2.0, 1.0, 1.5]) | st.floats(0, 5, allow_nan=False), min_size=1,
                max_size=30),
       st.integers(1, 9))
def test_top_k_with_keep_best_saves_and_keeps_what_lightning_save_top_k_does(k, mode, values, every):
    """An evaluation every `every` steps reports the next value; the run has one more
    step after the last evaluation, which the final guarantee saves (keep_last = 1 keeps
    the newest checkpoint, which is either the final one or one that just entered the top k)."""
    total = every * len(values) + 1
    doc = {
        "version": 1,
        "rules": [{"kind": "improved", "metric": "val_loss", "mode": mode, "top": k}],
        "retention": {"keep_last": 1, "keep_best": {"metric": "val_loss", "mode": mode, "n": k}},
    }
    policy = Policy.model_validate(doc)

    def metrics(step):
        i = step // every - 1
        return {"val_loss": values[i]} if step % every == 0 and i < len(values) else None

    sim = policy.simulate(total, None, None, metrics)
    saved, kept = _lightning_top_k(values, k, mode)
    assert sim.saved_steps == [every * (i + 1) for i in saved] + [total]
    ours = [values[s // every - 1] for s in sim.kept[:-1]]
    assert sim.kept[-1] == total and sorted(ours) == sorted(kept.values())
    if len(set(values)) == len(values):
        # the same checkpoints; when two kept values tie at the k-th place lightning
        # deletes the older one, saverules (ties to the earlier value) the newer one
        assert sim.kept[:-1] == [every * (i + 1) for i in sorted(kept)]


# -- the cost report against brute force ---------------------------------------------------


@st.composite
def schedules(draw):
    total = draw(st.integers(1, 120))
    saves = sorted(draw(st.sets(st.integers(1, total), max_size=total)))
    return total, saves


@given(schedules(), st.floats(0.01, 100, allow_nan=False), st.integers(1, 8), st.floats(0.01, 50, allow_nan=False),
       st.floats(1, 10**5, allow_nan=False), st.floats(0, 600, allow_nan=False), st.integers(1, 10**10),
       st.integers(1, 5))
def test_cost_report_matches_brute_force(schedule, step_seconds, per_step, c, mtbf, restart, size, peak):
    total, saves = schedule
    report = cost_report(saves, total, step_seconds, peak_kept=peak, save_seconds=c, mtbf=mtbf,
                         restart_seconds=restart, checkpoint_bytes=size)
    run = total * step_seconds

    # rework: a failure at each instant (the midpoint of each of per_step slices of every
    # step) loses the training since the last save before it
    dt = step_seconds / per_step
    saved_at = set(saves)
    lost, last = 0.0, 0.0
    for step in range(1, total + 1):
        for k in range(per_step):
            lost += (step - 1) * step_seconds + (k + 0.5) * dt - last
        if step in saved_at:
            last = step * step_seconds
    rework = lost / (total * per_step)
    assert math.isclose(report.rework_seconds, rework, rel_tol=1e-9, abs_tol=1e-12)
    assert rework_per_failure(saves, total, step_seconds) == report.rework_seconds

    assert report.saving_seconds == len(saves) * c and math.isclose(report.saving_share, len(saves) * c / run)
    assert math.isclose(report.failures, run / mtbf)
    waste = len(saves) * c + run / mtbf * (rework + restart)
    assert math.isclose(report.waste_seconds, waste, rel_tol=1e-9)
    assert math.isclose(report.waste_share, waste / run, rel_tol=1e-9)
    assert report.peak_bytes == peak * size and report.total_bytes == len(saves) * size

    # the optimum: saving every T = T_daly on the training clock, and at the end
    t = oracle_daly(c, mtbf)
    assert report.optimum_interval == t
    points, x = [0.0], t
    while x < run * (1 - 1e-12):
        points.append(x)
        x += t
    points.append(run)
    optimum_saves = len(points) - 1
    gaps = [b - a for a, b in zip(points, points[1:])]
    optimum = optimum_saves * c + run / mtbf * (sum(g * g / 2 for g in gaps) / run + restart)
    assert report.optimum_saves == optimum_saves
    assert math.isclose(report.optimum_waste_seconds, optimum, rel_tol=1e-6)
    assert report.wasteful == (report.waste_seconds > 2 * report.optimum_waste_seconds)
    assert report.saving_too_costly == (report.saving_share > 0.10)
