"""Two tiers under DDP: every rank's SyncedDecider takes the same decision for each tier.

Ranks are threads talking through tests/helpers/ddp_fake.py's in-process
all-reduce, as in tests/train/test_distributed.py; the inner deciders are the
policy's own (``Policy.compile``).
"""
from __future__ import annotations

import pytest

import saverules
from saverules.distributed import refuse_durable_cost_rules

TIERED = """
version = 1
[[rules]]
kind = "every_steps"
every = 5
[durable]
dir = "memory://tiers/run"
[[durable.rules]]
kind = "every_steps"
every = 3
"""


def test_a_durable_rule_that_plans_with_the_upload_cost_is_refused_under_ddp_by_its_place():
    refuse_durable_cost_rules(saverules.loads(TIERED))  # step rules: fine
    refuse_durable_cost_rules(saverules.loads('version = 1\n[[rules]]\nkind = "adaptive"\nmtbf = "4h"\n'))
    policy = saverules.loads(TIERED + '[[durable.rules]]\nkind = "adaptive"\nmtbf = "4h"\n')
    with pytest.raises(ValueError, match=r"durable.rules\[1\] \(adaptive\) plans with the upload's cost"):
        refuse_durable_cost_rules(policy)
