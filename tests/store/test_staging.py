"""Asynchronous saves that leave the optimizer's tensors to the writer (saverules.store.staging).

Every test here runs a real model and a real optimizer: the writer copies the
parameters and the optimizer's state while the test goes on, and the next
``optimizer.step()`` must wait for that copy.  What is checked is the one
thing that matters: the committed checkpoint holds the state as it was when
``save`` was called, bit for bit, or the save is abandoned with a clear error
and nothing is committed; never a mixture.
"""
from __future__ import annotations

import gc
import warnings

import pytest
import torch

import saverules
from saverules import Progress
from saverules.torch import Checkpointer, CheckpointWarning, StateChangedError

POLICY = """
version = 1
final = false
[[rules]]
kind = "every_steps"
every = 1000000
[storage]
dir = "checkpoints"
format = "{fmt}"
"""

FORMATS = ["tensors", "torch", "safetensors"]


def policy(fmt="tensors"):
    return saverules.loads(POLICY.format(fmt=fmt))


def big_model(seed=0):
    """~64 MB of parameters (~190 MB with AdamW's moments): a copy of it takes a while on this machine."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(2048, 4096), torch.nn.Linear(4096, 2048))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    train(model, opt)
    return model, opt


def train(model, opt, x=None):
    x = torch.randn(4, 2048) if x is None else x
    model(x).square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def cloned(model, opt):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {k: {n: v.clone() for n, v in s.items()} for k, s in opt.state_dict()["state"].items()})


def restored(tmp_path, fmt, build=big_model):
    model, opt = build(seed=1)
    Checkpointer(policy(fmt), tmp_path, read_only=True).load_latest({"model": model, "optimizer": opt})
    return cloned(model, opt)


def assert_same(a, b):
    (ma, oa), (mb, ob) = a, b
    assert ma.keys() == mb.keys() and oa.keys() == ob.keys()
    for k in ma:
        assert torch.equal(ma[k], mb[k]), k
    for k in oa:
        for n in oa[k]:
            assert torch.equal(oa[k][n], ob[k][n]), (k, n)


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_next_optimizer_step_waits_and_the_checkpoint_holds_the_state_at_save(tmp_path, fmt):
    model, opt = big_model()
    ck = Checkpointer(policy(fmt), tmp_path, async_save=True)
    held = 0.0
    for step in range(1, 4):
        model(torch.randn(4, 2048)).square().mean().backward()
        at_save = cloned(model, opt)
        ck.save(Progress(step), {"model": model, "optimizer": opt})
        opt.step()  # at once: the writer is still copying ~190 MB, so this step must wait for it
        opt.zero_grad(set_to_none=True)
        held += ck._async.gate.take_waited()
        ck.wait()
        assert_same(restored(tmp_path, fmt), at_save)
        assert not torch.equal(model.state_dict()["0.weight"], at_save[0]["0.weight"])  # training went on
    ck.close()
    # ~190 MB to copy and step() called at once: the step was held (the copy did not end first)
    assert held > 0


def test_buffers_and_untrained_models_are_copied_before_save_returns(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.BatchNorm1d(512))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = torch.nn.Linear(512, 512)  # trained by no optimizer in the state: changed at any time
    state = {"model": model, "optimizer": opt, "ema": ema}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ema_before = {k: v.clone() for k, v in ema.state_dict().items()}
    with Checkpointer(policy(), tmp_path, async_save=True) as ck:
        ck.save(Progress(1), state)
        model(torch.randn(8, 512))  # a forward pass in train mode updates BatchNorm's running statistics
        with torch.no_grad():
            ema.weight.mul_(0.5)
    assert not torch.equal(model.state_dict()["1.running_mean"], before["1.running_mean"])
    back_model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.BatchNorm1d(512))
    back_ema = torch.nn.Linear(512, 512)
    Checkpointer(policy(), tmp_path).load_latest(
        {"model": back_model, "optimizer": torch.optim.SGD(back_model.parameters(), lr=0.1), "ema": back_ema})
    for k, v in before.items():
        assert torch.equal(back_model.state_dict()[k], v), k
    for k, v in ema_before.items():
        assert torch.equal(back_ema.state_dict()[k], v), k


@pytest.mark.parametrize("on_error", ["raise", "warn"])
def test_a_change_outside_step_during_the_copy_is_never_committed_torn(tmp_path, on_error):
    model, opt = big_model()
    ck = Checkpointer(policy(), tmp_path, async_save=True, on_error=on_error)
    outcomes = []
    for step in range(1, 5):
        at_save = cloned(model, opt)
        ck.save(Progress(step), {"model": model, "optimizer": opt})
        with torch.no_grad():  # in place, not by the optimizer, while the copy is under way
            model[1].bias.add_(1.0)  # small: done long before the copy of ~190 MB (see staging's docstring)
        problems = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                ck.wait()
            except StateChangedError as exc:
                problems.append(str(exc))
        for w in caught:
            assert issubclass(w.category, CheckpointWarning), w
            problems.append(str(w.message))
        assert (on_error == "raise") == all("on_error='warn'" not in p for p in problems)
        if problems:
            assert len(problems) == 1 and "changed while the asynchronous save of step" in problems[0]
            assert "Nothing was committed" in problems[0] and "wait_staged()" in problems[0]
            assert [i.step for i in ck.list()] == [s for s, o in enumerate(outcomes, 1) if o == "committed"]
            outcomes.append("abandoned")
        else:
            assert ck.latest().step == step
            assert_same(restored(tmp_path, "tensors"), at_save)  # copied before the change: the state at save
            outcomes.append("committed")
    ck.close()
    # ~190 MB to copy and a change made at once: the saves saw it
    assert "abandoned" in outcomes, outcomes


def test_wait_staged_lets_a_change_outside_step_through(tmp_path):
    model, opt = big_model()
    with Checkpointer(policy(), tmp_path, async_save=True) as ck:
        at_save = cloned(model, opt)
        ck.save(Progress(1), {"model": model, "optimizer": opt})
        ck.wait_staged()
        with torch.no_grad():
            model[0].weight.add_(1.0)
    assert_same(restored(tmp_path, "tensors"), at_save)


def test_the_hooks_go_with_the_checkpointer(tmp_path):
    model, opt = big_model()
    ck = Checkpointer(policy(), tmp_path, async_save=True)
    ck.save(Progress(1), {"model": model, "optimizer": opt})
    assert len(opt._optimizer_step_pre_hooks) == 1
    ck.save(Progress(2), {"model": model, "optimizer": opt})
    assert len(opt._optimizer_step_pre_hooks) == 1  # once per optimizer, not once per save
    ck.close()
    assert len(opt._optimizer_step_pre_hooks) == 0
    other = Checkpointer(policy(), tmp_path / "b", async_save=True)
    other.save(Progress(1), {"model": model, "optimizer": opt})
    other.wait()
    del other
    gc.collect()
    train(model, opt)  # the hook of a checkpointer that is gone does nothing


def test_a_sync_save_and_a_state_without_optimizer_install_no_hook(tmp_path):
    model, opt = big_model()
    with Checkpointer(policy(), tmp_path) as ck:
        ck.save(Progress(1), {"model": model, "optimizer": opt})
    with Checkpointer(policy(), tmp_path / "b", async_save=True) as ck:
        ck.save(Progress(1), {"model": model})
    assert len(opt._optimizer_step_pre_hooks) == 0


def test_the_stall_told_to_the_decider_includes_the_steps_wait(tmp_path):
    model, opt = big_model()
    with Checkpointer(policy(), tmp_path, async_save=True) as ck:
        ck.save(Progress(1), {"model": model, "optimizer": opt})
        train(model, opt)
        waited = ck._async.gate._waited  # the time step() was held (counted until the write is collected)
        ck.wait()
        cost = ck.decider.save_cost
    assert cost is not None
    stall, write = cost
    assert stall >= waited and write >= stall


def test_an_unclosed_checkpointer_is_collected_and_its_writer_thread_ends(tmp_path):
    import threading
    import weakref

    model, opt = big_model()
    ck = Checkpointer(policy(), tmp_path, async_save=True)
    ck.save(Progress(1), {"model": model, "optimizer": opt})
    ck.wait()
    gone = weakref.ref(ck)
    thread = ck._async.writer._thread
    del ck
    gc.collect()
    assert gone() is None  # the idle writer thread holds no reference to it (nor to its copy buffers)
    thread.join(10)
    assert not thread.is_alive() and thread not in threading.enumerate()
