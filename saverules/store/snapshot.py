"""The snapshot step of a save: what the training thread hands the writer (:class:`Job`), and the async copy.

A :class:`Job` is one save as the writer gets it: the checkpoint's name,
its manifest but the files, and the captured payload (for an async save
copied into a :class:`Snapshot`).

Asynchronous saves copy the state's tensors into CPU memory the background writer owns.

A :class:`Snapshot` is made in the training thread and handed to the writer.
Storages listed in ``late`` (what only an optimizer's ``step()`` changes,
see :mod:`saverules.store.staging`) are copied by the writer instead
(:meth:`Snapshot.copy_late`: the *late copy*), and their tensors' version counters are
checked after the copy; everything else is copied before ``save`` returns.  Tensors sharing one
storage are copied once and stay shared.  Buffers of the previous snapshot
are reused when the sizes match, so a steady state copies into memory that is
already mapped.  CPU copies are plain memcpys, gathered while the state is
walked and run at the end in pieces on a few threads (one core's memcpy does
not reach the memory's bandwidth).
"""
from __future__ import annotations

import ctypes
import dataclasses
import os
import threading
from collections.abc import Set as AbstractSet
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .state import Payload

#: Below this many bytes in all, copies run on the calling thread only.
PARALLEL_MIN = 32 << 20
#: Copies are cut into pieces of at most this many bytes, shared out between the threads.
PIECE = 8 << 20
THREADS = max(1, min(4, os.cpu_count() or 1))

#: Free copy buffers by size in bytes, handed from one snapshot to the next.
Pool = dict[int, list[torch.Tensor]]


class Snapshot:
    """Copies tensors to CPU memory that a background writer may own."""

    def __init__(self, pool: Pool | None = None, late: AbstractSet[int] = frozenset()):
        self.memo: dict[tuple, torch.UntypedStorage] = {}
        self.late_storages = late
        self.late: list[tuple[int, int, int]] = []  # the late copy, run by copy_late() in the writer
        self.watched: list[tuple[torch.Tensor, int]] = []  # (source tensor, its version when captured)
        self.pool = pool if pool is not None else {}
        self.buffers: list[torch.Tensor] = []
        self.pinned = torch.cuda.is_available()
        self.needs_sync = False
        self.copies: list[tuple[int, int, int]] = []  # (destination, source, bytes), run by finish()

    def _buffer(self, nbytes: int, pin: bool) -> torch.Tensor:
        free = self.pool.get(nbytes)
        if free:
            buf = free.pop()
        else:
            buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
        self.buffers.append(buf)
        return buf

    def tensor(self, t: torch.Tensor, watch: torch.Tensor | None = None, *, record: bool = True) -> torch.Tensor:
        """A copy of ``t`` in snapshot memory (the same view of a shared copy for views of one storage).

        ``watch`` is the tensor whose version counter tells of changes to
        ``t`` (a DTensor for its local shard; ``t`` itself by default);
        ``record=False``: its version was recorded already (:meth:`is_late`).
        """
        st = t.untyped_storage()
        nbytes = st.nbytes()
        key = (st.data_ptr(), nbytes, t.device)
        on_cpu = t.device.type == "cpu"
        late = on_cpu and nbytes > 0 and st.data_ptr() in self.late_storages
        if late and record:
            source = watch if watch is not None else t
            self.watched.append((source, source._version))
        new = self.memo.get(key)
        if new is None:
            pin = self.pinned and not on_cpu
            buf = self._buffer(nbytes, pin)
            if nbytes and on_cpu:
                # Plain memcpys (the GIL is released), run by finish(): steadier than Tensor.copy_,
                # whose worker threads slow to a crawl when other processes hold the cores.
                (self.late if late else self.copies).append((buf.data_ptr(), st.data_ptr(), nbytes))
            elif nbytes:
                src = torch.empty(0, dtype=torch.uint8, device=t.device).set_(st, 0, (nbytes,), (1,))
                buf.copy_(src, non_blocking=pin)
                self.needs_sync = self.needs_sync or pin
            new = buf.untyped_storage()
            self.memo[key] = new
        out = torch.empty(0, dtype=t.dtype)
        out.set_(new, t.storage_offset(), t.size(), t.stride())
        return out

    def finish(self) -> None:
        """Run the CPU copies due now and wait for copies from devices still in flight."""
        copies, self.copies = self.copies, []
        _memmove_all(copies)
        if self.needs_sync:
            torch.cuda.synchronize()

    def is_late(self, t: torch.Tensor, watch: torch.Tensor) -> bool:
        """Whether ``t`` belongs to the late copy, made in the writer; if so, ``watch``'s version counter is recorded now.

        For a format that stages such tensors itself on the writer (calling
        :meth:`tensor` with ``record=False``); :meth:`copy_late` checks the
        counter is unchanged.
        """
        if t.device.type != "cpu" or t.untyped_storage().data_ptr() not in self.late_storages:
            return False
        self.watched.append((watch, watch._version))
        return True

    @property
    def has_late(self) -> bool:
        """Tensors are left to the late copy (:meth:`copy_late`, or a format that stages them in the writer first)."""
        return bool(self.late or self.watched)

    def copy_late(self, step: int) -> None:
        """In the writer: run the late copy, then check that none of their sources changed.

        Raises :class:`~saverules.store.errors.StateChangedError` when one did
        (the copy may be torn).
        """
        copies, self.late = self.late, []
        _memmove_all(copies, threads=1)  # training goes on meanwhile: leave it the other cores
        watched, self.watched = self.watched, []
        changed = [t for t, version in watched if t._version != version]
        if changed:
            from .errors import StateChangedError

            t = changed[0]
            more = f" and {len(changed) - 1} more" if len(changed) > 1 else ""
            raise StateChangedError(
                f"saverules: the state changed while the asynchronous save of step {step} was copying it: a "
                f"{t.dtype} tensor of shape {list(t.shape)}{more} was modified in place other than by its "
                "optimizer's step(). Nothing was committed and older checkpoints are untouched. Call "
                "Checkpointer.wait_staged() before changing parameters or optimizer state outside "
                "optimizer.step(), or save with async_save=False"
            )

    def release(self) -> Pool:
        """The buffers, for the next snapshot to reuse (call once the write is done with them)."""
        pool: Pool = {}
        for buf in self.buffers:
            pool.setdefault(buf.numel(), []).append(buf)
        self.buffers = []
        self.memo = {}
        self.late, self.watched = [], []
        return pool


def _memmove_all(copies: list[tuple[int, int, int]], threads: int = THREADS) -> None:
    """Run (destination, source, bytes) copies, cut into pieces on a few threads when they are large."""
    total = sum(n for _, _, n in copies)
    if threads == 1 or total < PARALLEL_MIN:
        for dst, src, n in copies:
            ctypes.memmove(dst, src, n)
        return
    pieces = [(dst + o, src + o, min(PIECE, n - o)) for dst, src, n in copies for o in range(0, n, PIECE)]
    errors: list[BaseException] = []

    def work(share) -> None:
        try:
            for dst, src, n in share:
                ctypes.memmove(dst, src, n)
        except BaseException as exc:  # pragma: no cover - memmove does not raise
            errors.append(exc)

    helpers = [threading.Thread(target=work, args=(pieces[i::threads],), name="saverules-snapshot")
               for i in range(1, threads)]
    for t in helpers:
        t.start()
    work(pieces[0::threads])
    for t in helpers:
        t.join()
    if errors:  # pragma: no cover
        raise errors[0]


@dataclasses.dataclass
class Job:
    """One save between the training thread and the writer."""

    name: str
    step: int
    manifest: dict[str, Any]
    payload: Payload | None
    snapshot: Snapshot | None = None
    handle: Any = None  # what the committer's start() returned for this save (a sharded save's temporary directory)
