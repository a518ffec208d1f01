"""SyncedDecider.decide and Checkpointer.step_at, the fields calls, decide exactly as the calls with a Progress.

Two ranks in one process (tests/helpers/ddp_fake.ThreadGroup): the same run through
``decide(step, ...)`` and through ``decider(Progress(...))`` gives the same decisions, the same
agreed signals, the same sync steps and collectives on every rank.
"""
from __future__ import annotations

import random

import pytest
from ddp_fake import ScriptedDecider, ThreadGroup

import saverules
from saverules.distributed import SyncedDecider
from saverules.engine.progress import Progress
from saverules.torch import Checkpointer

TIMED = saverules.loads("""
version = 1
[[rules]]
kind = "every_time"
every = "3s"
[[rules]]
kind = "on_signal"
signals = ["SIGTERM", "SIGUSR1"]
[[rules]]
kind = "improved"
metric = "loss"
[[rules]]
kind = "every_steps"
every = 37
""")
STEPS = saverules.loads('version = 1\n[[rules]]\nkind = "every_steps"\nevery = 25\n[[rules]]\nkind = "epoch_end"\n')


def run_of(seed, total=400):
    """Per rank, the fields of every step: a clock that drifts per rank, signals on one rank at a time,
    the same metrics on both (as ``metrics_synced`` promises)."""
    rng = random.Random(seed)
    runs = {0: [], 1: []}
    clocks = [0.0, 0.0]
    for step in range(1, total + 1):
        metrics = {"loss": rng.uniform(0, 1)} if step % 50 == 0 else None
        for rank in (0, 1):
            clocks[rank] += rng.uniform(0.005, 0.03) * (1 + rank)
            sig = rng.choice(["SIGUSR1", "SIGTERM", True]) if rng.random() < 0.01 else False
            epoch_end = step % 60 == 0
            runs[rank].append((step, total, step // 60 - (1 if epoch_end else 0), epoch_end, step == total,
                               clocks[rank], metrics, sig))
    return runs


def drive(make, runs, fields, **kw):
    group = ThreadGroup(2)

    def body(rank):
        sd = group.wrap(make(), rank, **kw)
        out = []
        for f in runs[rank]:
            d = sd.decide(*f) if fields else sd(Progress(*f))
            out.append((f[0], tuple(d), sd.last_signal, sd.last_signals, sd.collectives, sd.syncs))
        return out, sd.state_dict() if hasattr(sd.inner, "policy") else None

    return group.run(body)


@pytest.mark.parametrize("make, kw", [
    (lambda: TIMED.compile(400), {}),
    (lambda: TIMED.compile(400), {"metrics_synced": True}),
    (lambda: STEPS.compile(400), {}),
    (lambda: STEPS.compile(400), {"sync_signals": True}),
    (lambda: ScriptedDecider(every=30, seconds=2.0, signals=True), {}),  # a decider without the fields call
], ids=["timed", "metrics_synced", "steps", "sync_signals", "scripted"])
@pytest.mark.parametrize("seed", [1, 2])
def test_synced_fields_call_decides_like_the_progress_call(make, kw, seed):
    runs = run_of(seed)
    by_fields = drive(make, runs, True, **kw)
    by_progress = drive(make, runs, False, **kw)
    assert by_fields == by_progress
    (r0, _), (r1, _) = by_fields
    assert [row[1] for row in r0] == [row[1] for row in r1]  # and the ranks agree
    assert any(save for _, (save, _), *_ in r0)


def test_synced_fields_call_refuses_bad_values_like_a_progress():
    sd = SyncedDecider(TIMED.compile(100), rank=0, world_size=1)
    with pytest.raises(ValueError, match="Progress.time must be a finite number"):
        sd.decide(3, time=float("nan"))
    two = SyncedDecider(TIMED.compile(100), rank=1, world_size=2)
    two._next_sync = 50  # between sync steps
    with pytest.raises(ValueError, match="Progress.time must be a finite number"):
        two.decide(3, time=float("inf"))
    with pytest.raises(TypeError, match="Progress.epoch must be an int"):
        two.decide(3, epoch="0", time=1.0)


def test_checkpointer_step_at_saves_what_step_saves(tmp_path):
    import torch

    model = torch.nn.Linear(3, 2)
    runs = run_of(3, total=120)[0]
    policies = saverules.loads("""
version = 1
[[rules]]
kind = "every_steps"
every = 40
[[rules]]
kind = "on_signal"
[[rules]]
kind = "improved"
metric = "loss"
[retention]
keep_last = 10
""")
    out = {}
    for name in ("fields", "progress"):
        with Checkpointer(policies, dir=str(tmp_path / name), total_steps=120) as ckpt:
            decisions = []
            for step, total, epoch, epoch_end, is_last, t, metrics, sig in runs:
                if name == "fields":
                    d = ckpt.step_at(step, {"model": model}, total_steps=total, epoch=epoch, epoch_end=epoch_end,
                                     is_last=is_last, time=t, metrics=metrics, signal=sig)
                else:
                    d = ckpt.step(Progress(step, total, epoch, epoch_end, is_last, t, metrics, sig), {"model": model})
                decisions.append(tuple(d))
            saved = [(i.step, tuple(i.manifest["reasons"]), i.manifest.get("metrics"), i.manifest.get("time"))
                     for i in ckpt.list()]
        out[name] = decisions, saved
    assert out["fields"] == out["progress"]
    assert len(out["fields"][1]) >= 3
