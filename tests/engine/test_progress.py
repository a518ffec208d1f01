"""Progress is checked when it is built, and a decider refuses steps that go backwards.

Properties over generated fields: every valid Progress reads back what it was
given (converted to plain int / float where it came as another number type), is
read-only, and survives equality, hashing, pickling and ``replace``; every wrong
field raises at once, naming the field.  Steps that go backwards are refused by
the decider and by the oracle alike, and a refused step changes no later decision.
"""
from __future__ import annotations

import math
import pickle
import signal as _signal

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from oracle import BackwardsStep, Oracle
from strategies import policy_docs, progress_sequences, step_policy_docs

from saverules import Policy, Progress, loads
from saverules.engine.progress import FIELDS

# -- what a Progress accepts ------------------------------------------------------------------

ints_ge = lambda low: st.integers(low, 2**63) | st.integers(low, low + 5)  # noqa: E731
numpy_ints = lambda low: st.integers(low, 2**31).map(np.int64)  # noqa: E731
finite = st.floats(allow_nan=False, allow_infinity=False)
signal_names = st.sampled_from(sorted(s.name for s in _signal.Signals if not s.name.startswith("SIG_")))
valid = {
    "step": ints_ge(1) | numpy_ints(1),
    "total_steps": st.none() | ints_ge(1) | numpy_ints(1),
    "epoch": ints_ge(0) | numpy_ints(0),
    "epoch_end": st.booleans() | st.booleans().map(np.bool_),
    "is_last": st.none() | st.booleans(),
    "time": st.none() | finite | st.integers(-10**6, 10**6) | finite.map(np.float64),
    "metrics": st.none() | st.dictionaries(
        st.text(min_size=1, max_size=8), finite | st.floats() | st.integers(-100, 100) | st.floats(-1e30, 1e30, allow_nan=False).map(np.float32),
        max_size=4),
    "signal": st.booleans() | st.none() | signal_names | signal_names.map(str.lower)
    | signal_names.map(lambda n: n[3:]) | st.integers(1, _signal.NSIG - 1),
}


def _expected(name, value):
    """What the field reads back: plain Python numbers, and 0 as "no signal"."""
    if value is None:
        return None
    if name in ("step", "total_steps", "epoch"):
        return int(value)
    if name in ("epoch_end", "is_last"):
        return bool(value)
    if name == "time":
        return float(value)
    if name == "metrics":
        return {k: float(v) for k, v in value.items()}
    return value


@given(st.fixed_dictionaries(valid))
def test_a_valid_progress_reads_back_its_fields_and_is_read_only(fields):
    p = Progress(**fields)
    for name, value in fields.items():
        got, want = getattr(p, name), _expected(name, value)
        assert type(got) is type(want), (name, got, want)
        if name == "metrics" and want is not None:
            assert got.keys() == want.keys()
            assert all(g == w or (math.isnan(g) and math.isnan(w)) for g, w in zip(got.values(), want.values()))
        else:
            assert got == want, name
        with pytest.raises(AttributeError):
            setattr(p, name, value)
        with pytest.raises(AttributeError):
            delattr(p, name)
    with pytest.raises(AttributeError):
        p.extra = 1
    positional = Progress(*(fields[name] for name in FIELDS))
    if not fields["metrics"] or all(v == v for v in fields["metrics"].values()):  # NaN != NaN
        assert positional == p and pickle.loads(pickle.dumps(p)) == p
        assert p.replace() == p and p.replace(step=p.step + 1).step == p.step + 1
        if fields["metrics"] is None:
            assert hash(positional) == hash(p)


# -- what it refuses ---------------------------------------------------------------------------

not_an_int = st.floats() | st.text(max_size=3) | st.booleans() | st.just([1]) | st.just(b"1") | st.just(1j)
invalid = {
    "step": not_an_int | st.integers(-10**6, 0) | st.none(),
    "total_steps": not_an_int | st.integers(-10**6, 0),
    "epoch": not_an_int | st.integers(-10**6, -1) | st.none(),
    "epoch_end": st.none() | st.integers() | st.text(max_size=3) | st.floats(),
    "is_last": st.integers() | st.text(max_size=3) | st.floats(),
    "time": st.sampled_from([math.nan, math.inf, -math.inf]) | st.booleans() | st.text(max_size=3)
    | st.just([1.0]),
    "metrics": st.just([("loss", 1.0)]) | st.just("loss") | st.just(1.0)
    | st.dictionaries(st.text(min_size=1, max_size=3), st.booleans() | st.text(max_size=2) | st.none(),
                      min_size=1, max_size=3)
    | st.dictionaries(st.integers(), st.floats(), min_size=1, max_size=2),
    "signal": st.text(min_size=1, max_size=6).filter(
        lambda s: ("SIG" + s.strip().upper()).replace("SIGSIG", "SIG") not in {n.name for n in _signal.Signals})
    | st.integers(max_value=-1) | st.integers(min_value=_signal.NSIG) | st.floats() | st.just([15]),
}


@given(st.sampled_from(FIELDS), st.data())
def test_a_wrong_field_fails_at_once_naming_the_field(name, data):
    fields = {"step": 5}
    fields[name] = data.draw(invalid[name], label=name)
    with pytest.raises((TypeError, ValueError)) as caught:
        Progress(**fields)
    message = str(caught.value)
    field = "Progress.metrics" if name == "metrics" else f"Progress.{name}"
    assert field in message, message


@pytest.mark.parametrize("value, error, words", [
    (10.0, TypeError, "must be an int >= 1, got 10.0 (float)"),
    ("7", TypeError, "must be an int >= 1, got '7' (str)"),
    (True, TypeError, "got True (bool)"),
    (0, ValueError, "must be >= 1, got 0 (steps count completed optimizer steps: the first is 1)"),
    (-3, ValueError, "must be >= 1, got -3"),
])
def test_the_reported_steps_are_refused_with_a_clear_message(value, error, words):
    with pytest.raises(error) as caught:
        Progress(value)
    assert str(caught.value).startswith("Progress.step ") and words in str(caught.value)


def test_an_unknown_signal_lists_the_known_names():
    with pytest.raises(ValueError) as caught:
        Progress(3, signal="SIGFOO")
    assert "'SIGFOO' is not a known signal name" in str(caught.value) and "SIGTERM" in str(caught.value)
    assert Progress(3, signal=0).signal is False  # 0 is "no signal", as signal numbers have it


def test_metrics_are_copied_so_the_record_cannot_change_under_a_decider():
    reported = {"val_loss": np.float32(0.5)}
    p = Progress(3, metrics=reported)
    reported["val_loss"] = 9.0
    assert p.metrics == {"val_loss": 0.5} and type(p.metrics["val_loss"]) is float


# -- steps never go backwards ------------------------------------------------------------------


def test_a_step_that_goes_backwards_raises_and_says_what_to_do():
    decide = loads('version = 1\n[[rules]]\nkind = "every_steps"\nevery = 4\n').compile(100)
    assert [decide(Progress(s)).save for s in (5, 8)] == [True, True]
    with pytest.raises(ValueError) as caught:
        decide(Progress(3))
    message = str(caught.value)
    assert "step 3 after step 8" in message
    assert "load_latest" in message and "policy.compile()" in message
    assert decide(Progress(9)).save is False and decide(Progress(12)).save  # the refused step changed nothing


def test_repeated_decisions_at_one_step_are_allowed_and_save_once():
    decide = loads('version = 1\n[[rules]]\nkind = "improved"\nmetric = "val_loss"\n').compile(100)
    assert not decide(Progress(10)).save
    assert decide(Progress(10, metrics={"val_loss": 1.0})).save  # an evaluation reported at the same step
    assert not decide(Progress(10, metrics={"val_loss": 0.5})).save  # saved at this step already
    assert decide(Progress(11, metrics={"val_loss": 0.4})).save


def test_an_object_that_is_not_a_progress_is_checked_like_one():
    class Duck:
        step, total_steps, time = 10.0, 100, None

    decide = loads('version = 1\n[[rules]]\nkind = "every_steps"\nevery = 10\n').compile(100)
    with pytest.raises(TypeError, match="Progress.step must be an int"):
        decide(Duck())
    with pytest.raises(TypeError, match="called with a saverules.Progress, got int"):
        decide(7)


@st.composite
def runs_with_a_backwards_step(draw):
    """A policy, a run, and the same run with one step going backwards inserted."""
    total = draw(st.none() | st.integers(1, 500))
    doc = draw(policy_docs(with_shares=total is not None) | step_policy_docs())
    items = [i for i in draw(progress_sequences(total, max_len=30, note_saves=False)) if i.step > 1]
    if not items:
        items = [Progress(2)]
    at = draw(st.integers(0, len(items) - 1))
    back = Progress(draw(st.integers(1, items[at].step - 1)), total)
    return doc, total, items, at, back


@given(runs_with_a_backwards_step())
def test_a_refused_backwards_step_changes_no_later_decision(case):
    doc, total, items, at, back = case
    policy = Policy.model_validate(doc)
    clean, with_back, oracle = policy.compile(total), policy.compile(total), Oracle(policy, total)
    for i, p in enumerate(items):
        expected = clean(p)
        assert with_back(p) == expected
        assert oracle.decide(p) == tuple(expected)[:2] and expected.durable == ()  # (save, reasons); one tier
        if i == at:
            with pytest.raises(ValueError, match=f"step {back.step} after step {p.step}"):
                with_back(back)
            with pytest.raises(BackwardsStep):
                oracle.decide(back)


@pytest.mark.parametrize("total, error", [(0, ValueError), (-1, ValueError), (10.0, TypeError), ("7", TypeError),
                                          (True, TypeError)])
def test_a_decider_refuses_a_wrong_run_length(total, error):
    with pytest.raises(error, match="^total_steps must be"):
        loads('version = 1\n[[rules]]\nkind = "every_steps"\nevery = "5%"\n').compile(total)
