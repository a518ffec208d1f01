"""saverules.engine.simulate where the mutation sample of issue 17 found it unchecked (docs/testing.md)."""
from __future__ import annotations

from saverules import loads
from saverules.engine.simulate import Simulation


def test_a_complete_simulation_counts_and_sums_its_listed_saves():
    sim = loads('version = 1\n[[rules]]\nkind = "every_steps"\nevery = 10\n').simulate(95)
    assert sim.complete and sim.saved_steps == [10, 20, 30, 40, 50, 60, 70, 80, 90, 95]
    assert sim.save_count == 10 and sim.listed_to == 95
    assert sim.fired_total == sim.fired and sum(sim.fired.values()) >= 10


def test_a_complete_simulation_built_without_counts_takes_them_from_its_listing():
    sim = Simulation(total_steps=30, steps_per_epoch=None, step_seconds=None, saves=[(10, ("every",)), (30, ("final",))],
                     kept=[10, 30], max_gap_steps=20, max_gap_seconds=None, peak_kept=2, fired={"every": 1, "final": 1})
    assert sim.save_count == 2 and sim.fired_total == {"every": 1, "final": 1} and sim.listed_to == 30
    assert sim.unsaved_tail == 0
    assert sim.summary() == "2 saves, 2 kept, largest gap 20 steps"


def test_the_end_of_a_capped_run_is_simulated_up_to_its_last_step_and_no_further():
    # `tail` depends on the run's history, so the saves near the end are simulated after the count; the
    # step after the last (10^6, a multiple of 1000) is outside the run and must not be decided
    p = loads('version = 1\n[[rules]]\nkind = "every_steps"\nevery = 1000\n[[rules]]\nkind = "tail"\ninterval = "5%"\n')
    capped, full = p.simulate(999_999, max_saves=100), p.simulate(999_999, max_saves=None)
    assert not capped.complete and capped.save_count == len(full.saves) and capped.fired_total == full.fired
    assert capped.last_saves and capped.last_saves == full.saves[-len(capped.last_saves):]
    assert capped.last_saved == 999_999 and capped.unsaved_tail == 0
