"""Asynchronous saves: copy the state's tensors into CPU memory the background writer owns.

A :class:`Snapshot` is made in the training thread (that copy is the only
stall of an async save) and handed to the writer.  Tensors sharing one
storage are copied once and stay shared.  Buffers of the previous snapshot
are reused when the sizes match, so a steady state copies into memory that is
already mapped.  CPU copies are plain memcpys, gathered while the state is
walked and run at the end in pieces on a few threads (one core's memcpy does
not reach the memory's bandwidth).
"""
from __future__ import annotations

import ctypes
import os
import threading
from typing import Dict, List, Optional, Tuple

import torch

#: Below this many bytes in all, copies run on the calling thread only.
PARALLEL_MIN = 32 << 20
#: Copies are cut into pieces of at most this many bytes, shared out between the threads.
PIECE = 8 << 20
THREADS = max(1, min(4, os.cpu_count() or 1))

#: Free copy buffers by size in bytes, handed from one snapshot to the next.
Pool = Dict[int, List[torch.Tensor]]


class Snapshot:
    """Copies tensors to CPU memory that a background writer may own."""

    def __init__(self, pool: Optional[Pool] = None):
        self.memo: Dict[tuple, torch.UntypedStorage] = {}
        self.pool = pool if pool is not None else {}
        self.buffers: List[torch.Tensor] = []
        self.pinned = torch.cuda.is_available()
        self.needs_sync = False
        self.copies: List[Tuple[int, int, int]] = []  # (destination, source, bytes), run by finish()

    def _buffer(self, nbytes: int, pin: bool) -> torch.Tensor:
        free = self.pool.get(nbytes)
        if free:
            buf = free.pop()
        else:
            buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
        self.buffers.append(buf)
        return buf

    def tensor(self, t: torch.Tensor) -> torch.Tensor:
        """A copy of ``t`` in snapshot memory (the same view of a shared copy for views of one storage)."""
        st = t.untyped_storage()
        nbytes = st.nbytes()
        key = (st.data_ptr(), nbytes, t.device)
        new = self.memo.get(key)
        if new is None:
            on_cpu = t.device.type == "cpu"
            pin = self.pinned and not on_cpu
            buf = self._buffer(nbytes, pin)
            if nbytes and on_cpu:
                # Plain memcpys (the GIL is released), run by finish(): steadier than Tensor.copy_,
                # whose worker threads slow to a crawl when other processes hold the cores.
                self.copies.append((buf.data_ptr(), st.data_ptr(), nbytes))
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
        """Run the CPU copies and wait for copies from devices still in flight."""
        copies, self.copies = self.copies, []
        total = sum(n for _, _, n in copies)
        if THREADS == 1 or total < PARALLEL_MIN:
            for dst, src, n in copies:
                ctypes.memmove(dst, src, n)
        else:
            pieces = [(dst + o, src + o, min(PIECE, n - o)) for dst, src, n in copies for o in range(0, n, PIECE)]
            errors: List[BaseException] = []

            def work(share) -> None:
                try:
                    for dst, src, n in share:
                        ctypes.memmove(dst, src, n)
                except BaseException as exc:  # pragma: no cover - memmove does not raise
                    errors.append(exc)

            threads = [threading.Thread(target=work, args=(pieces[i::THREADS],), name="saverules-snapshot")
                       for i in range(1, THREADS)]
            for t in threads:
                t.start()
            work(pieces[0::THREADS])
            for t in threads:
                t.join()
            if errors:  # pragma: no cover
                raise errors[0]
        if self.needs_sync:
            torch.cuda.synchronize()

    def release(self) -> Pool:
        """The buffers, for the next snapshot to reuse (call once the write is done with them)."""
        pool: Pool = {}
        for buf in self.buffers:
            pool.setdefault(buf.numel(), []).append(buf)
        self.buffers = []
        self.memo = {}
        return pool
