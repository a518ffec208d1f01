"""saverules.engine.simulate where the mutation sample of issue 17 found it unchecked (docs/testing.md)."""
from __future__ import annotations

from saverules import loads


def test_a_complete_simulation_counts_and_sums_its_listed_saves():
    sim = loads('version = 1\n[[rules]]\nkind = "every_steps"\nevery = 10\n').simulate(95)
    assert sim.complete and sim.saved_steps == [10, 20, 30, 40, 50, 60, 70, 80, 90, 95]
    assert sim.save_count == 10 and sim.listed_to == 95
    assert sim.fired_total == sim.fired and sum(sim.fired.values()) >= 10
