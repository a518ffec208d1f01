"""Asynchronous saves as a Checkpointer runs them: one write in flight, on a thread that lives as long as it.

In the training thread, :meth:`AsyncWrites.snapshot` makes the
:class:`~saverules.store.snapshot.Snapshot` a save copies into (reusing the
buffers of the previous one), leaving to the writer what only an optimizer's
``step()`` changes (:mod:`~saverules.store.staging`); :meth:`AsyncWrites.start`
hands the prepared job to the writer thread (:mod:`~saverules.store.background`)
and holds those optimizers' next ``step()``.  On the writer,
:meth:`AsyncWrites.copy_late` makes the copies left to it and lets the steps go;
then the write runs.  Its outcome (an error, or what it cost) waits for the
training thread's next call to the Checkpointer (:meth:`AsyncWrites.outcome`).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from .background import Write, Writer
from .job import Job
from .snapshot import Pool, Snapshot
from .staging import Gate, changed_by_step

__all__ = ["AsyncWrites"]


class AsyncWrites:
    """The writer thread, the copy buffers, the gate on the optimizers, and the write in flight."""

    def __init__(self) -> None:
        self.writer = Writer()  # started on the first save
        self.gate = Gate()  # holds an optimizer's step() while the writer copies what it changes
        self.pool: Pool = {}  # copy buffers, from one snapshot to the next
        self.pending: Write | None = None  # the write in flight
        self.error: BaseException | None = None
        self.cost: tuple[float, float] | None = None  # (stall, write) of the finished write

    def snapshot(self, state: Mapping[str, Any]) -> tuple[Snapshot, list]:
        """(the snapshot to copy ``state`` into, the optimizers whose tensors it leaves to the writer)."""
        optimizers, late = changed_by_step(state)
        snap, self.pool = Snapshot(self.pool, late), {}
        return snap, optimizers

    def start(self, job: Job, optimizers: list, run: Callable[[Job], None], started: float, stall: float) -> None:
        """Hand ``job`` to the writer thread, which calls ``run(job)``; hold the optimizers' steps meanwhile."""
        if self.late(job):
            self.gate.watch(optimizers)
            self.gate.hold()  # released once the writer has copied the rest (copy_late)
        try:
            self.pending = self.writer.submit(lambda: self._write(job, run, started, stall))
        except BaseException:
            self.gate.release()
            raise

    def _write(self, job: Job, run: Callable[[Job], None], started: float, stall: float) -> None:
        try:
            run(job)
        except BaseException as err:
            self.error = err
        else:
            self.cost = (stall, time.perf_counter() - started)
        finally:
            self.gate.release()  # also when the write failed before copying
            snapshot, job.snapshot, job.payload = job.snapshot, None, None
            if snapshot is not None:
                self.pool = snapshot.release()

    @staticmethod
    def late(job: Job) -> bool:
        """The job's snapshot left copies to the writer."""
        return job.snapshot is not None and job.snapshot.pending

    def copy_late(self, job: Job) -> None:
        """On the writer: copy what only the optimizers' step() changes, then let the steps go."""
        try:
            stage_late = getattr(job.payload, "stage_late", None)  # a format that put tensors off (dcp)
            if stage_late is not None:
                stage_late(job.snapshot)
            job.snapshot.finish_later(job.step)
        finally:
            self.gate.release()

    def busy(self) -> bool:
        return self.pending is not None and self.pending.is_alive()

    def join(self) -> None:
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.join()

    def outcome(self) -> tuple[tuple[float, float] | None, BaseException | None]:
        """(cost, error) of the finished write, each once; the stall includes the steps' wait at the gate."""
        cost, self.cost = self.cost, None
        if cost is not None:
            cost = (cost[0] + self.gate.take_waited(), cost[1])
        err, self.error = self.error, None
        return cost, err

    def close(self) -> None:
        """Release the steps, remove the hooks, end the thread (after the write in flight)."""
        self.gate.close()
        self.writer.stop()
