"""saverules.engine.tiers where the mutation sample of issue 17 found it unchecked (docs/testing.md)."""
from __future__ import annotations

import saverules
from saverules.engine.tiers import simulate_tiers

UNEVEN = """version = 1
[run]
total_steps = 5000
step_seconds = 0.5
upload_seconds = 600
[[rules]]
kind = "at_steps"
steps = [1000, 2000, 2500, 4000]
[durable]
dir = "s3://bucket/run1"
[[durable.rules]]
kind = "at_steps"
steps = [1000, 2000, 2500, 4000]
"""


def test_the_upload_lag_names_the_closest_pair_of_durable_saves_not_the_first():
    sim = simulate_tiers(saverules.loads(UNEVEN), 5000, None, 0.5)
    assert [s for s, _ in sim.durable.saves] == [1000, 2000, 2500, 4000, 5000]
    # 1000 steps (500 s) and 500 steps (250 s) apart are both closer than one 600 s upload: the lag is the closest
    assert sim.lag_steps == (2000, 2500)
