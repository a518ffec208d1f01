"""The Checkpointer with a durable tier on memory:// and file:// (the wire: test_tier_s3.py).

Promotion after the local commit, each tier's kept set after close equal to
simulate_tiers', resume from the durable tier on an empty local directory (a
new node), a damaged durable checkpoint falling back with its reason, signal
saves promoted, the ``durable=`` argument and its errors, an unreachable tier
at construction.
"""
from __future__ import annotations

import logging
import os
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tier_common import durable_steps, local_steps, memory_url, open_checkpointer, run, tier_policy

import saverules
from saverules import Progress
from saverules.engine.tiers import simulate_tiers
from saverules.store.errors import CheckpointError, CheckpointWarning, NoValidCheckpointError
from saverules.store.remote import DurableTier
from saverules.torch import Checkpointer

TOTAL = 12
#: Hypothesis examples of the Checkpointer property: few by default (CI), more with HYPOTHESIS_PROFILE=thorough.
EXAMPLES = 150 if os.environ.get("HYPOTHESIS_PROFILE") == "thorough" else 6


def url_of(kind: str, tmp_path) -> str:
    return memory_url() if kind == "memory" else f"file://{tmp_path / 'durable'}"


@pytest.mark.parametrize("kind", ["memory", "file"])
@pytest.mark.parametrize("async_save", [False, True])
def test_each_tier_ends_with_simulate_tiers_kept_set(tmp_path, kind, async_save, caplog):
    url = url_of(kind, tmp_path)
    pol = tier_policy(url, local_every=1, durable_every=4, keep_local=2, keep_durable=2)
    with caplog.at_level(logging.INFO, logger="saverules.store"):
        ck = open_checkpointer(pol, tmp_path / "local", TOTAL, async_save=async_save)
        run(ck, range(1, TOTAL + 1), TOTAL, uploads_keep_up=True)
        ck.close()
    sim = simulate_tiers(pol, TOTAL)
    assert sim is not None
    assert durable_steps(ck) == sim.durable.kept == [8, 12]
    assert local_steps(tmp_path / "local") == sim.local_kept == [11, 12]
    # every log line of a save names the rules that fired, by tier
    assert "(step 4, local: every_steps(every=1); durable: every_steps(every=4))" in caplog.text
    assert "(step 3, local: every_steps(every=1))" in caplog.text
    assert "promoted step-00000012 (step 12, durable: final, every_steps(every=4))" in caplog.text
    # the manifest lists both tiers' reasons, and the durable ones on their own
    [info] = [i for i in DurableTier(url, writer=False).list() if i.step == 12]
    assert info.manifest["durable"] == ["final", "every_steps(every=4)"]
    assert info.manifest["reasons"] == ["final", "every_steps(every=1)", "durable", "every_steps(every=4)"]


@pytest.mark.parametrize("kind", ["memory", "file"])
def test_a_new_node_resumes_from_the_durable_tier_bit_for_bit(tmp_path, kind, caplog):
    url = url_of(kind, tmp_path)
    pol = tier_policy(url, local_every=1, durable_every=3, keep_local=1, keep_durable=2)
    ck = open_checkpointer(pol, tmp_path / "node1", 10)
    run(ck, range(1, 10), 10, uploads_keep_up=True)  # steps 1..9: durable 3, 6, 9; local keeps 9
    ck.close()
    fresh = {"w": torch.full((64,), -1.0), "n": -1}
    with caplog.at_level(logging.INFO, logger="saverules.store"):
        ck2 = open_checkpointer(pol, tmp_path / "node2", 10)  # an empty local directory
        progress = ck2.load_latest(fresh)
    assert progress is not None and progress.step == 9
    assert ck2.resumed_from == ("durable", "step-00000009")
    assert torch.equal(fresh["w"], torch.full((64,), 9.0)) and fresh["n"] == 9
    assert "of the durable tier" in caplog.text
    assert local_steps(tmp_path / "node2") == [9]  # downloaded into the local store
    ck2.close()
    # the first node resumes from its own copy
    ck3 = open_checkpointer(pol, tmp_path / "node1", 10)
    assert ck3.load_latest({"w": torch.zeros(64), "n": 0}).step == 9
    assert ck3.resumed_from == ("local", "step-00000009")
    ck3.close()


def test_a_damaged_durable_checkpoint_falls_back_to_the_one_before_with_the_reason(tmp_path):
    url = memory_url()
    pol = tier_policy(url, local_every=1, durable_every=3, keep_local=1, keep_durable=3)
    ck = open_checkpointer(pol, tmp_path / "node1", 10)
    run(ck, range(1, 10), 10, uploads_keep_up=True)
    ck.close()
    tier = DurableTier(url, writer=False)
    target = f"{tier.prefix('step-00000009')}/tensors.safetensors"
    data = bytearray(tier.fs.cat_file(target))
    data[-3] ^= 0x01  # one flipped bit in the newest durable checkpoint
    tier.fs.pipe_file(target, bytes(data))
    fresh = {"w": torch.zeros(64), "n": 0}
    ck2 = open_checkpointer(pol, tmp_path / "node2", 10)
    with pytest.warns(CheckpointWarning, match=r"step-00000009.*tensors.safetensors does not match its .* digest"):
        progress = ck2.load_latest(fresh)
    assert progress is not None and progress.step == 6
    assert ck2.resumed_from == ("durable", "step-00000006")
    assert torch.equal(fresh["w"], torch.full((64,), 6.0))
    ck2.close()


def test_every_durable_checkpoint_damaged_on_a_new_node_is_no_valid_checkpoint(tmp_path):
    url = memory_url()
    pol = tier_policy(url, local_every=1, durable_every=5, keep_local=1, keep_durable=1)
    ck = open_checkpointer(pol, tmp_path / "node1", 5)
    run(ck, range(1, 6), 5)
    ck.close()
    tier = DurableTier(url, writer=False)
    tier.fs.pipe_file(f"{tier.prefix('step-00000005')}/tensors.safetensors", b"garbage")
    ck2 = open_checkpointer(pol, tmp_path / "node2", 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointWarning)
        with pytest.raises(NoValidCheckpointError, match="step-00000005"):
            ck2.load_latest({"w": torch.zeros(64), "n": 0})
        assert ck2.load_latest({"w": torch.zeros(64), "n": 0}, if_none_valid="start_fresh") is None
    ck2.close()


def test_a_signal_save_of_the_local_tier_is_promoted(tmp_path):
    url = memory_url()
    pol = tier_policy(url, local_every=100, durable_every=100, keep_local=None, keep_durable=None,
                      extra='[[rules]]\nkind = "on_signal"\nsignals = ["SIGTERM"]\n')
    ck = open_checkpointer(pol, tmp_path / "local", 200)
    state = {"w": torch.zeros(4), "n": 0}
    for s in range(1, 8):
        ck.step(Progress(s, total_steps=200, signal="SIGTERM" if s == 5 else None), state)
    ck.close()  # the run stops there (preempted): what reached the durable tier is the signal save
    assert durable_steps(ck) == [5]
    assert local_steps(tmp_path / "local") == [5]


def test_the_durable_argument_overrides_the_policy_dir(tmp_path):
    url = memory_url()
    pol = tier_policy("memory://never-used/run", local_every=2, durable_every=2)
    ck = open_checkpointer(pol, tmp_path / "local", 4, durable=url)
    assert ck.durable is not None and ck.durable.url == url
    run(ck, range(1, 5), 4)
    ck.close()
    assert DurableTier(url, writer=False).names() == ["step-00000002", "step-00000004"]
    assert DurableTier("memory://never-used/run", writer=False).names() == []


def test_the_durable_argument_and_its_errors(tmp_path):
    plain = saverules.loads('version = 1\n[[rules]]\nkind = "every_steps"\nevery = 1\n')
    with pytest.raises(ValueError, match=r"durable='memory://x/y' was given, but the policy has no \[durable\]"):
        Checkpointer(plain, dir=tmp_path / "a", durable="memory://x/y")
    with pytest.raises(ValueError, match="durable_options was given"):
        Checkpointer(plain, dir=tmp_path / "a", durable_options={"anon": True})
    no_dir = tier_policy(None)
    with pytest.raises(ValueError, match=r"\[durable\] table has no dir.*durable=URL"):
        Checkpointer(no_dir, dir=tmp_path / "b")
    with pytest.raises(ValueError, match="durable must be a URL"):
        Checkpointer(no_dir, dir=tmp_path / "b", durable="")
    with pytest.raises(ValueError, match="durable must be a URL"):
        Checkpointer(no_dir, dir=tmp_path / "b", durable=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="durable_options must be a mapping"):
        Checkpointer(no_dir, dir=tmp_path / "b", durable=memory_url(), durable_options=["x"])  # type: ignore
    with pytest.raises(ValueError, match="'secret'.*credential.*environment"):
        Checkpointer(no_dir, dir=tmp_path / "b", durable=memory_url(), durable_options={"secret": "x"})
    with pytest.raises(ValueError, match="timeout must be"):
        Checkpointer(no_dir, dir=tmp_path / "c", durable=memory_url()).close(timeout=-1)


def test_an_unreachable_durable_tier_is_an_error_at_construction_and_the_local_lock_is_let_go(tmp_path):
    (tmp_path / "a-file").write_text("not a directory")
    bad = f"file://{tmp_path / 'a-file' / 'durable'}"
    pol = tier_policy(bad)
    with pytest.raises(CheckpointError, match=r"durable tier .*a-file/durable.*cannot be written"):
        Checkpointer(pol, dir=tmp_path / "local")
    ok = Checkpointer(pol, dir=tmp_path / "local", durable=memory_url())  # the local store is free again
    ok.close()


def test_a_second_writer_of_the_durable_tier_is_refused_naming_the_holder(tmp_path):
    url = memory_url()
    pol = tier_policy(url)
    first = Checkpointer(pol, dir=tmp_path / "one")
    try:
        with pytest.raises(CheckpointError, match=r"is being written by pid \d+"):
            Checkpointer(pol, dir=tmp_path / "two")
        Checkpointer(pol, dir=tmp_path / "three", read_only=True).close()  # a reader takes no lock
    finally:
        first.close()


def test_a_manual_save_is_promoted_when_asked_and_uploads_reach_the_decider(tmp_path):
    url = memory_url()
    pol = tier_policy(url, local_every=100, durable_every=100, keep_local=None, keep_durable=None)
    ck = open_checkpointer(pol, tmp_path / "local", 1000)
    state = {"w": torch.zeros(4), "n": 0}
    assert ck.save(Progress(3), state).durable == ()
    decision = ck.save(Progress(5), state, "before-eval", durable=True)
    assert decision.durable == ("before-eval",) and decision.tiers == ("local", "durable")
    promoter = ck._committer.promoter
    assert promoter is not None and promoter.drain(60, bar=False)
    ck.step(Progress(6, total_steps=1000), state)  # the upload's wall time goes to the durable decider here
    assert ck.decider.upload_cost is not None
    ck.close()
    assert durable_steps(ck) == [5]
    with pytest.raises(ValueError, match="durable=True needs a durable tier"):
        Checkpointer(saverules.loads("version = 1\n"), dir=tmp_path / "plain").save(Progress(1), state, durable=True)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(local_every=st.integers(1, 4), durable_every=st.integers(1, 7), keep_local=st.integers(1, 3),
       keep_durable=st.integers(1, 3), total=st.integers(1, 16), async_save=st.booleans())
def test_property_each_tier_ends_with_exactly_simulate_tiers_kept_sets(tmp_path_factory, local_every,
                                                                       durable_every, keep_local, keep_durable,
                                                                       total, async_save):
    root = tmp_path_factory.mktemp("prop")
    pol = tier_policy(memory_url(), local_every=local_every, durable_every=durable_every, keep_local=keep_local,
                      keep_durable=keep_durable)
    ck = open_checkpointer(pol, root, total, async_save=async_save)
    run(ck, range(1, total + 1), total, size=4, uploads_keep_up=True)
    ck.close()
    sim = simulate_tiers(pol, total)
    assert sim is not None
    assert durable_steps(ck) == sim.durable.kept
    assert local_steps(root) == sim.local_kept
