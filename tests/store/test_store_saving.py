"""Saving: when the store writes, what a checkpoint holds on disk, and which rank writes it."""
from __future__ import annotations

import json
import os

import pytest
import torch
from store_common import (
    checkpoint_dirs,
    hidden_entries,
    policy,
    policy_toml,
    small_state,
)

import saverules
import saverules.torch as st
from saverules import Progress
from saverules.torch import (
    Checkpointer,
)

# --------------------------------------------------------------------------
# Saving and the on-disk format
# --------------------------------------------------------------------------


def test_step_saves_exactly_when_the_policy_says_so(tmp_path):
    ck = Checkpointer(policy(), tmp_path)
    decisions = [ck.step(Progress(s, total_steps=5), small_state(s)) for s in range(1, 6)]
    assert [d.save for d in decisions] == [False, True, False, True, True]
    assert decisions[1].reasons == ("every_steps(every=2)",)
    assert checkpoint_dirs(tmp_path) == ["step-00000002", "step-00000004", "step-00000005"]
    assert hidden_entries(tmp_path) == []


def test_manifest_records_everything(tmp_path):
    pol = policy()
    ck = Checkpointer(pol, tmp_path)
    ck.step(Progress(2, total_steps=10, epoch=1, epoch_end=True, time=12.5, metrics={"loss": 0.25}), small_state())
    d = tmp_path / "step-00000002"
    m = json.loads((d / "manifest.json").read_text())
    assert m["format"] == "saverules-checkpoint" and m["format_version"] == st.FORMAT_VERSION
    assert (m["step"], m["epoch"], m["epoch_end"], m["total_steps"]) == (2, 1, True, 10)
    assert m["time"] == 12.5
    assert m["reasons"] == ["every_steps(every=2)"] and m["final"] is False
    assert m["metrics"] == {"loss": 0.25}
    assert m["policy_digest"] == pol.digest
    assert m["saverules_version"] == saverules.__version__
    assert m["torch_version"] == torch.__version__
    assert m["world_size"] == 1
    assert m["storage_format"] == "torch"
    assert set(m["files"]) == {"state.pt"}
    import xxhash

    data = (d / "state.pt").read_bytes()
    assert m["files"]["state.pt"] == {"size": len(data), "xxh3_128": xxhash.xxh3_128(data).hexdigest()}
    assert sorted(os.listdir(d)) == ["manifest.json", "state.pt"]


def test_state_file_is_plain_and_loads_with_weights_only(tmp_path):
    ck = Checkpointer(policy(), tmp_path)
    ck.save(Progress(3), small_state(2.0))
    payload = torch.load(tmp_path / "step-00000003" / "state.pt", weights_only=True)
    assert payload["step"] == 3
    assert torch.equal(payload["objects"]["model"]["weight"], torch.full((2, 3), 2.0))
    assert payload["values"]["position"] == 7
    assert payload["decider"]["version"] is not None


def test_name_template_with_epoch_and_run(tmp_path):
    pol = policy(name="{run}-e{epoch}-s{step}")
    ck = Checkpointer(pol, tmp_path, run_name="exp1")
    ck.save(Progress(4, epoch=2), small_state())
    assert checkpoint_dirs(tmp_path) == ["exp1-e2-s4"]
    assert ck.latest().name == "exp1-e2-s4"


def test_name_template_with_utc_time(tmp_path):
    from datetime import timezone

    pol = policy(name="s{step}-{time:%Y%m%d}")
    ck = Checkpointer(pol, tmp_path)
    ck.save(Progress(4), small_state())
    info = ck.latest()
    assert info.name == f"s4-{info.utc.astimezone(timezone.utc):%Y%m%d}"
    assert info.utc.utcoffset().total_seconds() == 0


@pytest.mark.parametrize("name", ["../up-{step}", "/abs/{step}", "a/{step}", ".hidden-{step}"])
def test_a_name_template_escaping_the_directory_is_rejected_at_load(tmp_path, name):
    path = tmp_path / "p.toml"
    path.write_text(policy_toml(name=name))
    with pytest.raises(saverules.PolicyError) as info:
        Checkpointer(path, tmp_path / "store")
    assert "p.toml" in str(info.value) and "name" in str(info.value)
    assert not (tmp_path / "store").exists()


def test_manual_save_tells_the_decider(tmp_path):
    pol = saverules.loads(policy_toml(None, every_time="10s", final=False))
    ck = Checkpointer(pol, tmp_path)
    assert ck.step(Progress(1, time=0.0), small_state()).save is False
    d = ck.save(Progress(2, time=8.0), small_state(), reason="manual")
    assert d == saverules.Decision(True, ("manual",))
    assert ck.latest().reasons == ("manual",)
    # Without the note the rule would fire at t=10; it measures from the manual save at t=8.
    assert ck.step(Progress(3, time=11.0), small_state()).save is False
    assert ck.step(Progress(4, time=18.5), small_state()).save is True


def test_save_rejects_an_empty_reason(tmp_path):
    ck = Checkpointer(policy(), tmp_path)
    with pytest.raises(ValueError, match="reason"):
        ck.save(Progress(1), small_state(), reason="")


def test_replacing_a_checkpoint_of_the_same_name(tmp_path):
    ck = Checkpointer(policy(), tmp_path)
    ck.save(Progress(4), small_state(1.0))
    ck.save(Progress(4), small_state(5.0))
    assert checkpoint_dirs(tmp_path) == ["step-00000004"]
    assert hidden_entries(tmp_path) == []
    state = small_state(0.0)
    Checkpointer(policy(), tmp_path).load_latest(state)
    assert torch.equal(state["model"].weight, torch.full((2, 3), 5.0))


# --------------------------------------------------------------------------
# Distributed runs: every rank decides, rank 0 writes
# --------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [0, 1])
def test_only_rank_0_writes_and_the_manifest_records_the_world_size(tmp_path, monkeypatch, rank):
    dist = torch.distributed
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: rank)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    # the ranks compare their policies once (saverules.distributed.agree_on_policy): both hold this one
    monkeypatch.setattr(dist, "all_gather_object", lambda out, obj, group=None: out.__setitem__(slice(None), [obj] * len(out)))
    ck = Checkpointer(policy(), tmp_path / "store")  # step rules only: the decision needs no collective
    assert ck.world_size == 2 and ck.is_writer == (rank == 0)
    decisions = [ck.step(Progress(s, total_steps=4), small_state(s)).save for s in range(1, 5)]
    assert decisions == [False, True, False, True]  # every rank takes the same decisions
    ck.close()
    if rank == 0:
        assert checkpoint_dirs(tmp_path / "store") == ["step-00000002", "step-00000004"]
        m = json.loads((tmp_path / "store" / "step-00000004" / "manifest.json").read_text())
        assert m["world_size"] == 2
    else:
        assert not (tmp_path / "store").exists()
