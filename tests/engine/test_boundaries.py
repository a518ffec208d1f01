"""Boundaries the engine must get exactly right: where a comparison's edge, a unit
conversion or a length limit decides the answer.  Each test pins the behaviour at
the boundary and one step either side of it."""
from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from saverules import PolicyError, loads
from saverules.engine.quantities import format_seconds

# -- durations as the checker prints them ---------------------------------------------------------


@pytest.mark.parametrize("seconds, text", [
    (None, "-"), (0.25, "0.25s"), (9.5, "9.5s"), (9.0, "9s"), (10.0, "10s"), (10.4, "10s"), (59.4, "59s"),
    (60, "1m"), (61, "1m01s"), (599, "9m59s"), (3599, "59m59s"), (3600, "1h00m"), (3601, "1h00m01s"),
    (3660, "1h01m"), (7322, "2h02m02s"), (86400, "24h00m"),
])
def test_format_seconds_at_the_unit_boundaries(seconds, text):
    assert format_seconds(seconds) == text


_PARTS = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")


@given(st.floats(10, 10**7, allow_nan=False))
def test_format_seconds_reads_back_as_the_rounded_seconds(seconds):
    text = format_seconds(seconds)
    match = _PARTS.fullmatch(text)
    assert match, text
    h, m, s = (int(g) if g else 0 for g in match.groups())
    assert 3600 * h + 60 * m + s == int(round(seconds)), text
    assert m < 60 and s < 60
    if h:
        assert re.search(r"h\d\dm", text)  # minutes are two digits after hours


# -- durations and numbers in a policy must be finite ------------------------------------------------


def _error(text: str) -> str:
    with pytest.raises(PolicyError) as caught:
        loads(text, "p.toml")
    return str(caught.value)


TIME_RULE = 'version = 1\n[[rules]]\nkind = "every_time"\nevery = "{}"\n'


@pytest.mark.parametrize("every", ["9" * 400 + "h", "9" * 320 + "s"])
def test_a_duration_too_large_for_a_float_is_refused_as_not_finite(every):
    assert "a duration must be finite" in _error(TIME_RULE.format(every))


def test_the_largest_durations_that_fit_are_accepted():
    policy = loads(TIME_RULE.format("9" * 300 + "s"))
    assert policy.rules[0].every.seconds == float("9" * 300)


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "+inf"])
def test_min_delta_must_be_finite(value):
    text = f'version = 1\n[[rules]]\nkind = "improved"\nmetric = "loss"\nmin_delta = {value}\n'
    assert "must be a finite number" in _error(text)


def test_min_delta_may_be_zero_but_not_negative():
    base = 'version = 1\n[[rules]]\nkind = "improved"\nmetric = "loss"\nmin_delta = {}\n'
    assert loads(base.format("0")).rules[0].min_delta == 0.0
    assert loads(base.format("1e-300")).rules[0].min_delta == 1e-300
    assert "at least 0" in _error(base.format("-1e-300"))


# -- checkpoint names: at most 233 bytes (255 less the store's temporary '.tmp-...-<pid>-<8 hex>'), one
# path component ----------------------------------------------------------------------------------------


def _storage(name: str) -> str:
    return f'version = 1\n[storage]\nname = "{name}"\n[[rules]]\nkind = "every_steps"\nevery = 10\n'


def test_a_name_of_exactly_233_bytes_is_accepted_and_234_is_refused():
    fits = "x" * 224 + "{step:09d}"  # 224 + 9 digits = 233 bytes at every step up to 999,999,999
    assert loads(_storage(fits)).storage.render_name(123456789, 0).encode() == b"x" * 224 + b"123456789"
    assert "renders to 234 bytes" in _error(_storage("x" + fits))
    assert "at most 233 bytes" in _error(_storage("x" + fits))


def test_the_name_length_counts_bytes_not_characters():
    fits = "é" * 112 + "{step:09d}"  # 224 bytes of UTF-8 + 9 digits
    assert loads(_storage(fits))
    assert "renders to 235 bytes" in _error(_storage("é" + fits))


def test_a_format_width_of_233_is_accepted_and_234_is_refused():
    assert loads(_storage("{step:233d}")).storage.render_name(7, 0) == " " * 232 + "7"
    assert "width beyond 233" in _error(_storage("{step:234d}"))


# -- where a file that cannot be read as TOML is wrong ----------------------------------------------


def _position(text, source="p.toml"):
    with pytest.raises(PolicyError) as caught:
        loads(text, source)
    (d,) = caught.value.diagnostics
    return d.line, d.col, d.message


@pytest.mark.parametrize("text, line, col", [
    ('version = 1\nx = "abc', 2, 9),  # at the end of the document: just past the last character
    ("x = [1,", 1, 8),
    ('version = 1\nx = [1,\n', 3, 1),  # the end of the document is the start of the empty last line
    ("version = 1\n[[rules]\n", 2, 8),  # tomllib's own position
    ("a = 1\na = 2\n", 2, 6),
])
def test_a_toml_syntax_error_points_at_where_the_parser_stopped(text, line, col):
    got_line, got_col, message = _position(text)
    assert (got_line, got_col) == (line, col) and message.startswith("TOML syntax: ")
    assert "line" not in message and "end of document" not in message  # the position is not repeated


@pytest.mark.parametrize("data, line, col", [
    (b"\xff", 1, 1), (b"version = 1\n  ab\xffcd", 2, 5), (b"a\nb\nc\xe9", 3, 2),
])
def test_text_that_is_not_utf8_points_at_the_first_bad_byte(data, line, col):
    got_line, got_col, message = _position(data)
    assert (got_line, got_col) == (line, col) and message == "the file is not valid UTF-8 text"


def test_errors_without_a_place_in_the_text_point_at_its_start(tmp_path):
    assert _position(5) == (1, 1, "expected TOML text, got int")
    from saverules import load

    with pytest.raises(PolicyError) as caught:
        load(tmp_path / "missing.toml")
    (d,) = caught.value.diagnostics
    assert (d.line, d.col) == (1, 1) and d.message == "cannot read the file: No such file or directory"


# -- epoch ends in a simulated run ----------------------------------------------------------------


@given(st.integers(1, 4), st.integers(1, 12), st.integers(1, 120), st.none() | st.integers(0, 40),
       st.booleans())
def test_simulated_epoch_ends_are_the_ones_a_loop_asked_at_every_step_sees(every, per_epoch, total, after, final):
    """epoch_end with every > 1, short epochs and runs that stop mid-epoch: the
    simulation jumps between epoch ends arithmetically, the loop walks every step."""
    from saverules import Policy
    from saverules.engine.simulate import progress_at

    rule = {"kind": "epoch_end", "every": every}
    if after is not None:
        rule["after"] = after
    policy = Policy.model_validate({"version": 1, "final": final, "rules": [rule]})
    for steps_per_epoch in (per_epoch, None):
        decide = policy.compile(total)
        walked = [s for s in range(1, total + 1)
                  if decide(progress_at(s, total, steps_per_epoch, None)).save]
        assert [s for s, _ in policy.simulate(total, steps_per_epoch).saves] == walked


def test_a_simulated_loop_reports_epochs_and_clock_like_the_reference_loop():
    from saverules.engine.simulate import progress_at

    p = progress_at(40, 100, 20, 0.5)
    assert (p.step, p.epoch, p.epoch_end, p.time, p.is_last) == (40, 1, True, 20.0, None)
    p = progress_at(41, 100, 20, 0.5)
    assert (p.epoch, p.epoch_end, p.time) == (2, False, 20.5)
    assert progress_at(1, 100, 20, None).time is None and progress_at(20, 100, 20, None).epoch == 0
    assert progress_at(100, 100, None, 3.0).is_last is True and progress_at(99, 100, None, 3.0).epoch == 0


def test_a_simulation_reports_the_clock_at_a_step():
    from saverules import Policy

    policy = Policy.model_validate({"version": 1, "rules": [{"kind": "every_steps", "every": 10}]})
    assert policy.simulate(100, step_seconds=0.5).time_of(30) == 15.0
    assert policy.simulate(100).time_of(30) is None


# -- bounds that resolve against the run's length ---------------------------------------------------


def _with_total(total: int, rule: str) -> str:
    return f"version = 1\n[run]\ntotal_steps = {total}\n[[rules]]\n{rule}"


def test_a_window_whose_share_resolves_below_a_step_count_is_refused():
    text = _with_total(1000, 'kind = "every_steps"\nevery = 5\nafter = 50\nuntil = "1%"\n')
    assert "until (10) must be greater than after (50)" in _error(text)


def test_two_shares_that_round_to_one_step_leave_an_empty_window():
    policy = loads(_with_total(50, 'kind = "every_steps"\nevery = 1\nafter = "1%"\nuntil = "1.5%"\n'))
    assert policy.simulate(50).saves == [(50, ("final",))]


def test_piecewise_segments_that_meet_must_be_shares_rounding_together():
    seg = 'kind = "piecewise"\nsegments = [{{ every = 1, until = {a} }}, {{ every = 2, until = {b} }}, {{ every = 5 }}]\n'
    assert "segments must be increasing" in _error(_with_total(1000, seg.format(a=10, b='"1%"')))
    policy = loads(_with_total(50, seg.format(a='"1%"', b='"1.5%"')))  # both round to step 1
    assert [s for s, _ in policy.simulate(50).saves][:3] == [1, 5, 10]


@pytest.mark.parametrize("seconds", [0, -1.0, float("inf"), float("nan"), "1s"])
def test_a_simulation_refuses_a_step_time_that_is_not_a_positive_number(seconds):
    from saverules import Policy

    policy = Policy.model_validate({"version": 1, "rules": [{"kind": "every_time", "every": "1m"}]})
    with pytest.raises(ValueError, match="step_seconds"):
        policy.simulate(100, step_seconds=seconds)


@pytest.mark.parametrize("total, per_epoch", [(True, None), (0, None), (2.5, None), (100, 0), (100, True), (100, 1.5)])
def test_a_simulation_refuses_a_run_shape_that_is_not_positive_whole_numbers(total, per_epoch):
    from saverules import Policy

    policy = Policy.model_validate({"version": 1, "rules": [{"kind": "every_steps", "every": 10}]})
    with pytest.raises(ValueError, match="total_steps|steps_per_epoch"):
        policy.simulate(total, per_epoch)


# -- a loaded policy is a value: immutable all the way down --------------------------------------------


def test_rules_and_their_quantities_are_immutable_and_hashable():
    import dataclasses

    policy = loads('version = 1\n[[rules]]\nkind = "every_steps"\nevery = "5%"\n'
                   '[[rules]]\nkind = "every_time"\nevery = "30m"\n')
    share, duration = policy.rules[0].every, policy.rules[1].every
    for value, field in ((share, "text"), (duration, "seconds")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(value, field, "changed")
    assert hash(policy.rules[0]) == hash(loads('version = 1\n[[rules]]\nkind = "every_steps"\nevery = "5%"\n').rules[0])
    assert len({policy.rules[0], policy.rules[1], policy.rules[0]}) == 2


def test_a_zero_padded_width_counts_as_its_width():
    assert loads(_storage("{step:0233d}")).storage.render_name(7, 0) == "0" * 232 + "7"
    assert "width beyond 233" in _error(_storage("{step:0234d}"))
    assert "width beyond 233" in _error(_storage("{step:" + "9" * 5000 + "d}"))  # refused without converting
    assert loads(_storage("{step:" + "0" * 5000 + "9d}")).storage.render_name(7, 0) == "000000007"
