"""The two-tier Checkpointer against moto's standalone S3 server (the wire protocol, through s3fs).

Uploads run in the background: the server is stopped while training goes on,
and the training thread neither waits nor loses the local checkpoint awaiting
its upload.  A failed promotion is reported at the next step as ``on_error``
says; ``close()`` raises DurableError when the final step did not reach the
tier; an unreachable tier is an error at construction; a new node resumes from
the durable tier.
"""
from __future__ import annotations

import uuid
import warnings

import pytest
import torch
from s3_server import BUCKET
from tier_common import durable_steps, local_steps, open_checkpointer, run, tier_policy

from saverules.engine.tiers import simulate_tiers
from saverules.store.errors import CheckpointError, CheckpointWarning, DurableError
from saverules.store.remote.promote import PromotionError
from saverules.store.remote.retry import Retries
from saverules.torch import Checkpointer

#: botocore's own retries off (saverules retries), short timeouts: a stopped server fails fast.
FAST = {"config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2, "read_timeout": 5}}
SHORT = Retries(attempts=2, first=0.05, longest=0.1)


def url() -> str:
    return f"s3://{BUCKET}/tiers-{uuid.uuid4().hex[:8]}"


def test_a_new_node_resumes_from_s3_bit_for_bit(s3, tmp_path):
    u = url()
    pol = tier_policy(u, local_every=1, durable_every=2, keep_local=1, keep_durable=2)
    ck = open_checkpointer(pol, tmp_path / "node1", 6, durable_options=FAST)
    run(ck, range(1, 7), 6, uploads_keep_up=True)
    ck.close()
    sim = simulate_tiers(pol, 6)
    assert sim is not None and durable_steps(ck) == sim.durable.kept == [4, 6]
    fresh = {"w": torch.zeros(64), "n": 0}
    ck2 = open_checkpointer(pol, tmp_path / "node2", 6, durable_options=FAST)
    assert ck2.load_latest(fresh).step == 6
    assert ck2.resumed_from == ("durable", "step-00000006")
    assert torch.equal(fresh["w"], torch.full((64,), 6.0))
    ck2.close()


def test_uploads_run_in_the_background_and_the_pending_local_copy_survives_retention(s3, tmp_path):
    u = url()
    pol = tier_policy(u, local_every=1, durable_every=3, keep_local=1, keep_durable=3)
    ck = open_checkpointer(pol, tmp_path / "local", 9, durable_options=FAST, durable_retries=SHORT,
                           on_error="warn")
    try:
        run(ck, range(1, 3), 9)
        s3.stop()  # the tier goes away: the promotion of step 3 cannot finish while it is down
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CheckpointWarning)
            state = run(ck, range(3, 9), 9)  # the training thread goes on through steps 3..8
        assert state["n"] == 8
        # step 3 waits for its upload (or failed it): local retention (keep_last = 1) spared it
        assert "step-00000003" in ck._committer.protected()
        assert 3 in local_steps(tmp_path / "local")
    finally:
        s3.start()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointWarning)
        run(ck, range(9, 10), 9)
        ck.close(timeout=120)  # the final step reaches the tier once the server is back
    assert 9 in durable_steps(ck)
    sim = simulate_tiers(pol, 9)
    assert sim is not None and local_steps(tmp_path / "local") == sim.local_kept == [9]


@pytest.mark.parametrize("on_error", ["raise", "warn"])
def test_a_failed_promotion_is_reported_at_the_next_step_as_on_error_says(s3, tmp_path, on_error):
    u = url()
    pol = tier_policy(u, local_every=1, durable_every=2, keep_local=1, keep_durable=2)
    ck = open_checkpointer(pol, tmp_path / "local", 10, durable_options=FAST, durable_retries=SHORT,
                           on_error=on_error)
    try:
        run(ck, range(1, 2), 10)
        s3.stop()
        run(ck, range(2, 3), 10)  # promotes step 2, which fails in the background
        promoter = ck._committer.promoter
        assert promoter is not None and promoter.drain(120, bar=False)
        if on_error == "raise":
            with pytest.raises(PromotionError, match=r"step-00000002 \(step 2\).*failed"):
                run(ck, range(3, 4), 10)
        else:
            with pytest.warns(CheckpointWarning, match=r"step-00000002 \(step 2\).*failed.*training continues"):
                run(ck, range(3, 4), 10)
        assert "step-00000002" in ck._committer.protected()  # the local copy stays protected
        assert 2 in local_steps(tmp_path / "local")
    finally:
        s3.start()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointWarning)
        run(ck, range(4, 5), 10)  # a later promotion tries again, and releases step 2
        ck.close(timeout=120)
    assert 4 in durable_steps(ck)
    assert 2 not in local_steps(tmp_path / "local")


def test_close_raises_when_the_final_step_did_not_reach_the_tier_and_lets_go_of_the_local_lock(s3, tmp_path):
    u = url()
    pol = tier_policy(u, local_every=1, durable_every=10, keep_local=2, keep_durable=2)
    ck = open_checkpointer(pol, tmp_path / "local", 3, durable_options=FAST,
                           durable_retries=Retries(attempts=3, first=1.0, longest=2.0))
    try:
        run(ck, range(1, 3), 3)
        s3.stop()
        run(ck, range(3, 4), 3)  # the final step: promoted, and the server is down
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CheckpointWarning)
            with pytest.raises(DurableError, match=r"the final step, step 3 \(step-00000003\), did not reach the "
                                                   r"durable tier .*(still running|still queued|failed)") as err:
                ck.close(timeout=0.5)
        assert err.value.step == 3
    finally:
        s3.start()
    assert 3 in local_steps(tmp_path / "local")
    other = Checkpointer(tier_policy(url()), dir=tmp_path / "local", durable_options=FAST)  # the lock is free
    other.close()


def test_an_unreachable_tier_is_an_error_at_construction(s3, tmp_path):
    s3.stop()
    try:
        with pytest.raises(CheckpointError, match=r"durable tier|s3://"):
            Checkpointer(tier_policy(url()), dir=tmp_path / "local", durable_options=FAST)
    finally:
        s3.start()
    Checkpointer(tier_policy(url()), dir=tmp_path / "local", durable_options=FAST).close()  # lock let go


def test_a_tier_that_goes_down_before_the_resume_leaves_the_local_tier_to_resume_from(s3, tmp_path):
    u = url()
    pol = tier_policy(u, local_every=1, durable_every=2, keep_local=2, keep_durable=2)
    ck = open_checkpointer(pol, tmp_path / "node", 5, durable_options=FAST)
    run(ck, range(1, 4), 5, uploads_keep_up=True)
    ck.close(timeout=60)
    ck2 = open_checkpointer(pol, tmp_path / "node", 5, durable_options=FAST, durable_retries=SHORT)
    s3.stop()
    try:
        fresh = {"w": torch.zeros(64), "n": 0}
        with pytest.warns(CheckpointWarning, match=r"could not list the durable tier .*resuming from the local tier"):
            assert ck2.load_latest(fresh).step == 3
        assert ck2.resumed_from == ("local", "step-00000003")
        assert fresh["n"] == 3
    finally:
        s3.start()
    ck2.close(timeout=60)
