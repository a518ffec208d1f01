"""The adaptive rule in the trainer callbacks: real HF Trainer and L.Trainer runs on CPU.

Each run saves under ``kind = "adaptive"`` while rank 0's model sleeps 0.1 s, 0.1 s, then
1.5 s in its saves (tests/helpers/adaptive_callback_child.py), so the measured save cost
really changes.  The first run is SIGKILLed once its third save has ended, and a second
process resumes it.  The tests read the manifests on disk (each records the run's latest
costs, its own last) and each rank's result, and check that:

- every measured cost holds the sleep of its save (the callback times the whole save);
- every adaptive save comes T after the previous save, with T from the formula
  (tests/helpers/adaptive_runs.py) for the costs measured up to that save: never earlier,
  and late by at most a step (under DDP: a sync interval and a step);
- the resumed process plans with the costs of the save it resumed from, the 1.5 s one
  included (which the callback state written inside that save cannot hold), so the first
  gap after the resume follows the same interval the killed run was on;
- under DDP, both ranks save the same steps and end with the same costs in their deciders,
  and the deciders issue one collective per sync step: the costs take none of their own.
"""
from __future__ import annotations

import pytest
from adaptive_runs import POLICY, SLEEPS, check_intervals, interval, launch, manifests, result

pytestmark = pytest.mark.slow


def crash_and_resume(tmp_path, framework: str, ddp: bool, slack: float) -> None:
    pfile = tmp_path / "policy.toml"
    pfile.write_text(POLICY)
    out = tmp_path / "run"
    launch(framework, out, pfile, "--kill-after-saves", "3", "--max-steps", "400", ddp=ddp, killed=True)
    before = manifests(out, framework)
    assert len(before) == 3, [d["step"] for d in before]
    for doc, sleep in zip(before, SLEEPS):
        assert doc["save_costs"][-1][0] >= sleep  # the stall holds the save's own sleep
    assert [len(d["save_costs"]) for d in before] == [1, 2, 3]
    third = before[-1]["save_costs"]
    # the third save's cost moves the interval: without it a resume would plan far too short a gap
    assert interval(third) > interval(third[:-1]) + 0.3

    launch(framework, out, pfile, "--resume", "--max-steps", str(before[-1]["step"] + 150), ddp=ddp)
    docs = manifests(out, framework)
    assert [d["step"] for d in docs[:3]] == [d["step"] for d in before]
    after = docs[3:]
    assert after and any(r.startswith("adaptive") for r in after[0]["reasons"]), [d["reasons"] for d in after]
    used = check_intervals(docs, slack)
    assert used[3] == interval(third)  # the first gap after the resume: the interval of the killed run
    r0 = result(out, 0)
    assert r0["resumed"] and r0["saved"] == [d["step"] for d in after]
    # the resumed decider started from the costs recorded at the third save, its own included
    assert [tuple(c) for c in after[0]["save_costs"][:-1]] == [tuple(c) for c in third][-2:]
    # it plans with the costs of the saves so far; under DDP rank 0's latest report rides in the next
    # sync, and a final save may have none after it (HF), so the deciders may end with the costs before it
    agreed = [[tuple(c) for c in d["save_costs"]] for d in (docs[-2:] if ddp else docs[-1:])]
    assert [tuple(c) for c in r0["decider_costs"]] in agreed
    if ddp:
        r1 = result(out, 1)
        assert r1["saved"] == r0["saved"]
        assert r1["decider_costs"] == r0["decider_costs"]  # rank 0's costs, agreed by every rank
        # the costs ride in the sync steps' all-reduce: one collective a sync, none of their own
        assert r0["collectives"] == r1["collectives"] == r0["syncs"] == r1["syncs"] > 0


def test_hf_trainer_plans_the_adaptive_interval_from_the_measured_save_and_resumes_it(tmp_path):
    crash_and_resume(tmp_path, "hf", ddp=False, slack=0.5)


def test_hf_trainer_under_torchrun_agrees_on_rank_0s_cost_and_resumes_it(tmp_path):
    crash_and_resume(tmp_path, "hf", ddp=True, slack=1.0)


def test_lightning_plans_the_adaptive_interval_from_the_measured_save_and_resumes_it(tmp_path):
    crash_and_resume(tmp_path, "lightning", ddp=False, slack=0.5)


def test_lightning_ddp_agrees_on_rank_0s_cost_and_resumes_it(tmp_path):
    crash_and_resume(tmp_path, "lightning", ddp=True, slack=1.0)
