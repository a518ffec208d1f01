"""Policy.simulate() takes whatever run parameter is not passed from the policy's [run] table."""
from __future__ import annotations

import pytest

from saverules import loads

RUN = """version = 1
final = false
[run]
total_steps = 350
steps_per_epoch = 100
step_seconds = 2.0
save_seconds = 30.0
write_seconds = 40.0
[[rules]]
kind = "epoch_end"
[[rules]]
kind = "every_time"
every = "5m"
"""


def test_simulate_defaults_to_the_run_table():
    policy = loads(RUN)
    sim = policy.simulate()
    assert sim.total_steps == 350 and sim.steps_per_epoch == 100 and sim.step_seconds == 2.0
    assert sim.saved_steps == [100, 200, 300]  # epoch ends; 2 s steps never leave 5 minutes between saves
    assert policy.simulate() == policy.simulate(350, 100, 2.0, save_seconds=30.0, write_seconds=40.0)


def test_what_is_passed_wins_over_the_run_table():
    policy = loads(RUN)
    assert policy.simulate(120).saved_steps == [100]
    assert policy.simulate(350, steps_per_epoch=1000).saved_steps == [151, 301]
    assert policy.simulate(step_seconds=10.0).saved_steps == [31, 61, 91, 100, 130, 160, 190, 200, 230, 260, 290,
                                                               300, 330]


def test_the_run_tables_save_cost_reaches_an_adaptive_rule():
    text = "version = 1\nfinal = false\n[run]\ntotal_steps = 10000\nstep_seconds = 1.0\nmtbf = \"1h\"\n"
    adaptive = text + "[[rules]]\nkind = \"adaptive\"\nmax_overhead = \"1%\"\n"
    policy = loads(adaptive)
    assert policy.simulate().saved_steps == []  # no save cost anywhere: the rule is not simulated
    with_cost = loads(adaptive.replace("mtbf", "save_seconds = 10.0\nmtbf"))
    assert with_cost.simulate().saved_steps == with_cost.simulate(save_seconds=10.0).saved_steps != []


def test_no_total_anywhere_is_a_clear_error():
    policy = loads('version = 1\n[[rules]]\nkind = "every_steps"\nevery = 10\n', source="p.toml")
    with pytest.raises(ValueError, match=r"needs the run's length: pass total_steps=\.\.\., or set total_steps "
                                         r"in the \[run\] table of p.toml"):
        policy.simulate()
