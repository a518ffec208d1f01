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


CLOCKED = """
version = 1
[[rules]]
kind = "every_steps"
every = 50
[durable]
dir = "memory://tiers/run"
[[durable.rules]]
kind = "every_time"
every = "2s"
[[durable.rules]]
kind = "on_signal"
"""


def test_ranks_with_skewed_clocks_and_one_rank_signalled_take_the_same_decisions_in_both_tiers():
    from ddp_fake import ThreadGroup

    from saverules import Progress
    from saverules.engine.tiers import TieredDecider

    policy = saverules.loads(CLOCKED)
    total = 600
    group = ThreadGroup(2)

    def body(rank: int):
        sd = group.wrap(policy.compile(total), rank)
        assert isinstance(sd.inner, TieredDecider) and not sd.deterministic
        out = []
        for step in range(1, total + 1):
            # rank 1's clock runs twice as fast and 500 s ahead; only rank 1 gets SIGUSR1, at step 333
            clock = step / 100 if rank == 0 else 500 + step / 50
            sig = "SIGUSR1" if (step, rank) == (333, 1) else False
            d = sd(Progress(step, total, 0, step == total, step == total, clock, None, sig))
            if d.save:
                out.append((step, d.reasons, d.durable))
            if step == 420:  # a manual save that reached the local tier only, told on every rank
                sd.note_save(step, clock, tiers=("local",))
        return out, sd.state_dict()

    (d0, s0), (d1, s1) = group.run(body)
    assert d0 == d1 and s0 == s1
    durable = [(s, r) for s, _, r in d0 if r]
    signal = [s for s, r in durable if any(x.startswith("on_signal") for x in r)]
    assert len(signal) == 1 and 333 <= signal[0] < 433, durable
    timed = [s for s, r in durable if any(x.startswith("every_time") for x in r)]
    assert len(timed) >= 2  # rank 0's clock: 2 s is 200 steps
    assert durable[-1][0] == total and "final" in durable[-1][1]
    assert all(s % 50 == 0 for s, local, _ in d0 if local and local != ("final",))
