"""saverules.engine.policy where the mutation sample of issue 17 found it unchecked (docs/testing.md)."""
from __future__ import annotations

import pytest

from saverules import Policy, PolicyError, loads

ADAPTIVE = ("version = 1\nfinal = false\n[run]\ntotal_steps = 10000\nstep_seconds = 1.0\nmtbf = \"1h\"\n"
            "save_seconds = 10.0\n[[rules]]\nkind = \"adaptive\"\nmax_overhead = \"1%\"\n")


def test_a_save_cost_passed_to_simulate_wins_over_the_run_tables():
    policy = loads(ADAPTIVE)
    cheap = policy.simulate(save_seconds=0.5).saved_steps
    assert cheap == loads(ADAPTIVE.replace("save_seconds = 10.0", "save_seconds = 0.5")).simulate().saved_steps
    assert len(cheap) > len(policy.simulate().saved_steps)  # a cheaper save: the adaptive rule saves more often


def test_a_write_as_long_as_its_stall_is_accepted_and_a_shorter_one_refused():
    base = 'version = 1\n[run]\ntotal_steps = 100\nsave_seconds = 10.0\nwrite_seconds = {}\n'
    assert loads(base.format("10.0")).run.write_seconds == 10.0  # the whole write is the stall
    with pytest.raises(PolicyError) as err:
        loads(base.format("9.5"))
    assert "write_seconds (9.5) must be at least save_seconds (10)" in str(err.value)



def test_a_key_given_as_none_in_python_is_not_written_and_not_compared():
    # TOML has no null: a policy built in Python with a key set to None says what the same policy without it says
    built = Policy.model_validate({"version": 1, "run": {"total_steps": 100, "step_seconds": None},
                                   "rules": [{"kind": "every_steps", "every": 10}]})
    loaded = loads('version = 1\n[run]\ntotal_steps = 100\n[[rules]]\nkind = "every_steps"\nevery = 10\n')
    assert built == loaded and "step_seconds" not in built.to_toml()
    assert loads(built.to_toml()) == built
