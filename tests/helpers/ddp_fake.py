"""Test helpers for the DDP agreement tests: a scripted decider and an
in-process "process group" made of threads.

These are test fixtures, not part of saverules.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from saverules.distributed import SyncedDecider
from saverules.engine.progress import Decision, Progress


class ScriptedDecider:
    """A small decider with the Decider interface and rules of each kind.

    ``every``: save when step % every == 0 (a step rule); ``seconds``: save when
    the clock advanced ``seconds`` since the last save (a time rule);
    ``signals``: save on any signal; ``metric``: save when the metric reaches a
    new minimum; ``final``: save the last step.  ``seen`` records every
    Progress it was called with.
    """

    def __init__(self, every=None, seconds=None, signals=False, metric=None, final=True):
        self.every = every
        self.seconds = seconds
        self.signals = signals
        self.metric = metric
        self.final = final
        self.last_time: float | None = None
        self.best: float | None = None
        self.seen: list[Progress] = []

    @property
    def watches_time(self):
        return self.seconds is not None

    @property
    def watches_signals(self):
        return bool(self.signals)

    @property
    def watches_metrics(self):
        return self.metric is not None

    def __call__(self, p: Progress) -> Decision:
        self.seen.append(p)
        reasons = []
        if self.every and p.step % self.every == 0:
            reasons.append(f"every_steps(every={self.every})")
        if self.seconds is not None and p.time is not None:
            if self.last_time is None:
                self.last_time = p.time
            elif p.time - self.last_time >= self.seconds:
                reasons.append(f"every_time(seconds={self.seconds})")
        if self.signals and p.signal:
            reasons.append(f"on_signal({p.signal})")
        if self.metric and p.metrics and self.metric in p.metrics:
            v = p.metrics[self.metric]
            if self.best is None or v < self.best:
                self.best = v
                reasons.append("keep_best")
        if self.final and (p.is_last or (p.total_steps is not None and p.step >= p.total_steps)):
            reasons.append("final")
        if reasons and p.time is not None:
            self.last_time = p.time
        return Decision(bool(reasons), tuple(reasons))

    def note_save(self, step, time=None):
        if time is not None:
            self.last_time = time

    def state_dict(self):
        return {"version": 1, "last_time": self.last_time, "best": self.best}

    def load_state_dict(self, d):
        self.last_time = d["last_time"]
        self.best = d["best"]


class ThreadGroup:
    """``world`` SyncedDeciders that talk through an in-process MAX all-reduce."""

    def __init__(self, world: int):
        self.world = world
        self.barrier = threading.Barrier(world, timeout=20)
        self.slots: list[Any] = [None] * world
        self.calls = 0

    def wrap(self, decider, rank: int, **kw) -> SyncedDecider:
        sd = SyncedDecider(decider, rank=rank, world_size=self.world, **kw)
        group = self

        def allreduce(vec):
            sd.collectives += 1
            group.slots[rank] = list(vec)
            group.barrier.wait()
            out = [max(col) for col in zip(*group.slots)]
            group.barrier.wait()
            return out

        def broadcast(obj):
            sd.collectives += 1
            if rank == 0:
                group.slots[0] = obj
            group.barrier.wait()
            out = group.slots[0]
            group.barrier.wait()
            return out

        sd._allreduce_max = allreduce
        sd._broadcast_object = broadcast
        return sd

    def run(self, fn: Callable[[int], Any]) -> list[Any]:
        """Run ``fn(rank)`` on ``world`` threads and return the results by rank."""
        results: list[Any] = [None] * self.world
        errors: list[BaseException] = []

        def target(r):
            try:
                results[r] = fn(r)
            except BaseException as e:  # surfaced below
                errors.append(e)
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        if errors:
            raise errors[0]
        return results
