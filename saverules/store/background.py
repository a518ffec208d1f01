"""The writer thread of asynchronous saves: one long-lived thread per Checkpointer, one write at a time.

A thread started for each save costs the training thread the moments the new
thread takes to get going, competing for the GIL before ``save`` can return
(0.7 to 10 ms measured on 2 busy cores).  A thread that waits for work costs
a queue put.  The thread is a daemon; at exit the store's own handler waits
for the write in flight and then for the thread to end (see
:mod:`saverules.store.checkpointer`).
"""
from __future__ import annotations

import queue
import sys
import threading
from collections.abc import Callable

__all__ = ["Write", "Writer"]


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
