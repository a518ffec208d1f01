"""Asynchronous saves: copy what only ``optimizer.step()`` changes while training goes on.

An asynchronous save must copy the state before training changes it.  Most
of the bytes (the parameters an optimizer trains, and that optimizer's own
state) change in one place only: the optimizer's ``step()``.  Between a save
and the next step, a loop runs forward and backward, which read the
parameters and write gradients, neither of which is saved.  So those tensors
are copied by the writer thread while training goes on, and each such
optimizer's next ``step()`` waits, in a step pre-hook, until the copy is
done (the :class:`Gate`).  Everything else (buffers, which a forward pass
may update, models no optimizer in the state trains, plain values, tensors
on a GPU, which are copied at once into pinned memory) is copied in the
training thread before ``save`` returns.

The rule that comes with it: until the copy is done, change those tensors
only through the optimizer's ``step()``, or call
``Checkpointer.wait_staged()`` first.  A change made in that window by some
other means (an in-place edit under ``torch.no_grad()``,
``load_state_dict``) would tear the copy.  As a safety net, every tensor
copied late has its version counter recorded when the save is called and
compared once it is copied; a difference abandons the save with
:class:`~saverules.store.errors.StateChangedError` and commits nothing.  The
net has holes, which is why the rule stands: an in-place operation moves
the counter when it ends, so one still running at the instant of the check
goes unseen, and ``tensor.data`` edits move no counter at all.
"""
from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["Gate", "changed_by_step"]


def _local(t: torch.Tensor) -> torch.Tensor:
    local = getattr(t, "_local_tensor", None)  # a DTensor's shard on this rank
    return local if isinstance(local, torch.Tensor) else t


def changed_by_step(state: Mapping[str, Any]) -> tuple[list[torch.optim.Optimizer], frozenset[int]]:
    """The optimizers of ``state`` and the CPU storages (their data pointers) that only their ``step()`` changes.

    Those are the parameters each optimizer trains and the tensors of its own
    state (moments, step counts).  Only optimizers stored directly under a
    name of ``state`` count: a step elsewhere could not be held.
    """
    optimizers = [obj for obj in state.values() if isinstance(obj, torch.optim.Optimizer)]
    storages = set()
    for opt in optimizers:
        tensors = [p for group in opt.param_groups for p in group["params"]]
        tensors += [v for per_param in opt.state.values() if isinstance(per_param, Mapping)
                    for v in per_param.values() if isinstance(v, torch.Tensor)]
        for t in tensors:
            local = _local(t)
            if local.device.type == "cpu":
                storages.add(local.untyped_storage().data_ptr())
    storages.discard(0)  # empty storages: nothing to copy
    return optimizers, frozenset(storages)


class Gate:
    """Holds the next ``step()`` of each watched optimizer while the writer copies what it changes.

    The hooks hold only a weak reference to the gate, so an optimizer does not
    keep a checkpointer alive; :meth:`close` removes them.
    """

    def __init__(self) -> None:
        self._open = threading.Event()
        self._open.set()
        self._hooks: dict[int, tuple[Any, Any]] = {}  # id(optimizer) -> (weak reference, hook handle)
        self._waited = 0.0

    def watch(self, optimizers: list[torch.optim.Optimizer]) -> None:
        """Hook each optimizer's ``step()`` (once per optimizer)."""
        for opt in optimizers:
            known = self._hooks.get(id(opt))
            if known is not None and known[0]() is opt:
                continue
            gate = weakref.ref(self)

            def hold_step(optimizer, args, kwargs, gate=gate) -> None:
                g = gate()
                if g is not None:
                    g.wait()

            self._hooks[id(opt)] = (weakref.ref(opt), opt.register_step_pre_hook(hold_step))

    def hold(self) -> None:
        """From now on, a watched ``step()`` waits (called before the writer starts)."""
        self._open.clear()

    def release(self) -> None:
        """The copy is done (or abandoned): let the steps go."""
        self._open.set()

    @property
    def holding(self) -> bool:
        return not self._open.is_set()

    def wait(self) -> None:
        """Block until released; the time spent counts as the save's stall (:meth:`take_waited`)."""
        if self._open.is_set():
            return
        started = time.perf_counter()
        self._open.wait()
        self._waited += time.perf_counter() - started

    def take_waited(self) -> float:
        """Seconds the training thread waited at the gate since the last call."""
        waited, self._waited = self._waited, 0.0
        return waited

    def close(self) -> None:
        """Release, and remove every hook."""
        self.release()
        for _ref, handle in self._hooks.values():
            handle.remove()
        self._hooks.clear()
