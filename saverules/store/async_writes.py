"""Asynchronous saves as a Checkpointer runs them: one write in flight, on a thread that lives as long as it.

In the training thread, :meth:`AsyncWrites.snapshot` makes the
:class:`~saverules.store.snapshot.Snapshot` a save copies into (reusing the
buffers of the previous one), leaving to the writer what only an optimizer's
``step()`` changes (:mod:`~saverules.store.staging`); :meth:`AsyncWrites.start`
hands the prepared job to the writer thread (:class:`Writer`) and holds those
optimizers' next ``step()``.  On the writer,
:meth:`AsyncWrites.copy_late` makes the *late copy* (the copies left to it) and lets the steps go;
then the write runs.  Its outcome (an error, or what it cost) waits for the
training thread's next call to the Checkpointer (:meth:`AsyncWrites.outcome`).

The writer thread is one long-lived thread per Checkpointer, one write at a
time.  A thread started for each save costs the training thread the moments
the new thread takes to get going, competing for the GIL before ``save`` can
return (0.7 to 10 ms measured on 2 busy cores); a thread that waits for work
costs a queue put.  The thread is a daemon; at exit the store's own handler
waits for the write in flight and then for the thread to end (see
:mod:`saverules.store.checkpointer`).
"""
from __future__ import annotations

import queue
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from .snapshot import Job, Pool, Snapshot
from .staging import Gate, changed_by_step

__all__ = ["AsyncWrites", "Write", "Writer"]


class Write:
    """One write handed to the writer thread; ``is_alive`` and ``join`` as for a thread that runs it."""

    def __init__(self) -> None:
        self._done = threading.Event()

    def is_alive(self) -> bool:
        return not self._done.is_set()

    def join(self, timeout: float | None = None) -> None:
        self._done.wait(timeout)


class Writer:
    """Runs the functions it is given, one after the other, on a thread of its own (started on first use)."""

    def __init__(self, name: str = "saverules-writer") -> None:
        self._name = name
        self._queue: queue.SimpleQueue[tuple[Callable[[], None], Write] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def submit(self, fn: Callable[[], None]) -> Write:
        """Run ``fn()`` on the writer thread; ``fn`` reports its own failures."""
        write = Write()
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=_loop, args=(self._queue,), name=self._name, daemon=True)
            self._thread.start()
        self._queue.put((fn, write))
        return write

    def stop(self, wait: float = 5.0) -> None:
        """End the thread once the work already given is done, waiting up to ``wait`` seconds for it.

        Waiting matters at exit: a daemon thread still running when the
        interpreter finalizes is killed mid-call, which aborts the process.
        """
        thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            if thread is not threading.current_thread():
                thread.join(wait)


def _loop(work: queue.SimpleQueue[tuple[Callable[[], None], Write] | None]) -> None:
    while True:
        item = work.get()
        if item is None:
            return
        fn, write = item
        try:
            fn()
        except BaseException as exc:  # pragma: no cover - the store's writes catch and report their own errors
            print(f"saverules: the checkpoint writer failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        finally:
            write._done.set()
            # Drop the references while waiting: the function holds its Checkpointer, which
            # must stay collectable (its finalizer ends this thread).
            del fn, write, item


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
        if self.has_late(job):
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
    def has_late(job: Job) -> bool:
        """The job's snapshot left the late copy to the writer."""
        return job.snapshot is not None and job.snapshot.has_late

    def copy_late(self, job: Job) -> None:
        """On the writer: copy what only the optimizers' step() changes, then let the steps go."""
        try:
            stage_late = getattr(job.payload, "stage_late", None)  # a format that stages its own (dcp)
            if stage_late is not None:
                stage_late(job.snapshot)
            if job.snapshot is not None:
                job.snapshot.copy_late(job.step)
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
