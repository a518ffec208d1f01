"""Table tests: the seed's scenarios and each rule's firing condition, step by step."""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest
from oracle import oracle_saves

import saverules
from saverules import Checkpoint, Policy, PolicyError, Progress, loads
from saverules.engine.policy import Retention
from saverules.engine.quantities import Share
from saverules.engine.simulate import progress_at

ROOT = Path(__file__).resolve().parents[2]


def policy(*rules: str, head: str = "") -> Policy:
    text = "version = 1\n" + head + "\n" + "".join(f"\n[[rules]]\n{r}\n" for r in rules)
    return loads(text)


def saved(p: Policy, total: int, **kwargs) -> list:
    return p.simulate(total, **kwargs).saved_steps


def run(decider, steps, total=None, **fields) -> list:
    """Decide at each step; the steps saved."""
    return [s for s in steps if decider(Progress(s, total, **fields)).save]


# -- the seed's scenarios --------------------------------------------------------------


def test_39998_steps_every_20000_saves_20000_and_the_last_step():
    p = policy('kind = "every_steps"\nevery = 20000')
    assert saved(p, 39998) == [20000, 39998]
    assert saved(p, 39998) == [s for s, _ in oracle_saves(p, 39998)]


def test_interval_longer_than_the_run_saves_only_the_final_step():
    p = policy('kind = "every_steps"\nevery = 20000')
    sim = p.simulate(5000)
    assert sim.saves == [(5000, ("final",))]
    assert sim.max_gap_steps == 5000


def test_legacy_policy_without_the_guarantee_loses_the_tail():
    p = saverules.load(ROOT / "rules" / "minimind-legacy.toml")
    assert p.final is False
    sim = p.simulate(39998)
    assert sim.saved_steps == [20000]
    assert sim.unsaved_tail == 19998 and sim.max_gap_steps == 20000


def test_simulated_epoch_ends_are_the_reference_loops_multiples_of_steps_per_epoch_only():
    # as in saverules/minimind/train.py: an epoch ends at a multiple of steps_per_epoch;
    # a run that stops mid-epoch (--max_steps) ends no epoch at its last step
    p = policy('kind = "epoch_end"', head="final = false")
    assert saved(p, 350, steps_per_epoch=100) == [100, 200, 300]
    assert saved(p, 400, steps_per_epoch=100) == [100, 200, 300, 400]
    every_other = policy('kind = "epoch_end"\nevery = 2', head="final = false")
    assert saved(every_other, 350, steps_per_epoch=100) == [200]  # epoch 1 (0-based) ends there; 3 never ends
    assert saved(every_other, 400, steps_per_epoch=100) == [200, 400]
    assert saved(p, 350) == []  # without steps_per_epoch no epoch ends are simulated
    assert saved(p, 1) == []  # the 1-step run of the issue: no epoch ended, nothing saved
    assert saved(p, 1, steps_per_epoch=1) == [1]


def test_simulated_epoch_ends_match_the_progress_a_loop_reports():
    for total, per_epoch in ((350, 100), (400, 100), (7, 3), (1, 5), (10, 1)):
        ends = [s for s in range(1, total + 1) if progress_at(s, total, per_epoch, None).epoch_end]
        assert ends == list(range(per_epoch, total + 1, per_epoch))
        assert not any(progress_at(s, total, None, None).epoch_end for s in range(1, total + 1))


def test_tail_sequence_from_the_issue():
    p = policy('kind = "every_steps"\nevery = 2000', 'kind = "tail"\ninterval = 2000')
    expected = list(range(2000, 38001, 2000)) + [
        38999, 39499, 39749, 39874, 39936, 39967, 39983, 39991, 39995, 39997, 39998,
    ]
    assert saved(p, 39998) == expected
    assert [s for s, _ in oracle_saves(p, 39998)] == expected


def test_tail_does_not_fire_on_entering_the_zone_after_an_old_save():
    p = policy('kind = "at_steps"\nsteps = [10]', 'kind = "tail"\ninterval = 100', head="final = false")
    # zone starts at 900: the anchor is 900, not the save at 10, so the first tail save is 950
    assert saved(p, 1000)[:2] == [10, 950]


# -- shares of the run ------------------------------------------------------------------


@pytest.mark.parametrize(
    "share,total,steps",
    [
        ("5%", 39998, 2000),  # 1999.9 rounds up
        ("5%", 40000, 2000),
        ("1%", 1, 1),  # never below 1
        ("0.1%", 999, 1),
        ("33.3%", 1000, 333),
        ("0.3%", 1000, 3),  # exact: 1000 * 0.3 / 100 is 3.0000000000000004 in floating point
        ("12.5%", 8, 1),
        ("100%", 7, 7),
    ],
)
def test_shares_round_up_exactly(share, total, steps):
    p = policy(f'kind = "every_steps"\nevery = "{share}"', head="final = false")
    assert p.rules[0].every == Share(share, p.rules[0].every.percent)
    assert p.rules[0].every.resolve(total) == steps
    assert saved(p, total)[0] == steps


def test_shares_need_a_total_when_deciding():
    p = loads('version = 1\n\n[[rules]]\nkind = "every_steps"\nevery = "5%"\n', "p.toml")
    decider = p.compile()
    with pytest.raises(PolicyError) as err:
        decider(Progress(1))
    (d,) = err.value.diagnostics
    assert (d.source, d.line, d.col) == ("p.toml", 5, 1)
    assert "rules[0].every" in d.message and "total_steps" in d.message
    # the total may arrive on the Progress instead
    assert decider(Progress(2000, total_steps=40000)).reasons == ("every_steps(every=5%)",)


def test_a_run_table_gives_shares_their_total():
    p = policy('kind = "every_steps"\nevery = "50%"', head="[run]\ntotal_steps = 10\n")
    assert run(p.compile(), range(1, 11)) == [5, 10]


def test_share_windows_that_round_together_are_empty_not_errors():
    p = policy('kind = "window"\nafter = "50%"\nuntil = "60%"', head="final = false")
    assert saved(p, 1) == []  # both bounds round up to step 1
    assert saved(p, 10) == [6]


def test_mixed_bounds_that_cross_are_reported_when_the_total_is_known():
    p = loads('version = 1\n[[rules]]\nkind = "every_steps"\nevery = 5\nafter = 100\nuntil = "10%"\n')
    p.compile(5000)  # until = 500: fine
    with pytest.raises(PolicyError) as err:
        p.compile(500)  # until = 50 < after
    (d,) = err.value.diagnostics
    assert "until (50) must be greater than after (100)" in d.message
    assert (d.line, d.col) == (6, 1)
    with pytest.raises(PolicyError):  # with a [run] total the loader reports it
        loads('version = 1\n[run]\ntotal_steps = 500\n[[rules]]\nkind = "every_steps"\nevery = 5\nafter = 100\nuntil = "10%"\n')


# -- zero, types and other load-time errors belong to test_validation.py; here: semantics ---------


def test_every_steps_crosses_when_steps_jump():
    p = policy('kind = "every_steps"\nevery = 10', head="final = false")
    d = p.compile(100)
    assert run(d, [3, 9, 21, 22, 30, 31, 59, 61]) == [21, 30, 59, 61]


def test_at_steps_crosses_too():
    p = policy('kind = "at_steps"\nsteps = [1, 5, 50]', head="final = false")
    assert run(p.compile(), [2, 3, 49, 60, 70]) == [2, 49, 60]


def test_piecewise_from_the_issue():
    p = policy(
        'kind = "piecewise"\nsegments = [{ every = 1000, until = 10000 }, { every = 5000, until = 40000 }, { every = 10000 }]',
        head="final = false",
    )
    assert saved(p, 60000) == list(range(1000, 10001, 1000)) + list(range(15000, 40001, 5000)) + [50000, 60000]


def test_piecewise_multiples_are_anchored_at_zero():
    p = policy('kind = "piecewise"\nsegments = [{ every = 7, until = 10 }, { every = 4 }]', head="final = false")
    assert saved(p, 20) == [7, 12, 16, 20]


def test_window_and_the_after_until_shorthand():
    win = policy('kind = "window"\nafter = 3\nuntil = 5', head="final = false")
    assert saved(win, 10) == [4, 5]
    short = policy('kind = "every_steps"\nevery = 2\nafter = 3\nuntil = 8', head="final = false")
    assert saved(short, 12) == [4, 6, 8]
    both = policy('kind = "all"\nrules = [{ kind = "every_steps", every = 2 }, { kind = "window", after = 3, until = 8 }]',
                  head="final = false")
    assert saved(both, 12) == [4, 6, 8]


def test_not_window():
    p = policy('kind = "not"\nrule = { kind = "window", until = 7 }', head="final = false")
    assert saved(p, 10) == [8, 9, 10]


def test_all_of_two_intervals_fires_at_their_common_multiples_when_asked_every_step():
    p = policy('kind = "all"\nrules = [{ kind = "every_steps", every = 3 }, { kind = "every_steps", every = 5 }]',
               head="final = false")
    assert saved(p, 50) == [15, 30, 45]
    assert run(p.compile(50), range(1, 51)) == [15, 30, 45]


def test_all_fires_when_one_jump_crosses_both_intervals():
    # (0, 5] holds a multiple of 3 and one of 5: both children fire on this decision
    p = policy('kind = "all"\nrules = [{ kind = "every_steps", every = 3 }, { kind = "every_steps", every = 5 }]',
               head="final = false")
    d = p.compile(50)
    assert d(Progress(5, 50)).save
    assert not d(Progress(6, 50)).save


def test_simulation_does_not_let_combinators_cross_skipped_steps():
    # every_steps(8) makes the simulator visit step 8; all(...) must not see (0, 8] there
    p = policy(
        'kind = "all"\nrules = [{ kind = "every_steps", every = 4 }, { kind = "at_steps", steps = [5] }]',
        'kind = "every_steps"\nevery = 8',
        head="final = false",
    )
    assert p.simulate(20).saves == [(8, ("every_steps(every=8)",)), (16, ("every_steps(every=8)",))]
    assert p.simulate(20).saves == oracle_saves(p, 20)


# -- final ----------------------------------------------------------------------------------


def test_final_fires_once_at_the_first_decision_past_the_total():
    d = policy().compile(10)
    assert run(d, [4, 12, 13, 14], total=10) == [12]


def test_final_with_an_unknown_total_uses_is_last():
    d = policy('kind = "every_steps"\nevery = 1000').compile()
    assert not d(Progress(5)).save
    assert d(Progress(6, is_last=True)) == (True, ("final",), ())  # (save, reasons, durable)


def test_final_for_a_new_total_after_the_run_was_shortened():
    d = policy().compile(100)
    assert run(d, [50, 60]) == []
    # a resumed run, now 40 steps long, already past its end: the next decision is the last one
    assert d(Progress(61, total_steps=40)).reasons == ("final",)
    assert not d(Progress(62, total_steps=40)).save
    # extended again: the new end is saved too
    assert run(d, [199, 200, 201], total=200) == [200]


def test_final_off_saves_nothing_at_the_end():
    d = policy(head="final = false").compile(10)
    assert run(d, range(1, 11), total=10, is_last=None) == []


def test_explicit_final_rule_and_guarantee_give_one_reason():
    p = policy('kind = "final"')
    assert p.simulate(10).saves == [(10, ("final",))]


# -- reasons -----------------------------------------------------------------------------------


def test_reasons_name_every_rule_that_fired_guarantee_first():
    p = policy('kind = "every_steps"\nevery = 2000', 'kind = "tail"\ninterval = 2000', 'kind = "at_steps"\nsteps = [2000, 39998]')
    sim = p.simulate(39998)
    assert sim.saves[0] == (2000, ("every_steps(every=2000)", "at_steps(steps=[2000, 39998])"))
    assert sim.saves[-1] == (39998, ("final", "tail(interval=2000)", "at_steps(steps=[2000, 39998])"))
    assert sim.fired["final"] == 1 and sim.fired["every_steps(every=2000)"] == 19


@pytest.mark.parametrize(
    "rule,reason",
    [
        ('kind = "every_steps"\nevery = 2000', "every_steps(every=2000)"),
        ('kind = "every_steps"\nevery = "5%"', "every_steps(every=5%)"),
        ('kind = "every_time"\nevery = "30m"', "every_time(every=30m)"),
        ('kind = "epoch_end"', "epoch_end"),
        ('kind = "epoch_end"\nevery = 2', "epoch_end(every=2)"),
        ('kind = "tail"\ninterval = 2000', "tail(interval=2000)"),
        ('kind = "on_signal"', "on_signal"),
        ('kind = "on_signal"\nsignals = ["SIGTERM"]', 'on_signal(signals=["SIGTERM"])'),
        ('kind = "improved"\nmetric = "val_loss"', 'improved(metric="val_loss")'),
        ('kind = "every_steps"\nevery = 5\nafter = 100', "every_steps(every=5, after=100)"),
        ('kind = "not"\nrule = { kind = "window", until = 1000 }', "not(window(until=1000))"),
        (
            'kind = "all"\nrules = [{ kind = "every_steps", every = 100 }, { kind = "window", after = "90%" }]',
            "all(every_steps(every=100), window(after=90%))",
        ),
    ],
)
def test_reason_text(rule, reason):
    from saverules.engine.rules import describe

    assert describe(policy(rule).rules[0]) == reason


# -- clock, events, metrics ---------------------------------------------------------------------


def test_every_time_counts_from_the_first_decision_and_the_last_save():
    d = policy('kind = "every_time"\nevery = "10s"', head="final = false").compile()
    times = {1: 100.0, 2: 105.0, 3: 109.9, 4: 110.0, 5: 115.0, 6: 119.0, 7: 120.5}
    assert [s for s, t in times.items() if d(Progress(s, time=t)).save] == [4, 7]


def test_every_time_never_fires_on_the_first_decision():
    d = policy('kind = "every_time"\nevery = "1s"', head="final = false").compile()
    assert not d(Progress(1, time=10_000.0)).save


def test_every_time_after_a_resume_carries_the_time_since_the_last_save():
    p = policy('kind = "every_time"\nevery = "60s"', head="final = false")
    first = p.compile()
    assert run(first, [1, 2], time=None) == []
    first(Progress(3, time=0.0))
    assert first(Progress(4, time=60.0)).save
    first(Progress(5, time=90.0))
    state = json.loads(json.dumps(first.state_dict()))
    second = p.compile()
    second.load_state_dict(state)
    assert not second(Progress(6, time=119.0)).save
    assert second(Progress(7, time=120.0)).save


def test_a_forced_save_counts_for_every_time_and_tail_and_is_not_saved_twice():
    p = policy('kind = "every_time"\nevery = "10s"', 'kind = "tail"\ninterval = 10')
    d = p.compile(100)
    d(Progress(1, 100, time=0.0))
    d.note_save(5, time=8.0)
    assert not d(Progress(6, 100, time=12.0)).save  # 4 s since the forced save
    assert d(Progress(7, 100, time=18.0)).save
    d.note_save(95, time=50.0)
    assert not d(Progress(95, 100, time=70.0)).save  # every_time fires, but the loop saved 95 already
    assert d(Progress(98, 100, time=71.0)).reasons == ("every_time(every=10s)", "tail(interval=10)")


def test_on_signal_names_numbers_and_true():
    d = policy('kind = "on_signal"\nsignals = ["SIGTERM", "USR1"]', head="final = false").compile()
    got = [s for s, sig in enumerate([False, True, "SIGTERM", "term", 15, 10, "SIGINT", 2, "SIGUSR1", 0], 1)
           if d(Progress(s, signal=sig)).save]
    assert got == [2, 3, 4, 5, 6, 9]  # 10 is SIGUSR1 on Linux


def test_improved_first_report_counts_and_ties_do_not():
    d = policy('kind = "improved"\nmetric = "loss"\nmin_delta = 0.25', head="final = false").compile()
    reports = [None, {"loss": 2.0}, {}, {"loss": 1.875}, {"loss": 1.5}, {"acc": 0.0}, {"loss": 1.25}, {"loss": float("nan")}]
    got = [s for s, m in enumerate(reports, 1) if d(Progress(s, metrics=m)).save]
    assert got == [2, 5]  # 1.875 is within min_delta; 1.25 is exactly 0.25 better, not more


def test_improved_advances_inside_combinators_even_when_the_parent_is_false():
    d = policy(
        'kind = "all"\nrules = [{ kind = "improved", metric = "loss" }, { kind = "window", after = 3 }]',
        head="final = false",
    ).compile()
    got = [s for s, v in enumerate([5.0, 1.0, 3.0, 2.0, 0.5], 1) if d(Progress(s, metrics={"loss": v})).save]
    assert got == [5]  # 3.0 and 2.0 at steps 3-4 do not beat the 1.0 seen at step 2


def test_watches_flags_and_next_step():
    p = saverules.load(ROOT / "rules" / "long-run.toml")
    d = p.compile()
    assert d.watches_time and d.watches_metrics and d.watches_signals and not d.watches_epochs
    assert d.total_steps == 500000
    assert d.next_step == 100  # at_steps [100, 500] comes first
    assert d.next_time == -float("inf")  # the clock starts at the first decision
    d(Progress(1, time=0.0))
    assert d.next_step == 100 and d.next_time == 7200.0
    d(Progress(100, time=50.0))
    assert d.next_step == 500 and d.next_time == 7250.0


# -- state ------------------------------------------------------------------------------------


def test_state_dict_is_versioned_json():
    d = saverules.load(ROOT / "rules" / "default.toml").compile(40000)
    run(d, range(1, 2500), total=40000)
    state = d.state_dict()
    assert state["version"] == 2
    assert json.loads(json.dumps(state)) == state
    with pytest.raises(ValueError, match="version"):
        d.load_state_dict({**state, "version": 99})
    with pytest.raises(ValueError, match="version"):
        d.load_state_dict([])


def test_resume_without_a_total_takes_it_from_the_state():
    p = policy('kind = "every_steps"\nevery = "10%"')
    first = p.compile(100)
    run(first, range(1, 16))
    second = p.compile()
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert run(second, range(16, 101)) == [20, 30, 40, 50, 60, 70, 80, 90, 100]


# -- rule files ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["default.toml", "preemptible.toml", "long-run.toml", "minimind-legacy.toml"])
def test_rule_files_load_and_keep_their_promises(name):
    p = saverules.load(ROOT / "rules" / name)
    packaged = saverules.loads(resources.files("saverules").joinpath("rules", name).read_text(), name)
    assert packaged.digest == p.digest
    sim = p.simulate(p.run.total_steps, p.run.steps_per_epoch, p.run.step_seconds)
    if p.final:
        assert sim.saved_steps[-1] == p.run.total_steps
    # the brute-force oracle, on the file's run shape cut to a length it walks quickly
    total = min(p.run.total_steps, 40_000)
    assert p.simulate(total, p.run.steps_per_epoch, p.run.step_seconds).saves == oracle_saves(
        p, total, p.run.steps_per_epoch, p.run.step_seconds
    )


def test_default_policy_simulates_a_billion_steps_event_by_event():
    p = saverules.load(ROOT / "rules" / "default.toml")
    sim = p.simulate(10**9, steps_per_epoch=5 * 10**8, step_seconds=0.4)
    steps = sim.saved_steps
    assert steps[:3] == [50_000_000, 100_000_000, 150_000_000]
    assert steps[-1] == 10**9 and sim.max_gap_steps == 50_000_000
    # the 5% marks up to the tail zone (19), then the tail halves the last 5% down to
    # nothing: floor(log2(5e7)) + 1 = 26 saves
    assert len(steps) == 19 + 26
    assert steps[19] == 975_000_000 and steps[-2] == 10**9 - 1
    assert sim.kept[-1] == 10**9 and sim.peak_kept <= 3 + 1 + sum(1 for s in steps if s % 10000 == 0)


# -- retention ---------------------------------------------------------------------------------


def _cks(*steps, metric=None, final_last=False):
    return [
        Checkpoint(s, None, None if metric is None or metric[i] is None else {"loss": metric[i]},
                   final_last and i == len(steps) - 1)
        for i, s in enumerate(steps)
    ]


def test_no_retention_table_keeps_everything():
    assert Policy(version=1).retain(_cks(1, 2, 3)) == [True, True, True]


def test_keep_last_defaults_to_one():
    p = loads("version = 1\n[retention]\nkeep_every = 100\n")
    assert p.retention.keep_last == 1
    assert p.retain(_cks(50, 100, 150, 175)) == [False, True, False, True]
    assert p.explain_retention(_cks(50, 100, 150, 175)) == [(), ("keep_every",), (), ("newest", "keep_last")]


def test_final_and_best_are_never_deleted_and_ties_keep_the_earlier_best():
    p = loads('version = 1\n[retention]\nkeep_last = 1\nkeep_best = { metric = "loss" }\n')
    cks = _cks(10, 20, 30, 40, 50, metric=[3.0, 1.0, 1.0, None, 2.0])
    assert p.retain(cks) == [False, True, False, False, True]
    cks = _cks(10, 20, 30, metric=[1.0, 2.0, 5.0], final_last=True) + _cks(40)
    assert p.retain(cks) == [True, False, True, True]  # best, final, newest
    maxed = loads('version = 1\n[retention]\nkeep_best = { metric = "loss", mode = "max", n = 2 }\n')
    assert maxed.retain(_cks(1, 2, 3, 4, 5, metric=[1.0, 3.0, 3.0, 3.0, 0.0])) == [False, True, True, False, True]


def test_retention_in_a_simulation():
    p = policy('kind = "every_steps"\nevery = 10', head="[retention]\nkeep_last = 2\nkeep_every = 50\n")
    sim = p.simulate(125)
    assert sim.kept == [50, 100, 120, 125]
    assert sim.peak_kept <= 2 + 2 + 1
    assert Retention().keep_last == 1


# -- zero is an error, not "off" ------------------------------------------------------------------


@pytest.mark.parametrize(
    "rule",
    [
        'kind = "every_steps"\nevery = 0',
        'kind = "every_steps"\nevery = "0%"',
        'kind = "every_time"\nevery = "0m"',
        'kind = "epoch_end"\nevery = 0',
        'kind = "tail"\ninterval = 0',
        'kind = "at_steps"\nsteps = [0]',
        'kind = "piecewise"\nsegments = [{ every = 0 }]',
        'kind = "every_steps"\nevery = 5\nuntil = 0',
    ],
)
def test_zero_is_rejected_not_off(rule):
    with pytest.raises(PolicyError) as err:
        policy(rule)
    (d,) = err.value.diagnostics
    assert "0" in d.message and ("remove it" in d.message or "at least 1" in d.message)


# -- decisions the quiet path must not skip ---------------------------------------------------------


def test_a_repeated_decision_of_the_same_step_is_decided_in_full():
    # not(every_steps(1)) is false on a new step and true when the same step is asked again
    p = policy('kind = "not"\nrule = { kind = "every_steps", every = 1 }', head="final = false")
    d = p.compile()
    assert not d(Progress(5)).save
    assert d(Progress(5)).save
    w = policy('kind = "all"\nrules = [{ kind = "not", rule = { kind = "every_steps", every = 2 } }, '
               '{ kind = "window", after = 3 }]', head="final = false").compile()
    assert not w(Progress(4)).save and w(Progress(4)).save


def test_a_final_nested_in_a_combinator_remembers_the_total_was_reached():
    # any(every_steps(4), final) becomes true once, at the first decision at or past 10
    p = policy('kind = "all"\nrules = [{ kind = "every_steps", every = 9 }, '
               '{ kind = "any", rules = [{ kind = "every_steps", every = 4 }, { kind = "final" }] }]',
               head="final = false")
    assert run(p.compile(10), [9, 16, 18]) == [9]
    assert p.simulate(40).saved_steps == [36]
    assert [s for s, _ in oracle_saves(p, 40)] == [36]


def test_restoring_a_state_restores_the_runs_total():
    p = policy('kind = "every_steps"\nevery = "50%"', head="[run]\ntotal_steps = 1000\n")
    first = p.compile(100)
    run(first, [10])
    second = p.compile()  # [run] says 1000, the run was 100 steps long
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert second.total_steps == 100
    assert run(second, range(11, 101)) == [50, 100]


def test_simulating_a_clock_rule_behind_an_epoch_rule_visits_few_steps():
    # all(epoch_end, every_time): once the clock passes 48 h, every step would be a candidate;
    # the simulator knows where epochs end and jumps to the first one after that
    p = policy('kind = "all"\nrules = [{ kind = "epoch_end" }, { kind = "every_time", every = "48h" }]',
               head="final = false")
    sim = p.simulate(2_000_000, steps_per_epoch=100_000, step_seconds=1.0)
    # the clock starts at step 1: 48 h later is step 172801, the next epoch ends at 200000
    assert sim.saved_steps == list(range(200_000, 2_000_001, 200_000))
    small = p.simulate(5000, steps_per_epoch=700, step_seconds=100.0)
    assert small.saves == oracle_saves(p, 5000, 700, 100.0)


# -- more saves than a simulation lists -------------------------------------------------------


def test_a_capped_simulation_of_the_default_policy_counts_what_the_full_one_lists():
    p = saverules.load(ROOT / "rules" / "default.toml")
    full = p.simulate(10**8, steps_per_epoch=20_000, step_seconds=0.4, max_saves=None)
    capped = p.simulate(10**8, steps_per_epoch=20_000, step_seconds=0.4, max_saves=1000)
    assert full.complete and full.fired["epoch_end"] == 5000 and len(full.saves) > 5000
    assert not capped.complete and capped.saves == full.saves[:1000]
    assert capped.save_count == len(full.saves) and capped.fired_total == full.fired
    assert capped.last_saves == full.saves[-len(capped.last_saves):] and capped.last_saves[-1][0] == 10**8
    assert capped.unsaved_tail == 0 and capped.summary().startswith(f"{len(full.saves):,} saves (the first 1,000")


def test_a_clock_rule_behind_a_denser_step_rule_never_fires_and_is_counted():
    # every 7 steps at 1 s a step is a save every 7 s: a 10 s clock rule never comes due
    p = policy('kind = "every_time"\nevery = "10s"', 'kind = "every_steps"\nevery = 7')
    sim = p.simulate(10**8, step_seconds=1.0, max_saves=100)
    assert sim.save_count == 10**8 // 7 + 1 and sim.fired_total == {"every_steps(every=7)": 10**8 // 7, "final": 1}
    small = p.simulate(7000, step_seconds=1.0, max_saves=None)
    assert "every_time(every=10s)" not in small.fired and len(small.saves) == 1000
    p = policy('kind = "every_time"\nevery = "10s"', 'kind = "every_steps"\nevery = 13')
    assert p.simulate(10**8, step_seconds=1.0, max_saves=100).save_count is None  # it may fire: not counted


def test_simulate_refuses_a_run_beyond_2_63_minus_1_and_a_bad_cap():
    p = policy('kind = "every_steps"\nevery = 10')
    with pytest.raises(ValueError, match=r"total_steps must be at most 9,223,372,036,854,775,807 \(2\^63-1\)"):
        p.simulate(1 << 63)
    with pytest.raises(ValueError, match="max_saves must be a positive integer or None"):
        p.simulate(100, max_saves=0)
    sim = p.simulate((1 << 63) - 1)
    assert sim.save_count == ((1 << 63) - 1) // 10 + 1 and sim.saves[:2] == [(10, ("every_steps(every=10)",)),
                                                                              (20, ("every_steps(every=10)",))]


def test_a_decision_with_thousands_of_rules_evaluates_only_those_due():
    rules = [f'kind = "every_steps"\nevery = {1000 + i}' for i in range(3000)]
    p = policy(*rules, 'kind = "on_signal"')
    d = p.compile(10**6)
    calls = []
    for node, _ in d._compiled:
        fires = node.fires
        node.fires = lambda prog, run, fires=fires, node=node: calls.append(node) or fires(prog, run)
    assert d(Progress(1000, 10**6)).reasons == ("every_steps(every=1000)",)
    assert len(calls) == 1  # not the 2,999 others nor final
    calls.clear()
    assert d(Progress(1001, 10**6, signal="SIGTERM")).reasons == ("every_steps(every=1001)", "on_signal")
    assert len(calls) == 2


def test_a_new_total_is_judged_at_the_very_step_that_brings_it():
    # final and tail bounds move with the total: a decision that repeats the previous
    # step with a new total must evaluate them there, not only from the next step on
    d = policy(head="final = true").compile()
    assert not d(Progress(14)).save
    d.note_save(14)
    assert not d(Progress(14, total_steps=1)).save  # the total is reached here; step 14 is saved already
    assert not d(Progress(15)).save  # so final does not fire again at 15
    d = policy('kind = "tail"\ninterval = 5', head="final = false").compile()
    assert not d(Progress(10)).save
    assert d(Progress(10, total_steps=12)).reasons == ("tail(interval=5)",)
