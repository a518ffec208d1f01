"""``Decider.decide(step, ...)``, the fields call, decides exactly as ``decider(Progress(...))``.

Random policies (the adaptive rule included, with save costs reported along the way) and random
step/time/event sequences, against the call with a Progress and the oracle
(tests/helpers/oracle.py): the same decisions, the same state after every item, the same refusals.
"""
from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from oracle import Oracle
from strategies import policy_docs, progress_sequences
from test_cost_properties import adaptive_rules, costs

from saverules import Policy, PolicyError, Progress


@st.composite
def fields_cases(draw):
    """A policy (sometimes with an adaptive rule), the total it is compiled with, and a run:
    each Progress as the raw arguments a loop would pass (a whole-number clock as an int at
    times, which a Progress converts), with save costs and the loop's own saves in between."""
    total = draw(st.none() | st.integers(1, 200) | st.integers(1, 10**6))
    doc = draw(policy_docs(with_shares=total is not None, run=True))
    if draw(st.booleans()):
        doc = {**doc, "rules": [*doc["rules"], draw(adaptive_rules())]}
    items = []
    for item in draw(progress_sequences(total, max_len=40)):
        if isinstance(item, tuple):
            items.append(item)
            continue
        fields = list(item._fields())
        t = fields[5]
        if t is not None and t == int(t) and draw(st.booleans()):
            fields[5] = int(t)  # not the exact type: the fields call must take the checked path
        items.append(tuple(fields))
        if draw(st.integers(0, 3)) == 0:
            c = draw(costs)
            items.append(("note_cost", c, c + draw(st.just(0.0) | st.floats(0, 900, allow_nan=False))))
    return doc, total if draw(st.booleans()) else None, items


def _feed(target, item, how):
    if item[0] == "note_save":
        target.note_save(item[1], item[2])
        return None
    if item[0] == "note_cost":
        target.note_cost(item[1], item[2])
        return None
    try:
        if how == "oracle":
            return target.decide(Progress(*item))
        d = target.decide(*item) if how == "fields" else target(Progress(*item))
        return (d.save, d.reasons if d.save else ())
    except PolicyError:
        return "refused"


@given(fields_cases())
def test_the_fields_call_decides_like_a_progress_and_the_oracle(case):
    doc, total, items = case
    policy = Policy.model_validate(doc)
    fields, called, oracle = policy.compile(total), policy.compile(total), Oracle(policy, total)
    for item in items:
        a = _feed(fields, item, "fields")
        b = _feed(called, item, "call")
        c = _feed(oracle, item, "oracle")
        assert a == b == c, item
        if a == "refused":
            return
        assert fields.state_dict() == called.state_dict()
        assert (fields.next_step, fields.next_time) == (called.next_step, called.next_time)


POLICY = Policy.model_validate({"version": 1, "rules": [{"kind": "every_steps", "every": 10},
                                                        {"kind": "every_time", "every": "1m"}]})
STEPS = Policy.model_validate({"version": 1, "final": False, "rules": [{"kind": "every_steps", "every": 10}]})


@pytest.mark.parametrize("args", [
    (0,), ("3",), (2.0,), (True,), (-1,),
    (5, 0), (5, "10"), (5, None, -1), (5, None, 0, None), (5, None, 0, False, 1),
    (5, None, 0, False, None, math.nan), (5, None, 0, False, None, math.inf), (5, None, 0, False, None, -math.inf),
    (5, None, 0, False, None, "1s"), (5, None, 0, False, None, None, [1]), (5, None, 0, False, None, None, None, "NOPE"),
    (5, None, 0, False, None, None, None, 1.5),
])
@pytest.mark.parametrize("fresh", [True, False])
@pytest.mark.parametrize("policy", [POLICY, STEPS], ids=["clock", "steps"])
def test_bad_arguments_are_refused_as_a_progress_refuses_them(args, fresh, policy):
    with pytest.raises((TypeError, ValueError)) as built:
        Progress(*args)
    decider = policy.compile(100)
    if not fresh:
        decider.decide(1, time=0.0)
    with pytest.raises(type(built.value)) as called:
        decider.decide(*args)
    assert str(called.value) == str(built.value)


def test_a_step_or_clock_going_back_is_refused_on_the_quiet_path_too():
    decider = POLICY.compile(100)
    decider.decide(5, time=10.0)
    with pytest.raises(ValueError, match="Progress.step went backwards"):
        decider.decide(4, time=10.0)
    with pytest.raises(ValueError, match="Progress.time went backwards"):
        decider.decide(6, time=9.0)


def test_the_quiet_path_answers_without_a_progress_and_the_rest_builds_one():
    decider = POLICY.compile(100)
    source = type(decider)._quiet_source
    assert "def decide(self, step, total_steps=None" in source
    assert decider.decide(1, total_steps=100, time=0.0) == (False, ())
    assert decider.decide(10, total_steps=100, time=1.0) == (True, ("every_steps(every=10)",))
    assert decider.decide(11, total_steps=100, time=61.0) == (True, ("every_time(every=1m)",))
    assert decider.decide(12, total_steps=100, time=61.5, signal="SIGTERM") == (False, ())
    assert decider.decide(100, total_steps=100, time=62.0) == (True, ("final", "every_steps(every=10)"))
