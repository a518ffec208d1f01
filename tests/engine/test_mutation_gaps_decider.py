"""saverules.engine.decider where the mutation sample of issue 17 found it unchecked (docs/testing.md)."""
from __future__ import annotations

import pytest

from saverules import loads

RULES = {
    "epoch_end": 'kind = "epoch_end"',
    "every_steps": 'kind = "every_steps"\nevery = 10',
    "on_signal": 'kind = "on_signal"',
    "every_time": 'kind = "every_time"\nevery = "1h"',
}


@pytest.mark.parametrize("kind", sorted(RULES))
def test_a_decider_watches_the_events_of_its_rules_and_no_others(kind):
    # the callbacks and the DDP agreement read these flags to skip work the policy cannot react to
    decider = loads(f"version = 1\nfinal = false\n[[rules]]\n{RULES[kind]}\n").compile()
    assert decider.watches_epochs == (kind == "epoch_end")
    assert decider.watches_signals == (kind == "on_signal")
    assert decider.watches_time == (kind == "every_time")
    assert not decider.watches_metrics and not decider.watches_last
