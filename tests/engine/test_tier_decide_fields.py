"""``TieredDecider.decide(step, ...)``, the fields call of a two-tier policy, decides as ``decider(Progress(...))``.

Random policies for each tier and random step/time/event sequences: the same decisions
(both tiers' reasons), the same state after every item, the same refusals.
"""
from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from strategies import policy_docs, progress_sequences

from saverules import Policy, PolicyError, Progress
from saverules.engine.tiers import TieredDecider


@st.composite
def tier_cases(draw):
    total = draw(st.none() | st.integers(1, 200))
    local = draw(policy_docs(with_shares=total is not None))
    durable = draw(policy_docs(with_shares=total is not None))
    doc = {**local, "durable": {"rules": durable["rules"], "final": draw(st.booleans())}}
    items = [item if isinstance(item, tuple) else tuple(item._fields())
             for item in draw(progress_sequences(total, max_len=40))]
    return doc, total if draw(st.booleans()) else None, items


def _feed(decider, item, fields):
    if item[0] == "note_save":
        decider.note_save(item[1], item[2])
        return None
    try:
        d = decider.decide(*item) if fields else decider(Progress(*item))
    except PolicyError:
        return "refused"
    return (d.save, d.reasons, d.durable)


@given(tier_cases())
def test_the_fields_call_of_two_tiers_decides_as_the_call_with_a_progress(case):
    doc, total, items = case
    policy = Policy.model_validate(doc)
    fast, slow = policy.compile(total), policy.compile(total)
    assert isinstance(fast, TieredDecider)
    for item in items:
        assert _feed(fast, item, True) == _feed(slow, item, False), item
        assert fast.state_dict() == slow.state_dict()
