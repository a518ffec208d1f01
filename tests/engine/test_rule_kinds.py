"""A rule kind's knowledge lives on its node: the events it declares are the events that reach it.

For every rule kind (the rule union's list, ``RULE_KINDS``), a sample rule is
decided by the real decider and by the oracle at a Progress carrying each event
after a quiet stretch.  A node that declares too few events would be skipped by
the decider's fast path, which the oracle never skips; a node that declares an
event must really fire on it in the sample.
"""
from __future__ import annotations

import pytest
from oracle import Oracle

from saverules import Policy, Progress
from saverules.engine.compile import CLOCK, EPOCH_END, EVENTS, LAST, METRICS, NODE_OF, SIGNAL, rule_events
from saverules.engine.rules import RULE_KINDS

TOTAL = 1000

#: one rule of each kind, quiet at steps 1-6 of a 1000-step run unless an event comes
SAMPLES = {
    "every_steps": {"kind": "every_steps", "every": 10**6},
    "every_time": {"kind": "every_time", "every": "60s"},
    "epoch_end": {"kind": "epoch_end"},
    "final": {"kind": "final"},
    "tail": {"kind": "tail", "interval": 10},
    "at_steps": {"kind": "at_steps", "steps": [999]},
    "piecewise": {"kind": "piecewise", "segments": [{"every": 500}]},
    "on_signal": {"kind": "on_signal"},
    "improved": {"kind": "improved", "metric": "loss"},
    "adaptive": {"kind": "adaptive", "max_overhead": "1%"},
    "window": {"kind": "window", "after": 900},
    "all": {"kind": "all", "rules": [{"kind": "on_signal"}, {"kind": "window", "after": 0}]},
    "any": {"kind": "any", "rules": [{"kind": "improved", "metric": "loss"}, {"kind": "epoch_end"}]},
    "not": {"kind": "not", "rule": {"kind": "window", "after": 0}},
}

EVENT_AT_STEP_6 = {
    LAST: Progress(6, is_last=True, time=6.0),
    SIGNAL: Progress(6, signal="SIGTERM", time=6.0),
    EPOCH_END: Progress(6, epoch_end=True, time=6.0),
    METRICS: Progress(6, metrics={"loss": 1.0}, time=6.0),
    CLOCK: Progress(6, time=1000.0),
}


def test_every_kind_of_the_rule_union_has_a_node_and_a_sample():
    assert set(NODE_OF) == set(RULE_KINDS.values())
    assert set(SAMPLES) == set(RULE_KINDS)


def _decide_both(doc, event):
    policy = Policy.model_validate({"version": 1, "final": False, "rules": [doc]})
    decider, oracle = policy.compile(TOTAL), Oracle(policy, TOTAL)
    decider.note_cost(1.0)  # an adaptive rule plans from a 1 s save: every 100 s at 1% overhead
    oracle.note_cost(1.0)
    for step in range(1, 6):
        quiet = Progress(step, time=float(step))
        assert tuple(decider(quiet)) == (*oracle.decide(quiet), ()) == (False, (), ())  # (save, reasons, durable)
    decision = decider(EVENT_AT_STEP_6[event])
    assert decision.durable == ()  # one tier
    return policy, tuple(decision)[:2], oracle.decide(EVENT_AT_STEP_6[event])


@pytest.mark.parametrize("event", EVENTS)
@pytest.mark.parametrize("kind", sorted(SAMPLES))
def test_the_events_a_kind_declares_reach_it_on_the_fast_path(kind, event):
    doc = SAMPLES[kind]
    policy, decided, expected = _decide_both(doc, event)
    assert decided == expected
    declared = rule_events(policy.rules[0])
    if event in declared and kind != "not":  # `not` of a window reacts to nothing: it is false in the window
        assert decided[0], f"{kind} declares {event} but did not fire on it"
    # nested in `any` beside a rule that never fires, the event still reaches it
    _, nested, nested_expected = _decide_both({"kind": "any", "rules": [SAMPLES["every_steps"], doc]}, event)
    assert nested == nested_expected and nested[0] == expected[0]


@pytest.mark.parametrize("kind", sorted(SAMPLES))
def test_the_quiet_path_tests_exactly_the_declared_events(kind):
    policy = Policy.model_validate({"version": 1, "final": False, "rules": [SAMPLES[kind]]})
    decider = policy.compile(TOTAL)
    declared = rule_events(policy.rules[0])
    assert decider.reacts_to == declared
    source = type(decider)._quiet_source
    assert ("p._signal" in source) == (SIGNAL in declared)
    assert ("p._metrics" in source) == (METRICS in declared)
    assert ("p._epoch_end" in source) == (EPOCH_END in declared)
    assert ("p._is_last" in source) == (LAST in declared)
    assert ("self._next_time" in source) == (CLOCK in declared)
    assert decider.watches_signals == (SIGNAL in declared) and decider.watches_time == (CLOCK in declared)
    assert decider.watches_metrics == (METRICS in declared)


def test_the_final_guarantee_adds_the_last_step_event():
    with_final = Policy.model_validate({"version": 1, "rules": [SAMPLES["every_steps"]]}).compile(TOTAL)
    assert with_final.reacts_to == {LAST}
    assert with_final(Progress(6, is_last=True)).reasons == ("final",)
