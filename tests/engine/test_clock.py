"""The training clock never goes backwards: a Progress.time below the latest one is refused.

Reproduction (issue 16, item 3): after a clock glitch of +10^9 s and back, an
``every_time`` rule used to stay silent for the rest of the run, because its
anchor was the glitched time.  A decider now refuses the time that goes back,
loudly, as it refuses a step that goes back, and the refused decision changes
nothing.
"""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from oracle import BackwardsTime, Oracle
from strategies import policy_docs, progress_sequences

from saverules import Policy, Progress, loads

EVERY_MINUTE = 'version = 1\nfinal = false\n[[rules]]\nkind = "every_time"\nevery = "60s"\n'


def test_a_clock_glitch_and_back_is_refused_with_a_clear_error():
    decide = loads(EVERY_MINUTE).compile(1000)
    assert not decide(Progress(1, time=0.0)).save
    assert decide(Progress(2, time=61.0)).save
    assert decide(Progress(3, time=1e9)).save  # the glitch: the clock jumps ahead
    with pytest.raises(ValueError) as caught:
        decide(Progress(4, time=70.0))  # and back
    message = str(caught.value)
    assert "Progress.time went backwards" in message
    assert "70.0 s at step 4 after 1000000000.0 s" in message
    assert "Checkpointer.clock()" in message and "monotonic" in message


def test_a_time_that_goes_back_is_refused_on_the_quiet_path_too():
    decide = loads(EVERY_MINUTE).compile(1000)
    decide(Progress(1, time=0.0))
    assert not decide(Progress(2, time=30.0)).save  # quiet: below the next threshold
    with pytest.raises(ValueError, match=r"10.0 s at step 3 after 30.0 s"):
        decide(Progress(3, time=10.0))
    assert not decide(Progress(3, time=30.0)).save  # the same time again is allowed
    assert decide(Progress(4, time=60.0)).save  # the refused decision changed nothing


def test_a_policy_without_clock_rules_refuses_a_backwards_time_too():
    decide = loads('version = 1\n[[rules]]\nkind = "every_steps"\nevery = 10\n').compile(100)
    decide(Progress(1, time=5.0))
    decide(Progress(2, time=6.0))
    with pytest.raises(ValueError, match="Progress.time went backwards"):
        decide(Progress(3, time=1.0))
    assert decide(Progress(10, time=7.0)).save
    assert not decide(Progress(11)).save  # a decision without a clock is still fine


@st.composite
def runs_with_a_backwards_time(draw):
    """A policy, a run with a clock, and a Progress whose time goes back inserted after one item."""
    total = draw(st.integers(1, 500))
    doc = draw(policy_docs())
    items = [i for i in draw(progress_sequences(total, max_len=30, note_saves=False)) if i.time is not None]
    timed = [n for n, p in enumerate(items) if p.time > 0.0]
    if not timed:
        return doc, total, [Progress(1, time=5.0)], 0, Progress(1, time=1.0)
    at = draw(st.sampled_from(timed))
    back = items[at].replace(time=draw(st.floats(0.0, items[at].time, exclude_max=True)), metrics=None)
    return doc, total, items, at, back


@given(runs_with_a_backwards_time())
def test_a_refused_backwards_time_changes_no_later_decision(case):
    doc, total, items, at, back = case
    policy = Policy.model_validate(doc)
    clean, with_back, oracle = policy.compile(total), policy.compile(total), Oracle(policy, total)
    for i, p in enumerate(items):
        expected = clean(p)
        assert with_back(p) == expected
        assert oracle.decide(p) == tuple(expected)[:2] and expected.durable == ()  # (save, reasons); one tier
        if i == at:
            with pytest.raises(ValueError, match="Progress.time went backwards"):
                with_back(back)
            with pytest.raises(BackwardsTime):
                oracle.decide(back)
