"""Round trips through the store: model, optimizer, scaler, scheduler, RNG, plain values, decider."""
from __future__ import annotations

import collections
import random
import warnings

import numpy as np
import pytest
import torch
from store_common import (
    policy,
    policy_toml,
    seed_all,
    small_state,
    tensors_equal,
)

import saverules
from saverules import Progress
from saverules.torch import (
    Checkpointer,
    CheckpointWarning,
    restore_rng_state,
    rng_state,
)

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


DECIDER_POLICY = policy_toml(7, every_time="9s", total_steps=60,
                             rules=[{"kind": "improved", "metric": "loss"}, {"kind": "tail", "interval": 8}])


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
    other = saverules.loads(policy_toml(None, every_time="5s"))
    fresh = Checkpointer(other, tmp_path)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        p = fresh.load_latest({"x": None})
    assert p.step == 4
    # Whether the engine accepts the foreign state or not, the store goes on deciding.
    assert isinstance(fresh.step(Progress(5, time=100.0), {"x": 2}), saverules.Decision)
    # one warning, which names the rule that kept its state and says the new one starts fresh
    (w,) = [w for w in record if "different policy" in str(w.message)]
    assert "decider state (kept: final)" in str(w.message) and "start fresh from step 4" in str(w.message)
