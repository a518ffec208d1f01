"""The final rule is reached by the first decision at or past the total, even one that repeats a step.

Found by test_resume_policy_change's property: a run saved under a policy without ``final``,
resumed under one with it past the total, whose loop decides the same step again after a forced
save there. That decision reaches the total (the step is saved), so a later step is not saved
again as "final", as the naive oracle says.
"""
from __future__ import annotations

import json

from oracle import Oracle

from saverules import Policy, Progress


def test_a_repeated_step_past_the_total_reaches_the_final_rule_once():
    p1 = Policy.model_validate({"version": 1, "final": False, "rules": []})
    p2 = Policy.model_validate({"version": 1, "final": True, "rules": []})
    first, oracle = p1.compile(1), Oracle(p1, 1)
    item = Progress(1, epoch_end=True)
    assert not first(item).save and not oracle.decide(item)[0]
    resumed, expected = p2.compile(1), oracle.resumed_under(p2)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    got, want = [], []
    for step, epoch in ((1, 1), (2, 2)):
        resumed.note_save(1 if step == 1 else step - 1, None)
        expected.note_save(1 if step == 1 else step - 1, None)
        p = Progress(step, epoch=epoch, epoch_end=True)
        got.append(resumed(p).save)
        want.append(bool(expected.decide(p)[0]))
    assert got == want == [False, False]  # step 1 was saved already; step 2 is not saved again as "final"
