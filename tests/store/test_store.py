"""The PyTorch checkpoint store: saving, resuming, retention, formats, async writes."""
from __future__ import annotations

import collections
import hashlib
import json
import os
import random
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from store_common import (
    EVERY_1_KEEP_2,
    EVERY_2,
    REPO,
    TiedNet,
    checkpoint_dirs,
    hidden_entries,
    policy,
    run_ls,
    tensors_equal,
)

import saverules
import saverules.torch as st
from saverules import Progress
from saverules.store import digest, layout, snapshot, writer
from saverules.store import fs as store_fs
from saverules.store import state as store_state
from saverules.store.formats import safetensors_file, torchfile
from saverules.torch import (
    Checkpointer,
    CheckpointWarning,
    StateTypeError,
    restore_rng_state,
    rng_state,
)


def small_state(value: float = 1.0):
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.fill_(value)
        model.bias.fill_(-value)
    return {"model": model, "epoch": 0, "position": 7, "note": "hi", "tensor": torch.arange(4.0) * value}


# --------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"verify": "sha"}, "verify must be one of"),
        ({"on_error": "ignore"}, "on_error must be one of"),
        ({"async_save": "yes"}, "async_save must be True or False"),
        ({"run_name": "a/b"}, "run_name"),
        ({"dir": 3}, "dir must be a path"),
        ({"dir": ""}, "dir must not be empty"),
        ({"sync": 5}, "sync must be a mapping of SyncedDecider options"),
    ],
)
def test_bad_arguments_raise_clear_value_errors(tmp_path, kwargs, message):
    kwargs.setdefault("dir", tmp_path)
    with pytest.raises(ValueError, match=message):
        Checkpointer(policy(), **kwargs)


def test_policy_must_be_a_policy_or_a_path(tmp_path):
    with pytest.raises(ValueError, match="saverules.Policy or the path"):
        Checkpointer({"version": 1}, tmp_path)


def test_policy_path_is_loaded_and_its_text_recorded(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text(EVERY_2 + '\n[storage]\ndir = "unused"\n')
    ck = Checkpointer(path, tmp_path / "store")
    assert ck.dir == (tmp_path / "store").resolve()
    assert (tmp_path / "store" / "policy.toml").read_text() == path.read_text()
    assert ck.policy.digest == saverules.load(path).digest


def test_missing_policy_file_is_a_policy_error(tmp_path):
    with pytest.raises(saverules.PolicyError, match="nope.toml"):
        Checkpointer(tmp_path / "nope.toml", tmp_path)


def test_storage_dir_from_the_policy_is_relative_to_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ck = Checkpointer(policy(EVERY_2, extra='\n[storage]\ndir = "ckpts"\n'))
    assert ck.dir == tmp_path / "ckpts"
    ck.save(Progress(1), small_state())
    assert checkpoint_dirs(tmp_path / "ckpts") == ["step-00000001"]


def test_generated_policy_file_reloads_with_the_same_retention(tmp_path):
    pol = policy(EVERY_2, extra="\n[retention]\nkeep_last = 3\nkeep_every = 10\n"
                 "[retention.keep_best]\nmetric = \"loss\"\nmode = \"min\"\nn = 2\n")
    Checkpointer(pol, tmp_path)
    again = saverules.load(tmp_path / "policy.toml")
    assert again.retention == pol.retention
    assert again.storage == pol.storage


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
    pol = policy(EVERY_2, extra='\n[storage]\nname = "{run}-e{epoch}-s{step}"\n')
    ck = Checkpointer(pol, tmp_path, run_name="exp1")
    ck.save(Progress(4, epoch=2), small_state())
    assert checkpoint_dirs(tmp_path) == ["exp1-e2-s4"]
    assert ck.latest().name == "exp1-e2-s4"


def test_name_template_with_utc_time(tmp_path):
    from datetime import timezone

    pol = policy(EVERY_2, extra='\n[storage]\nname = "s{step}-{time:%Y%m%d}"\n')
    ck = Checkpointer(pol, tmp_path)
    ck.save(Progress(4), small_state())
    info = ck.latest()
    assert info.name == f"s4-{info.utc.astimezone(timezone.utc):%Y%m%d}"
    assert info.utc.utcoffset().total_seconds() == 0


@pytest.mark.parametrize("name", ["../up-{step}", "/abs/{step}", "a/{step}", ".hidden-{step}"])
def test_a_name_template_escaping_the_directory_is_rejected_at_load(tmp_path, name):
    path = tmp_path / "p.toml"
    path.write_text(EVERY_2 + f'\n[storage]\nname = "{name}"\n')
    with pytest.raises(saverules.PolicyError) as info:
        Checkpointer(path, tmp_path / "store")
    assert "p.toml" in str(info.value) and "name" in str(info.value)
    assert not (tmp_path / "store").exists()


def test_manual_save_tells_the_decider(tmp_path):
    pol = saverules.loads('version = 1\nfinal = false\n[[rules]]\nkind = "every_time"\nevery = "10s"\n')
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
# latest(), list(), clock()
# --------------------------------------------------------------------------


def test_latest_is_none_on_an_empty_store(tmp_path):
    ck = Checkpointer(policy(), tmp_path)
    assert ck.latest() is None
    assert ck.list() == []
    assert ck.load_latest({"model": torch.nn.Linear(3, 2)}) is None


def test_latest_and_list(tmp_path):
    ck = Checkpointer(policy(), tmp_path)
    for s in (2, 4, 6):
        ck.save(Progress(s, time=float(s), metrics={"loss": 1.0 / s}), small_state(), reason="manual")
    info = ck.latest()
    assert info.step == 6 and info.time == 6.0 and info.reasons == ("manual",) and info.verified is True
    assert info.path == tmp_path / "step-00000006"
    assert info.utc.tzinfo is not None
    assert info.size == (info.path / "state.pt").stat().st_size
    assert info.metrics == {"loss": 1.0 / 6}
    listed = ck.list()
    assert [i.step for i in listed] == [2, 4, 6]
    assert all(i.verified and i.ok and i.error is None for i in listed)
    assert listed[0].as_checkpoint() == saverules.Checkpoint(2, 2.0, {"loss": 0.5}, False)


def test_clock_is_continuous_across_resumes(tmp_path):
    ck = Checkpointer(policy(), tmp_path)
    ck._clock_offset = 100.0  # as if 100 s of training had happened already
    t = ck.clock()
    assert 100.0 <= t < 105.0
    ck.save(Progress(2, time=t), small_state())
    time.sleep(0.05)
    fresh = Checkpointer(policy(), tmp_path)
    assert fresh.clock() < 5.0
    p = fresh.load_latest(small_state())
    assert p.time == pytest.approx(t)
    c = fresh.clock()
    assert t <= c < t + 5.0
    time.sleep(0.02)
    assert fresh.clock() > c


def test_time_defaults_to_the_checkpointer_clock(tmp_path):
    ck = Checkpointer(policy(), tmp_path)
    ck._clock_offset = 50.0
    ck.save(Progress(2), small_state())
    assert 50.0 <= ck.latest().time < 55.0


# --------------------------------------------------------------------------
# Round trip: model, optimizer, scaler, scheduler, RNG, decider
# --------------------------------------------------------------------------


class Training:
    def __init__(self, seed: int):
        torch.manual_seed(seed)
        self.model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Dropout(0.1),
                                         torch.nn.Linear(16, 3))
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-2, weight_decay=0.1)
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=20)
        self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=2)

    def state(self, **values):
        return {"model": self.model, "optimizer": self.opt, "scheduler": self.sched, "scaler": self.scaler,
                **values}

    def step(self):
        x = torch.randn(5, 6)
        noise = random.random() + float(np.random.rand())
        loss = (self.model(x) ** 2).mean() * (1.0 + noise)
        self.opt.zero_grad()
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()


def seed_all(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@pytest.mark.parametrize("fmt, async_save", [("torch", False), ("torch", True), ("safetensors", False)])
def test_resumed_training_is_bitwise_identical(tmp_path, fmt, async_save):
    total, cut = 10, 6
    seed_all(0)
    ref = Training(1)
    for _ in range(total):
        ref.step()

    seed_all(0)
    run = Training(1)
    pol = policy(fmt=fmt)
    with Checkpointer(pol, tmp_path, async_save=async_save) as ck:
        for s in range(1, cut + 1):
            run.step()
            if s == cut:
                ck.save(Progress(s, epoch=0), run.state(rng=rng_state(), data_position=s * 5, history=[1, 2.5, "x"]))

    seed_all(123)  # a resumed process starts from other generator states
    resumed = Training(99)
    state = resumed.state(rng=None, data_position=None, history=None)
    ck2 = Checkpointer(pol, tmp_path)
    p = ck2.load_latest(state)
    restore_rng_state(state["rng"])
    assert p.step == cut and state["data_position"] == cut * 5 and state["history"] == [1, 2.5, "x"]
    for _ in range(cut, total):
        resumed.step()

    assert tensors_equal(ref.model.state_dict(), resumed.model.state_dict())
    assert tensors_equal(ref.opt.state_dict(), resumed.opt.state_dict())
    assert tensors_equal(ref.scaler.state_dict(), resumed.scaler.state_dict())
    assert ref.sched.state_dict() == resumed.sched.state_dict()
    assert ref.scaler.get_scale() == resumed.scaler.get_scale()


def test_plain_values_come_back_with_their_types(tmp_path):
    values = {
        "epoch": 3, "lr": 0.125, "flag": True, "nothing": None, "name": "run-a", "raw": b"\x00\x01",
        "pair": (1, (2.0, "three")), "nested": {"a": [1, 2, {"b": torch.ones(2, dtype=torch.int16)}], 5: "int key"},
        "half": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3), "size": torch.Size([2, 3]),
        "dtype": torch.float16, "ordered": collections.OrderedDict(x=1, y=2),
    }
    ck = Checkpointer(policy(), tmp_path)
    ck.save(Progress(1), dict(values))
    back = {k: None for k in values}
    Checkpointer(policy(), tmp_path).load_latest(back)
    assert tensors_equal(back, values)
    assert type(back["ordered"]) is collections.OrderedDict


def test_load_latest_requires_a_mapping(tmp_path):
    ck = Checkpointer(policy(), tmp_path)
    ck.save(Progress(1), small_state())
    with pytest.raises(TypeError, match="mutable mapping"):
        ck.load_latest(_ReadOnly(small_state()))


class _ReadOnly(collections.abc.Mapping):
    def __init__(self, d):
        self._d = d

    def __getitem__(self, k):
        return self._d[k]

    def __iter__(self):
        return iter(self._d)

    def __len__(self):
        return len(self._d)


def test_load_latest_warns_about_entries_it_cannot_restore(tmp_path):
    ck = Checkpointer(policy(), tmp_path)
    ck.save(Progress(1), {"model": torch.nn.Linear(3, 2), "ema": torch.nn.Linear(3, 2), "epoch": 2})
    state = {"model": torch.nn.Linear(3, 2), "extra": torch.nn.Linear(1, 1)}
    with pytest.warns(CheckpointWarning) as record:
        Checkpointer(policy(), tmp_path).load_latest(state)
    text = "\n".join(str(w.message) for w in record)
    assert "'ema'" in text and "'extra'" in text
    assert state["epoch"] == 2


def test_load_latest_maps_tensors(tmp_path):
    ck = Checkpointer(policy(), tmp_path)
    ck.save(Progress(1), {"t": torch.ones(3)})
    state = {"t": None}
    Checkpointer(policy(), tmp_path).load_latest(state, map_location=torch.device("cpu"))
    assert state["t"].device.type == "cpu" and torch.equal(state["t"], torch.ones(3))


DECIDER_POLICY = """
version = 1
[run]
total_steps = 60
[[rules]]
kind = "every_steps"
every = 7
[[rules]]
kind = "every_time"
every = "9s"
[[rules]]
kind = "improved"
metric = "loss"
[[rules]]
kind = "tail"
interval = 8
"""


def _progress(s):
    metrics = {"loss": 1.0 / (1 + (s % 13))} if s % 5 == 0 else None
    return Progress(s, total_steps=60, time=s * 1.3, metrics=metrics)


@pytest.mark.parametrize("cut", [9, 23, 40])
def test_decisions_after_resume_equal_an_uninterrupted_run(tmp_path, cut):
    pol = saverules.loads(DECIDER_POLICY)
    reference = pol.compile()
    expected = [tuple(reference(_progress(s))) for s in range(1, 61)]

    d = tmp_path / f"cut{cut}"
    ck = Checkpointer(pol, d)
    got = [tuple(ck.step(_progress(s), {"x": s})) for s in range(1, cut + 1)]
    ck.save(_progress(cut), {"x": cut}, reason="preempted")
    resumed = Checkpointer(pol, d)
    p = resumed.load_latest({"x": None})
    assert p.step == cut
    got += [tuple(resumed.step(_progress(s), {"x": s})) for s in range(cut + 1, 61)]
    # The forced save at `cut` is the only difference: the uninterrupted run is told about it too.
    reference = pol.compile()
    expected = []
    for s in range(1, 61):
        expected.append(tuple(reference(_progress(s))))
        if s == cut:
            reference.note_save(cut, _progress(cut).time)
    assert got == expected
    assert any(e[0] for e in expected[cut:])


def test_decider_state_that_does_not_fit_is_reset_with_a_warning(tmp_path):
    ck = Checkpointer(policy(), tmp_path)
    ck.save(Progress(4), {"x": 1})
    other = saverules.loads('version = 1\n[[rules]]\nkind = "every_time"\nevery = "5s"\n')
    fresh = Checkpointer(other, tmp_path)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        p = fresh.load_latest({"x": None})
    assert p.step == 4
    # Whether the engine accepts the foreign state or not, the store goes on deciding.
    assert isinstance(fresh.step(Progress(5, time=100.0), {"x": 2}), saverules.Decision)
    for w in record:
        assert "decider state" in str(w.message)


# --------------------------------------------------------------------------
# Safe types
# --------------------------------------------------------------------------


class Evil:
    pass


@pytest.mark.parametrize(
    "value, fragment",
    [
        (np.zeros(3), "numpy"),
        (np.float64(1.5), "numpy"),
        ({1, 2}, "sorted list"),
        (Evil(), "Evil"),
        ({"k": [1, object()]}, "state['bad']['k'][1]"),
        ({(1, 2): 3}, "dict key"),
        (torch.zeros(3).to_sparse(), "sparse"),
        (torch.zeros(2, device="meta"), "meta"),
    ],
)
def test_unsafe_values_are_refused_before_anything_is_written(tmp_path, value, fragment):
    ck = Checkpointer(policy(), tmp_path, async_save=True)
    with pytest.raises(StateTypeError) as info:
        ck.save(Progress(1), {"bad": value, "model": torch.nn.Linear(2, 2)})
    assert fragment in str(info.value)
    ck.close()
    assert checkpoint_dirs(tmp_path) == [] and hidden_entries(tmp_path) == []


def test_unsafe_values_raise_even_with_on_error_warn(tmp_path):
    ck = Checkpointer(policy(), tmp_path, on_error="warn")
    with pytest.raises(StateTypeError):
        ck.save(Progress(1), {"bad": np.ones(2)})


def test_state_keys_must_be_strings(tmp_path):
    ck = Checkpointer(policy(), tmp_path)
    with pytest.raises(StateTypeError, match="strings"):
        ck.save(Progress(1), {1: 2})


def test_rng_state_is_safe_and_restores_every_generator(tmp_path):
    seed_all(5)
    if torch.cuda.is_available():  # pragma: no cover - CPU CI
        torch.cuda.manual_seed_all(5)
    snapshot = rng_state()
    expected = (random.random(), float(np.random.rand()), torch.rand(3))
    ck = Checkpointer(policy(), tmp_path)
    ck.save(Progress(1), {"rng": snapshot})
    seed_all(77)
    state = {"rng": None}
    Checkpointer(policy(), tmp_path).load_latest(state)
    restore_rng_state(state["rng"])
    got = (random.random(), float(np.random.rand()), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])
    assert set(state["rng"]) >= {"python", "torch", "numpy"}


def test_restore_rng_state_rejects_non_mappings():
    with pytest.raises(TypeError, match="rng_state"):
        restore_rng_state([1, 2])


# --------------------------------------------------------------------------
# Retention
# --------------------------------------------------------------------------


def test_retention_keeps_the_last_n(tmp_path):
    ck = Checkpointer(policy(EVERY_1_KEEP_2), tmp_path)
    for s in range(1, 6):
        ck.step(Progress(s), small_state(s))
    assert checkpoint_dirs(tmp_path) == ["step-00000004", "step-00000005"]
    assert hidden_entries(tmp_path) == []


def test_retention_keeps_final_and_best(tmp_path):
    pol = policy(EVERY_1_KEEP_2, extra='[retention.keep_best]\nmetric = "loss"\n')
    ck = Checkpointer(pol, tmp_path)
    losses = {1: 5.0, 2: 0.5, 3: 4.0, 4: 3.0, 5: 2.0, 6: 1.0}
    for s in range(1, 7):
        ck.step(Progress(s, metrics={"loss": losses[s]}), small_state(s))
    assert checkpoint_dirs(tmp_path) == ["step-00000002", "step-00000005", "step-00000006"]
    ck.save(Progress(7), small_state(), reason="final")
    for s in (8, 9):
        ck.step(Progress(s), small_state(s))
    assert checkpoint_dirs(tmp_path) == ["step-00000002", "step-00000007", "step-00000008", "step-00000009"]


def test_retention_never_deletes_a_damaged_checkpoint_and_warns_once(tmp_path):
    ck = Checkpointer(policy(EVERY_1_KEEP_2), tmp_path)
    ck.step(Progress(1), small_state())
    with open(tmp_path / "step-00000001" / "state.pt", "r+b") as f:
        f.seek(10)
        byte = f.read(1)
        f.seek(10)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.warns(CheckpointWarning, match="step-00000001.*failed verification"):
        for s in range(2, 5):
            ck.step(Progress(s), small_state(s))
    # The damaged one is not counted: the two newest good ones stay besides it.
    assert checkpoint_dirs(tmp_path) == ["step-00000001", "step-00000003", "step-00000004"]


def test_retention_without_a_table_keeps_everything(tmp_path):
    ck = Checkpointer(policy(EVERY_2), tmp_path)
    for s in range(1, 9):
        ck.step(Progress(s), small_state())
    assert len(checkpoint_dirs(tmp_path)) == 4


def test_retention_keeps_the_checkpoint_just_written(tmp_path):
    # keep_best alone would delete a new checkpoint that is not the best; the store keeps
    # the newest until the next save, so resume always finds the latest state.
    pol = policy(EVERY_1_KEEP_2.replace("keep_last = 2", "keep_last = 1"),
                 extra='[retention.keep_best]\nmetric = "loss"\n')
    ck = Checkpointer(pol, tmp_path)
    ck.step(Progress(1, metrics={"loss": 1.0}), small_state())
    ck.step(Progress(2, metrics={"loss": 2.0}), small_state())
    assert checkpoint_dirs(tmp_path) == ["step-00000001", "step-00000002"]
    ck.step(Progress(3, metrics={"loss": 3.0}), small_state())
    assert checkpoint_dirs(tmp_path) == ["step-00000001", "step-00000003"]


def test_retention_rehashes_old_checkpoints_only_when_it_deletes(tmp_path, monkeypatch):
    keep_10 = EVERY_1_KEEP_2.replace("keep_last = 2", "keep_last = 10")
    ck = Checkpointer(policy(keep_10), tmp_path)
    for s in (1, 2, 3):
        ck.step(Progress(s), small_state(s))
    hashed = []
    real_hash = digest.hash_file

    def counting_hash(path, *args, **kwargs):
        name = Path(path).parent.name
        hashed.append("new" if name.startswith(".tmp-") else name)  # "new": the write being verified
        return real_hash(path, *args, **kwargs)

    monkeypatch.setattr(digest, "hash_file", counting_hash)
    # A new process: nothing is cached. Keeping everything needs no re-hash of old checkpoints.
    Checkpointer(policy(keep_10), tmp_path).step(Progress(4), small_state(4))
    assert hashed == ["new"]
    hashed.clear()
    # When retention deletes, the checkpoints it counts are re-hashed first, each once per process.
    ck = Checkpointer(policy(EVERY_1_KEEP_2), tmp_path)
    ck.step(Progress(5), small_state(5))
    assert checkpoint_dirs(tmp_path) == ["step-00000004", "step-00000005"]
    assert sorted(hashed) == ["new"] + [f"step-{s:08d}" for s in (1, 2, 3, 4)]
    hashed.clear()
    ck.step(Progress(6), small_state(6))
    assert checkpoint_dirs(tmp_path) == ["step-00000005", "step-00000006"]
    assert hashed == ["new"]


# --------------------------------------------------------------------------
# Verification modes
# --------------------------------------------------------------------------


@pytest.mark.parametrize("fmt, expected", [
    # mode: (files re-read in full with their digest compared, from the device?, state files loaded)
    ("torch", {"none": ([], False, 0), "hash": (["state.pt"], False, 0),
               "device": (["state.pt"], True, 0), "load": (["state.pt"], True, 1)}),
    ("tensors", {"none": ([], False, 0), "hash": (["state.pt"], False, 0),  # the data file: size and header
                 "device": (["state.pt", "tensors.safetensors"], True, 0),
                 "load": (["state.pt", "tensors.safetensors"], True, 1)}),
])
def test_verify_modes(tmp_path, monkeypatch, fmt, expected):
    reread, loads = [], []
    real_hash, real_load = digest.hash_file, torchfile.load

    def counting_hash(path, algo="sha256", from_device=False):
        reread.append((Path(path).name, from_device))
        return real_hash(path, algo, from_device)

    def counting_load(*a, **k):
        loads.append(1)
        return real_load(*a, **k)

    monkeypatch.setattr(digest, "hash_file", counting_hash)
    monkeypatch.setattr(torchfile, "load", counting_load)
    for mode, (files, device, n_loads) in expected.items():
        reread.clear(), loads.clear()
        ck = Checkpointer(policy(fmt=fmt), tmp_path / mode, verify=mode)
        ck.save(Progress(1), small_state())
        if fmt == "tensors" and mode == "load":  # decoding checks the structure's digest before unpickling it
            reread.remove(("state.pt", False))
        assert sorted(reread) == sorted((f, device) for f in files), mode
        assert len(loads) == n_loads, mode
        assert ck.latest().step == 1


def test_a_file_that_does_not_read_back_is_not_committed(tmp_path, monkeypatch):
    ck = Checkpointer(policy(), tmp_path)
    ck.save(Progress(2), small_state())
    monkeypatch.setattr(digest, "hash_file", lambda path, *a, **k: (0, "0" * 64))
    with pytest.raises(st.CheckpointVerifyError, match="did not read back"):
        ck.save(Progress(4), small_state())
    monkeypatch.undo()
    assert checkpoint_dirs(tmp_path) == ["step-00000002"] and hidden_entries(tmp_path) == []


# --------------------------------------------------------------------------
# Formats
# --------------------------------------------------------------------------


def test_safetensors_format_splits_weights_and_keeps_ties(tmp_path):
    from safetensors import safe_open

    torch.manual_seed(0)
    net = TiedNet()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.tensor([1, 2, 3])).sum().backward()
    opt.step()
    base = torch.arange(10.0)
    ema = {"w": torch.randn(4), "first": base[:5], "second": base[5:], "strided": base[::3]}
    pol = policy(fmt="safetensors")
    ck = Checkpointer(pol, tmp_path)
    ck.save(Progress(1), {"model": net, "optimizer": opt, "ema": _Holder(ema), "step_count": 1})
    d = tmp_path / "step-00000001"
    assert sorted(os.listdir(d)) == ["manifest.json", "model.safetensors", "state.pt"]
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.emb.weight" in keys and "model.out.weight" not in keys  # the tie is stored once
    assert {"ema.first", "ema.second", "ema.strided", "ema.w"} <= keys
    assert "model.norm.num_batches_tracked" in keys
    payload = torch.load(d / "state.pt", weights_only=True)
    assert payload["objects"]["model"] is None and "state" in payload["objects"]["optimizer"]
    m = json.loads((d / "manifest.json").read_text())
    assert m["storage_format"] == "safetensors" and set(m["files"]) == {"state.pt", "model.safetensors"}

    torch.manual_seed(1)
    net2 = TiedNet()
    opt2 = torch.optim.SGD(net2.parameters(), lr=0.1, momentum=0.9)
    holder = _Holder(None)
    Checkpointer(pol, tmp_path).load_latest({"model": net2, "optimizer": opt2, "ema": holder, "step_count": 0})
    assert tensors_equal(net.state_dict(), net2.state_dict())
    assert net2.out.weight is net2.emb.weight
    assert tensors_equal(opt.state_dict(), opt2.state_dict())
    assert tensors_equal(holder.sd, ema)
    assert holder.sd["first"].untyped_storage().data_ptr() != holder.sd["second"].untyped_storage().data_ptr()


def test_safetensors_writer_round_trips_every_dtype_and_shape(tmp_path):
    import io

    from safetensors import safe_open
    from safetensors.torch import load, load_file

    g = torch.Generator().manual_seed(3)
    weights = {
        "f64": torch.randn(3, 2, dtype=torch.float64, generator=g),
        "f32": torch.randn(5, generator=g),
        "f16": torch.randn(2, 2, generator=g).half(),
        "bf16": torch.randn(7, generator=g).bfloat16(),
        "i64": torch.arange(-3, 3),
        "i32": torch.arange(4, dtype=torch.int32).reshape(2, 2),
        "i16": torch.tensor([-7, 9], dtype=torch.int16),
        "i8": torch.tensor([-128, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "f8": torch.tensor([0.5, -2.0]).to(torch.float8_e4m3fn),
        "strided": torch.arange(12.0).reshape(3, 4).t(),
        "grad": torch.ones(2, requires_grad=True),
    }
    buf = io.BytesIO()
    safetensors_file.write(buf, weights, {"format": "pt"})
    data = buf.getvalue()
    header_len = int.from_bytes(data[:8], "little")
    assert header_len % 8 == 0
    back = load(data)
    assert back.keys() == weights.keys()
    for k, t in weights.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape, k
        raw = lambda x: x.detach().contiguous().reshape(-1).view(torch.uint8)  # noqa: E731 - bitwise compare
        assert torch.equal(raw(back[k]), raw(t)), k
    (tmp_path / "w.safetensors").write_bytes(data)
    with safe_open(str(tmp_path / "w.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert torch.equal(load_file(str(tmp_path / "w.safetensors"))["bf16"], weights["bf16"])


class _Holder:
    """An object with state_dict/load_state_dict around a plain dict of tensors."""

    def __init__(self, sd):
        self.sd = sd

    def state_dict(self):
        return self.sd

    def load_state_dict(self, sd):
        self.sd = sd


def test_safetensors_state_dict_metadata_survives(tmp_path):
    net = TiedNet()
    Checkpointer(policy(fmt="safetensors"), tmp_path).save(Progress(1), {"model": net})
    payload = st.read_checkpoint(Checkpointer(policy(fmt="safetensors"), tmp_path).latest(), "cpu")
    sd = payload.objects["model"]
    assert type(sd) is collections.OrderedDict
    assert sd._metadata == net.state_dict()._metadata
    assert list(sd) == list(net.state_dict())


# --------------------------------------------------------------------------
# Asynchronous saves
# --------------------------------------------------------------------------


def test_async_save_snapshots_at_the_call(tmp_path):
    state = small_state(1.0)
    with Checkpointer(policy(), tmp_path, async_save=True) as ck:
        ck.step(Progress(2), state)
        with torch.no_grad():  # the loop keeps training while the write is in flight
            state["model"].weight.fill_(9.0)
        state["tensor"].fill_(9.0)
    back = small_state(0.0)
    Checkpointer(policy(), tmp_path).load_latest(back)
    assert torch.equal(back["model"].weight, torch.full((2, 3), 1.0))
    assert torch.equal(back["tensor"], torch.arange(4.0))


def test_async_snapshot_keeps_shared_storage_shared():
    base = torch.arange(8.0)
    snap = snapshot.Snapshot()
    copied = store_state.checked({"a": base[:4], "b": base[2:6], "c": base}, "s", snap)
    snap.finish()  # the copies are made here, before the caller may change the state again
    assert copied["a"].untyped_storage().data_ptr() == copied["c"].untyped_storage().data_ptr()
    assert copied["c"].untyped_storage().data_ptr() != base.untyped_storage().data_ptr()
    base.zero_()
    assert torch.equal(copied["b"], torch.tensor([2.0, 3.0, 4.0, 5.0]))


def test_a_large_snapshot_is_copied_in_pieces_on_several_threads(monkeypatch):
    monkeypatch.setattr(snapshot, "THREADS", 3)
    monkeypatch.setattr(snapshot, "PARALLEL_MIN", 1 << 20)
    monkeypatch.setattr(snapshot, "PIECE", 1 << 18)
    g = torch.Generator().manual_seed(0)
    state = {"big": torch.randn(1 << 19, generator=g), "odd": torch.randn(12345, generator=g).double(),
             "view": None, "small": torch.arange(3)}
    state["view"] = state["big"][7:1000]
    snap = snapshot.Snapshot()
    copied = store_state.checked(state, "s", snap)
    snap.finish()
    for k in state:
        assert torch.equal(copied[k], state[k]) and copied[k].data_ptr() != state[k].data_ptr(), k
    assert copied["view"].untyped_storage().data_ptr() == copied["big"].untyped_storage().data_ptr()


def test_async_snapshot_reuses_buffers(tmp_path):
    ck = Checkpointer(policy(), tmp_path, async_save=True)
    ck.save(Progress(1), {"t": torch.ones(1000)})
    ck.wait()
    pooled = [b.data_ptr() for bufs in ck._async.pool.values() for b in bufs]
    assert pooled
    ck.save(Progress(2), {"t": torch.full((1000,), 2.0)})
    ck.wait()
    assert [b.data_ptr() for bufs in ck._async.pool.values() for b in bufs] == pooled
    back = {"t": None}
    Checkpointer(policy(), tmp_path).load_latest(back)
    assert torch.equal(back["t"], torch.full((1000,), 2.0))


def test_at_most_one_write_in_flight(tmp_path, monkeypatch):
    active, peak = [0], [0]
    lock = threading.Lock()
    real_write = writer.write_file

    def slow_write(path, producer):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.05)
        try:
            return real_write(path, producer)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(writer, "write_file", slow_write)
    ck = Checkpointer(policy(EVERY_1_KEEP_2), tmp_path, async_save=True)
    t0 = time.perf_counter()
    ck.step(Progress(1), small_state())
    first = time.perf_counter() - t0
    for s in range(2, 5):
        ck.step(Progress(s), small_state(s))
    ck.close()
    assert peak[0] == 1
    assert first < 0.05  # the first call returned before its write finished
    assert checkpoint_dirs(tmp_path) == ["step-00000003", "step-00000004"]


def test_background_failure_surfaces_at_the_next_step(tmp_path, monkeypatch):
    import errno

    ck = Checkpointer(policy(EVERY_1_KEEP_2), tmp_path, async_save=True)
    ck.step(Progress(1), small_state())
    ck.wait()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_fs.fs, "fsync", full)
    ck.step(Progress(2), small_state())
    ck._async.pending.join()
    monkeypatch.undo()
    with pytest.raises(st.CheckpointWriteError, match="No space left") as info:
        ck.step(Progress(3), small_state())
    assert info.value.errno == errno.ENOSPC
    assert checkpoint_dirs(tmp_path) == ["step-00000001"] and hidden_entries(tmp_path) == []
    ck.step(Progress(4), small_state())
    ck.close()
    assert checkpoint_dirs(tmp_path) == ["step-00000001", "step-00000004"]


def test_background_failure_warns_with_on_error_warn(tmp_path, monkeypatch):
    import errno

    ck = Checkpointer(policy(EVERY_1_KEEP_2), tmp_path, async_save=True, on_error="warn")

    def full(path):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(store_fs.fs, "mkdir", full)
    ck.step(Progress(1), small_state())
    ck._async.pending.join()
    monkeypatch.undo()
    with pytest.warns(CheckpointWarning, match="No space left"):
        d = ck.step(Progress(2), small_state())
    assert d.save
    ck.close()
    assert checkpoint_dirs(tmp_path) == ["step-00000002"]


def test_close_reports_a_pending_failure(tmp_path, monkeypatch):
    import errno

    ck = Checkpointer(policy(), tmp_path, async_save=True)
    monkeypatch.setattr(store_fs.fs, "rename", lambda a, b: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error", a)))
    ck.save(Progress(1), small_state())
    with pytest.raises(st.CheckpointWriteError, match="I/O error"):
        ck.close()
    ck.close()  # reported once


def test_context_manager_does_not_hide_the_loop_exception(tmp_path, monkeypatch):
    import errno

    monkeypatch.setattr(store_fs.fs, "mkdir", lambda p: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error", p)))
    with pytest.raises(KeyError):
        with pytest.warns(CheckpointWarning, match="I/O error"):
            with Checkpointer(policy(), tmp_path, async_save=True) as ck:
                ck.save(Progress(1), small_state())
                raise KeyError("loop failed")


def test_pending_write_completes_at_interpreter_exit(tmp_path):
    script = f"""
import torch, saverules
from saverules.torch import Checkpointer
ck = Checkpointer(saverules.loads('version = 1'), {str(tmp_path)!r}, async_save=True)
ck.save(saverules.Progress(3), {{"w": torch.ones(300000)}})
# no close(): the atexit hook and the writer thread finish the job
"""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    info = st.inspect_checkpoint(tmp_path / "step-00000003", tmp_path)
    assert info.verified is True and info.step == 3


# --------------------------------------------------------------------------
# Start-up housekeeping
# --------------------------------------------------------------------------


def test_leftovers_of_dead_writers_are_cleaned_up(tmp_path):
    ck = Checkpointer(policy(), tmp_path)
    ck.save(Progress(2), small_state(2.0))
    ck.save(Progress(4), small_state(4.0))
    dead = _dead_pid()
    (tmp_path / f".tmp-step-00000006-{dead}-abcd1234").mkdir()
    (tmp_path / f".tmp-step-00000006-{dead}-abcd1234" / "state.pt").write_bytes(b"partial")
    (tmp_path / f".del-step-00000001-{dead}-00000000").mkdir()
    # A replacement interrupted after moving the old copy aside: it must come back.
    os.rename(tmp_path / "step-00000004", tmp_path / f".old-step-00000004-{dead}-11112222")
    # A replacement interrupted after the new copy went in: the old copy is dropped.
    (tmp_path / f".old-step-00000002-{dead}-33334444").mkdir()
    Checkpointer(policy(), tmp_path)
    assert hidden_entries(tmp_path) == []
    assert checkpoint_dirs(tmp_path) == ["step-00000002", "step-00000004"]
    state = small_state(0.0)
    assert Checkpointer(policy(), tmp_path).load_latest(state).step == 4
    assert torch.equal(state["model"].weight, torch.full((2, 3), 4.0))


def test_leftovers_of_live_processes_are_left_alone(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        name = f".tmp-step-00000006-{proc.pid}-abcd1234"
        (tmp_path / name).mkdir()
        Checkpointer(policy(), tmp_path)
        assert hidden_entries(tmp_path) == [name]
    finally:
        proc.kill()
        proc.wait()
    Checkpointer(policy(), tmp_path)
    assert hidden_entries(tmp_path) == []


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --------------------------------------------------------------------------
# saverules.ls
# --------------------------------------------------------------------------


def ls_main(capsys, *args):
    import saverules.ls

    capsys.readouterr()
    rc = saverules.ls.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_ls_lists_checkpoints_with_retention_reasons(tmp_path, capsys):
    pol = policy(EVERY_1_KEEP_2, extra="keep_every = 2\n")
    ck = Checkpointer(pol, tmp_path)
    for s in range(1, 6):
        ck.step(Progress(s, time=60.0 * s), small_state())
    rc, out, err = ls_main(capsys, tmp_path)
    assert rc == 0, err
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("NAME"))
    for column in ("STEP", "CLOCK", "REASONS", "SIZE", "VERIFIED", "KEPT BY"):
        assert column in header
    rows = {line.split()[0]: line for line in lines if line.startswith("step-")}
    assert set(rows) == {"step-00000002", "step-00000004", "step-00000005"}
    assert rows["step-00000002"].rstrip().endswith("keep_every")
    assert "every_steps(every=1)" in rows["step-00000005"] and " 5m " in rows["step-00000005"]
    assert "newest" in rows["step-00000005"] and "keep_last" in rows["step-00000005"]
    assert all(" yes " in row for row in rows.values())


def test_ls_json_and_explicit_policy(tmp_path, capsys):
    ck = Checkpointer(policy(EVERY_1_KEEP_2), tmp_path)
    for s in range(1, 4):
        ck.step(Progress(s), small_state())
    os.unlink(tmp_path / "policy.toml")
    rc, out, _ = ls_main(capsys, tmp_path, "--json")
    assert rc == 0
    data = json.loads(out)
    assert [c["step"] for c in data["checkpoints"]] == [2, 3]
    assert all(c["kept_by"] is None for c in data["checkpoints"])
    assert any("--policy" in note for note in data["notes"])
    pfile = tmp_path.parent / f"{tmp_path.name}-policy.toml"
    pfile.write_text(EVERY_1_KEEP_2.replace("keep_last = 2", "keep_last = 1"))
    data = json.loads(ls_main(capsys, tmp_path, "--json", "--policy", pfile)[1])
    assert [c["kept_by"] for c in data["checkpoints"]] == [[], ["newest", "keep_last"]]


def test_ls_errors_are_clear(tmp_path, capsys):
    # Through `python -m` once, to see that no traceback escapes; the rest in process.
    proc = run_ls(tmp_path / "missing")
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and str(tmp_path / "missing") in proc.stderr
    assert "Traceback" not in proc.stderr
    (tmp_path / "file").write_text("x")
    rc, _, err = ls_main(capsys, tmp_path / "file")
    assert rc == 2 and "not a directory" in err
    rc, _, err = ls_main(capsys, tmp_path, "--policy", tmp_path / "nope.toml")
    assert rc == 2 and "nope.toml" in err and "does not exist" in err
    (tmp_path / "bad.toml").write_text("version = 2\n")
    rc, _, err = ls_main(capsys, tmp_path, "--policy", tmp_path / "bad.toml")
    assert rc == 2 and "bad.toml" in err and "version" in err


def test_ls_on_an_empty_directory(tmp_path, capsys):
    rc, out, _ = ls_main(capsys, tmp_path)
    assert rc == 0
    assert "0 checkpoints" in out


# --------------------------------------------------------------------------
# Import boundaries
# --------------------------------------------------------------------------


def test_importing_saverules_does_not_import_torch():
    code = "import sys, saverules; saverules.loads('version = 1'); assert 'torch' not in sys.modules, 'torch'"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


# --------------------------------------------------------------------------
# docs/checkpoints.md
# --------------------------------------------------------------------------


def test_the_examples_in_docs_checkpoints_run(tmp_path, monkeypatch):
    """The page's ```python blocks run in order, in one namespace (later ones use earlier names)."""
    import re

    text = (REPO / "docs" / "checkpoints.md").read_text()
    blocks = re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)
    assert len(blocks) >= 3
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(store_fs.fs, "fsync", store_fs.fs.fsync)  # put back even if an example fails half-way
    namespace = {"__name__": "__doc_example__"}
    for i, code in enumerate(blocks):
        exec(compile(code, f"docs/checkpoints.md[python block {i + 1}]", "exec"), namespace)
    assert checkpoint_dirs(tmp_path / "checkpoints") == ["step-00000150", "step-00000200"]
    assert checkpoint_dirs(tmp_path / "warn-demo") == ["step-00000011"]
    assert checkpoint_dirs(tmp_path / "checkpoints-async") == ["step-00000002", "step-00000004"]
    assert store_fs.fs.fsync.__self__ is store_fs.fs  # the example put the real fsync back


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


# --------------------------------------------------------------------------
# Hashing while writing (large tensors are hashed behind the writer)
# --------------------------------------------------------------------------


def big_state(value: float = 1.0):
    """Tensors well above the 1 MiB chunk size, one storage shared by two views, and small ones."""
    torch.manual_seed(int(value))
    weight = torch.randn(768, 512)  # 1.5 MiB
    return {
        "model": {"w": weight, "w_t": weight.t(), "half": weight[:384], "small": torch.arange(10.0)},
        "extra": [torch.randn(300_000) * value, torch.zeros(2_000_000, dtype=torch.uint8)],
        "step": 3,
    }


def _file_digests(directory):
    import xxhash

    manifest = json.loads((directory / "manifest.json").read_text())
    for name, entry in manifest["files"].items():
        data = (directory / name).read_bytes()
        yield name, entry, len(data), xxhash.xxh3_128(data).hexdigest()


@pytest.mark.parametrize("fmt", ["torch", "safetensors"])
@pytest.mark.parametrize("async_save", [False, True])
def test_manifest_hash_of_large_tensors_is_the_hash_of_the_file(tmp_path, fmt, async_save):
    ck = Checkpointer(policy(fmt=fmt), tmp_path, async_save=async_save, verify="none")
    state = big_state(2.0)
    ck.save(Progress(1), state)
    ck.close()
    (directory,) = [tmp_path / d for d in checkpoint_dirs(tmp_path)]
    for name, entry, size, digest in _file_digests(directory):
        assert (entry["size"], entry["xxh3_128"]) == (size, digest), name
    back = {"model": None, "extra": None, "step": None}
    assert Checkpointer(policy(fmt=fmt), tmp_path).load_latest(back).step == 1
    assert tensors_equal(back["model"], state["model"]) and tensors_equal(back["extra"], state["extra"])


def test_writer_does_not_wait_for_the_hash_of_tensor_memory(tmp_path, monkeypatch):
    waits = []
    real_submit = digest.HASHER.submit

    def recording_submit(stream, data, wait=False):
        if data is not None:
            waits.append((memoryview(data).nbytes, wait))
        return real_submit(stream, data, wait)

    monkeypatch.setattr(digest.HASHER, "submit", recording_submit)
    Checkpointer(policy(), tmp_path, verify="hash").save(Progress(1), big_state())
    large = [w for n, w in waits if n >= digest.PARALLEL_HASH_MIN]
    assert len(large) >= 2 and not any(large)  # queued by reference, never waited for one by one
    assert Checkpointer(policy(), tmp_path).latest().verified is True


def test_a_chunk_from_foreign_memory_is_hashed_before_write_returns(tmp_path):
    buf = bytearray(os.urandom(3 << 20))
    expected = hashlib.sha256(bytes(buf) + b"tail").hexdigest()  # the digest this test asks for

    def producer(f):
        f.write(memoryview(buf))
        buf[:] = bytes(len(buf))  # the caller reuses its buffer as soon as write returns
        f.write(b"tail")

    entry = writer.write_file(str(tmp_path / "f.bin"), writer.Producer(producer, [torch.zeros(1 << 20)]), "sha256")
    assert entry == {"size": (3 << 20) + 4, "sha256": expected}


def test_a_failed_write_waits_for_the_queued_hashing_before_raising(tmp_path, monkeypatch):
    tensor = torch.randn(1 << 20)
    drained = []
    real_drain = writer.HashingFile.drain

    def recording_drain(self):
        real_drain(self)
        drained.append(self._stream.h.copy().hexdigest())

    def producer(f):
        f.write(memoryview(tensor.numpy()).cast("B"))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer.HashingFile, "drain", recording_drain)
    with pytest.raises(OSError, match="No space"):
        writer.write_file(str(tmp_path / "f.bin"), writer.Producer(producer, [tensor]), "sha256")
    # Before the error left _write_file, the tensor's queued chunk had been hashed (its memory may go now).
    assert drained == [hashlib.sha256(tensor.numpy().tobytes()).hexdigest()]


def test_fresh_files_are_reread_through_a_map_with_the_same_result(tmp_path, monkeypatch):
    path = tmp_path / "data.bin"
    data = os.urandom((2 << 20) + 5)
    path.write_bytes(data)
    expected = (len(data), hashlib.sha256(data).hexdigest())
    assert digest.hash_file(path) == expected
    mapped = []
    real = digest.hash_mapped
    monkeypatch.setattr(digest, "hash_mapped", lambda f, algo: mapped.append(1) or real(f, algo))
    assert digest.hash_file(path) == expected and not mapped  # a file outside a write in progress: plain reads
    monkeypatch.setattr(layout, "INFLIGHT", {str(tmp_path)})
    assert digest.hash_file(path) == expected and mapped == [1]
    (tmp_path / "empty").write_bytes(b"")
    assert digest.hash_file(tmp_path / "empty") == (0, hashlib.sha256(b"").hexdigest())


def test_write_back_of_large_chunks_is_started_in_order_without_gaps(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(writer, "_START_WRITEBACK", lambda fd, offset, n, flags: calls.append((offset, n, flags)))
    tensors = [torch.randn(1 << 18), torch.randn(3 << 18)]  # 1 MiB and 3 MiB

    def producer(f):
        f.write(b"header")
        for t in tensors:
            f.write(memoryview(t.numpy()).cast("B"))
        f.write(b"tail")

    entry = writer.write_file(str(tmp_path / "f.bin"), writer.Producer(producer, tensors))
    assert entry["size"] == (tmp_path / "f.bin").stat().st_size == 6 + (4 << 20) + 4
    assert [(o, n) for o, n, _ in calls] == [(0, 6 + (1 << 20)), (6 + (1 << 20), 3 << 20)]
    assert {flags for _, _, flags in calls} == {2}  # SYNC_FILE_RANGE_WRITE: start, do not wait
