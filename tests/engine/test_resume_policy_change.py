"""Resuming under a changed policy: a rule keeps its state only if the new policy holds the same rule.

The rule: rule state is matched by what a rule is (kind and parameters), never
by its position.  Rules in both policies continue; changed and new rules start
fresh from the saved step, exactly as they would in a new decider.
"""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from oracle import Oracle
from strategies import progress_sequences, rules

from saverules import Policy, PolicyError, Progress
from saverules.engine.decider import Resumed
from saverules.engine.rules import describe


def _feed(decider, item):
    if isinstance(item, tuple):
        decider.note_save(item[1], item[2])
        return None
    try:
        decision = decider(item)
    except PolicyError:
        return "refused"
    assert decision.durable == ()  # one tier
    return tuple(decision)[:2]  # (save, reasons), as the oracle answers


def _feed_oracle(oracle, item):
    if isinstance(item, tuple):
        oracle.note_save(item[1], item[2])
        return None
    try:
        save, reasons = oracle.decide(item)
    except PolicyError:
        return "refused"
    return (save, reasons)


# rules that read nothing a neighbour writes (no anchor at the last save), so each
# rule's firing can be told apart from the others' by its reason
_independent = st.one_of(
    st.fixed_dictionaries({"kind": st.just("every_steps"), "every": st.integers(1, 9)}),
    st.fixed_dictionaries({"kind": st.just("at_steps"), "steps": st.lists(st.integers(1, 60), min_size=1, max_size=4)}),
    st.fixed_dictionaries({"kind": st.just("epoch_end")}, optional={"every": st.integers(1, 3)}),
    st.fixed_dictionaries(
        {"kind": st.just("improved"), "metric": st.sampled_from(["val_loss", "acc"])},
        optional={"mode": st.sampled_from(["min", "max"]), "top": st.integers(1, 3)},
    ),
)


@st.composite
def changed_policies(draw, leaf_rules=None):
    """(p1, p2): p2 holds some of p1's rules (in any order, perhaps twice) and some new ones."""
    strategy = leaf_rules if leaf_rules is not None else rules(with_shares=False, max_leaves=3) | _independent
    first = draw(st.lists(strategy, min_size=0, max_size=4))
    shared = draw(st.lists(st.sampled_from(first), max_size=4)) if first else []
    new = draw(st.lists(strategy, max_size=3))
    second = draw(st.permutations(shared + new))
    p1 = Policy.model_validate({"version": 1, "final": draw(st.booleans()), "rules": first})
    p2 = Policy.model_validate({"version": 1, "final": draw(st.booleans()), "rules": list(second)})
    return p1, p2


@settings(max_examples=150, deadline=None)
@given(changed_policies(), st.data())
def test_a_resume_under_a_changed_policy_decides_as_the_oracle_says(pair, data):
    """The whole decision, every rule at once, against the naive oracle's resume."""
    p1, p2 = pair
    total = data.draw(st.none() | st.integers(1, 400), label="total")
    items = data.draw(progress_sequences(total, max_len=30), label="items")
    cut = data.draw(st.integers(0, len(items)), label="cut")
    decider, oracle = p1.compile(total), Oracle(p1, total)
    for item in items[:cut]:
        if _feed(decider, item) == "refused" or _feed_oracle(oracle, item) == "refused":
            return  # a run the first policy cannot decide is not resumed
    resumed = p2.compile(total)
    report = resumed.load_state_dict(json.loads(json.dumps(decider.state_dict())))
    assert report.policy_changed == (p1 != p2)
    expected = oracle.resumed_under(p2)
    for item in items[cut:]:
        got, want = _feed(resumed, item), _feed_oracle(expected, item)
        assert got == want, item
        if got == "refused":
            break


@st.composite
def _metric_runs(draw):
    """Consecutive steps, most of them reporting both metrics, some ending an epoch."""
    value = st.sampled_from([0.1, 0.5, 1.0, 2.0, 3.0]) | st.floats(-5, 5, allow_nan=False)
    out = []
    for step in range(1, draw(st.integers(2, 40)) + 1):
        metrics = draw(st.none() | st.fixed_dictionaries({}, optional={"val_loss": value, "acc": value}))
        out.append(Progress(step, epoch_end=draw(st.integers(0, 4)) == 0, metrics=metrics))
    return out


@settings(max_examples=200, deadline=None)
@given(changed_policies(_independent), st.data())
def test_new_rules_decide_as_in_a_fresh_decider_and_shared_rules_as_in_the_continued_one(pair, data):
    p1, p2 = pair
    items = data.draw(_metric_runs(), label="items")
    cut = data.draw(st.integers(1, len(items)), label="cut")
    continued = p1.compile()
    for item in items[:cut]:
        continued(item)
    saved_step = items[cut - 1].step
    resumed = p2.compile()
    resumed.load_state_dict(json.loads(json.dumps(continued.state_dict())))
    # a fresh p2 decider that has just saved the resumed step (the oracle, from first principles)
    fresh = Oracle(p2)
    fresh.prev, fresh.last_save_step, fresh.saved = saved_step, saved_step, {saved_step}
    # Rules are the same rule when they are equal (what they are), whatever keys were written: a rule
    # given ``top = 1`` is p1's rule without it, though the two describe themselves differently.
    # ``pairs`` maps each shared rule's name in p2 to its name in p1.
    pairs = {describe(r): describe(next(q for q in p1.rules if q == r)) for r in p2.rules if r in p1.rules}
    # a rule held twice by p2 but once by p1 is partly new: leave such names out of both sides
    twice = {describe(r) for r in p2.rules if p2.rules.count(r) > p1.rules.count(r)}
    own = {describe(r) for r in p2.rules if r not in p1.rules} - twice
    pairs = {mine: theirs for mine, theirs in pairs.items() if mine not in twice}
    if p2.final and not p1.final:
        own.add("final")
    for item in items[cut:]:
        reasons = set(resumed(item).reasons)
        _, fresh_reasons = fresh.decide(item)
        theirs = set(continued(item).reasons)
        assert reasons & own == set(fresh_reasons) & own, item
        for mine, old_name in pairs.items():
            assert (mine in reasons) == (old_name in theirs), (item, mine)


def test_a_new_improved_rule_does_not_inherit_the_old_rules_best():
    """The reported case: an accuracy rule placed first must not take val_loss's best of 2.5."""
    old = Policy.model_validate({"version": 1, "final": False, "rules": [
        {"kind": "improved", "metric": "val_loss", "mode": "min"}]})
    new = Policy.model_validate({"version": 1, "final": False, "rules": [
        {"kind": "improved", "metric": "accuracy", "mode": "max"},
        {"kind": "improved", "metric": "val_loss", "mode": "min"}]})
    first = old.compile(100)
    for step, loss in ((10, 3.0), (20, 2.5)):
        first(Progress(step, metrics={"val_loss": loss}))
    resumed = new.compile(100)
    report = resumed.load_state_dict(first.state_dict())
    assert report == Resumed(policy_changed=True, kept=(describe(new.rules[1]),), fresh=(describe(new.rules[0]),))
    saved = [step for step, acc in ((30, 0.5), (40, 0.7), (50, 0.9))
             if resumed(Progress(step, metrics={"accuracy": acc, "val_loss": 2.6}))]
    assert saved == [30, 40, 50]
    # the val_loss rule kept its best of 2.5: 2.6 did not fire it
    assert not resumed(Progress(60, metrics={"val_loss": 2.55}))
    assert resumed(Progress(70, metrics={"val_loss": 2.4})).reasons == (describe(new.rules[1]),)
    message = report.message("checkpoint x", 20)
    assert message is not None and f"fresh: {describe(new.rules[0])}" in message
    assert f"kept: {describe(new.rules[1])}" in message


def test_the_same_policy_resumes_without_a_word():
    p = Policy.model_validate({"version": 1, "rules": [{"kind": "improved", "metric": "val_loss"}]})
    d = p.compile(10)
    d(Progress(1, metrics={"val_loss": 1.0}))
    report = p.compile(10).load_state_dict(d.state_dict())
    assert report.message("checkpoint x", 1) is None and report.kept and not report.fresh


def test_a_version_1_state_of_another_policy_starts_every_rule_fresh():
    """Version 1 keyed rules by position: positions of another policy say nothing, so nothing is kept."""
    p1 = Policy.model_validate({"version": 1, "final": False, "rules": [{"kind": "improved", "metric": "val_loss"}]})
    p2 = Policy.model_validate({"version": 1, "final": False, "rules": [
        {"kind": "improved", "metric": "accuracy", "mode": "max"}]})
    state = {"version": 1, "policy": p1.digest, "prev_step": 20, "last_save_step": 20, "last_save_time": None,
             "total_steps": None, "rules": {"0.0": {"best": 2.5, "values": [2.5]}}, "costs": []}
    d = p2.compile()
    report = d.load_state_dict(state)
    assert report.fresh == (describe(p2.rules[0]),) and not report.kept
    assert d(Progress(21, metrics={"accuracy": 0.5}))
    same = p1.compile()
    assert same.load_state_dict({**state, "policy": p1.digest}).kept == (describe(p1.rules[0]),)
    assert not same(Progress(21, metrics={"val_loss": 2.6}))


def test_a_state_of_an_unknown_version_is_refused():
    p = Policy.model_validate({"version": 1, "rules": []})
    with pytest.raises(ValueError, match="reads versions 1 and 2"):
        p.compile().load_state_dict({"version": 7})
