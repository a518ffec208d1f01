"""Asynchronous saves: copy the state's tensors into CPU memory the background writer owns.

A :class:`Snapshot` is made in the training thread (that copy is the only
stall of an async save) and handed to the writer.  Tensors sharing one
storage are copied once and stay shared.  Buffers of the previous snapshot
are reused when the sizes match, so a steady state copies into memory that is
already mapped.
"""
from __future__ import annotations

import ctypes
from typing import Dict, List, Optional

import torch

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
                # One plain memcpy (the GIL is released): steadier than Tensor.copy_, whose
                # worker threads slow to a crawl when other processes hold the cores.
                ctypes.memmove(buf.data_ptr(), st.data_ptr(), nbytes)
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
        """Wait for copies from devices still in flight."""
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
