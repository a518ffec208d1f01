"""The ranks of a job, as a sharded save sees them: collectives that never wait forever.

A sharded checkpoint is written by every rank and committed by rank 0, so its
save and its load need a few collectives: rank 0 announces the temporary
directory, the ranks report the files they wrote, rank 0 reports the outcome.
Those run on a process group of their own (gloo, which carries Python
objects on the CPU whatever the training uses), created once with a timeout.
When a rank dies, the others see its connection close and fail at once; when
a rank hangs, they fail after the timeout.  Either way every collective
raises :class:`RankFailure`, which names what the ranks were doing, and the
group is marked broken: the next save or load on it fails at once with the
same explanation instead of waiting again.

The group is destroyed at exit (:func:`_destroy_at_exit`, an ``atexit``
handler that runs after the Checkpointers' own, which finish the writes in
flight), while the interpreter is whole.  Left alive, its native worker
threads outlive the interpreter's finalization, and a native thread that
wakes during finalization and asks for the GIL is ended by CPython with
``pthread_exit``; unwinding through a C++ destructor (pybind11's GIL guard)
then calls ``std::terminate``: "terminate called without an active
exception" and SIGABRT (issue 16, item 14; ``tools/exit_abort.py`` shows it).
"""
from __future__ import annotations

import atexit
import hashlib
import os
import secrets
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

from .errors import CheckpointError

T = TypeVar("T")

#: Seconds a collective of a sharded save or load may wait for the other ranks.
DEFAULT_TIMEOUT = 600.0
#: Overrides the default timeout (seconds), for jobs that cannot pass ``Checkpointer(commit_timeout=...)``.
TIMEOUT_ENV = "SAVERULES_COMMIT_TIMEOUT"


class RankFailure(CheckpointError):
    """A rank did not take part in a sharded save or load in time: it died, hung, or lost its connection.

    Nothing of the save in progress was committed unless the message says
    otherwise; the job cannot go on (the other ranks are gone or stuck), so
    this is raised whatever ``on_error`` says.
    """


def timeout_from(value: float | None) -> float:
    """The timeout to use: ``value``, else ``$SAVERULES_COMMIT_TIMEOUT``, else :data:`DEFAULT_TIMEOUT`."""
    if value is None:
        env = os.environ.get(TIMEOUT_ENV)
        if env:
            try:
                value = float(env)
            except ValueError:
                raise ValueError(f"${TIMEOUT_ENV} must be a number of seconds, got {env!r}") from None
        else:
            value = DEFAULT_TIMEOUT
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value != value:
        raise ValueError(f"commit_timeout must be a positive number of seconds, got {value!r}")
    return float(value)


#: Every Ranks with a process group of its own, destroyed at exit (held here: a group outlives its Checkpointer in
#: torch's own registry, so it must be destroyed even when nothing else refers to its Ranks).
_LIVE: set[Ranks] = set()


def _destroy_at_exit() -> None:
    for ranks in list(_LIVE):
        ranks.destroy()


# Registered at import, before saverules.store.checkpointer registers its own handler (it imports this module):
# atexit runs handlers last-in first-out, so the writes in flight finish before their group goes.
atexit.register(_destroy_at_exit)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    # gloo prefixes its messages with the source position of the C++ check
    if line.startswith("[") and "] " in line:
        line = line.split("] ", 1)[1]
    return line[:300]


class Ranks:
    """This process's place in the job, and the collectives of sharded saves.

    Every rank must create it at the same point of the program (it creates a
    process group, itself a collective).  In a single process every
    collective is the identity and nothing is created.
    """

    def __init__(self, timeout: float):
        import torch.distributed as dist

        self.timeout = float(timeout)
        self.rank, self.size = 0, 1
        self.group = None
        self.broken: str | None = None
        # Rank 0's pid and a random part: the temporary directories of this job's saves are named
        # from it, so that every rank knows the name without being told at each save.
        self._tag = f"{os.getpid()}-{secrets.token_hex(3)}"
        self._saves = 0
        if dist.is_available() and dist.is_initialized():
            self.rank, self.size = dist.get_rank(), dist.get_world_size()
        if self.size > 1:
            self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=self.timeout))
            _LIVE.add(self)
            self._tag = self.broadcast(self._tag, "agree on the names of temporary directories")

    def destroy(self) -> None:
        """Destroy this process's part of the group (at exit: no collective may follow on it)."""
        import torch.distributed as dist

        group, self.group = self.group, None
        _LIVE.discard(self)
        if group is None:
            return
        if self.broken is None:
            self.broken = "its process group was destroyed at exit"
        if not (dist.is_available() and dist.is_initialized()):
            return  # the default group was destroyed first, and every group with it
        try:
            dist.destroy_process_group(group)
        except (ValueError, RuntimeError):  # not registered any more: destroyed with the default group already
            pass

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def check(self) -> None:
        """Raise at once when an earlier collective failed (the group cannot be trusted any more)."""
        if self.broken is not None:
            raise RankFailure(
                f"saverules: no sharded save or load is possible any more on this rank: {self.broken}"
            )

    def failed(self, doing: str, exc: BaseException) -> RankFailure:
        """Mark the group broken after ``exc`` and return the error to raise."""
        msg = (
            f"rank {self.rank} of {self.size} could not {doing}: the other ranks did not take part within "
            f"{self.timeout:g} s or their connection closed ({_first_line(exc)}). A rank has probably died or hung; "
            "look at its log. Stop the job and restart it: the newest complete checkpoint is loaded on restart"
        )
        if self.broken is None:
            self.broken = msg
        return RankFailure(f"saverules: {msg}")

    def run(self, doing: str, fn: Callable[[], T]) -> T:
        """``fn()``, a collective (or something that issues collectives); gloo failures become RankFailure."""
        self.check()
        try:
            return fn()
        except CheckpointError:  # the store's own errors (a RuntimeError too) say what they are
            raise
        except RuntimeError as exc:  # gloo: connection closed / reset, or the timeout
            raise self.failed(doing, exc) from exc

    def next_save(self) -> int:
        """The number of this save (every rank counts its saves, all at the same points)."""
        self._saves += 1
        return self._saves

    def temporary_name(self, prefix: str, name: str, save: int) -> str:
        """The hidden temporary directory of save number ``save`` of the checkpoint ``name``: the same on every rank.

        Named as :func:`~saverules.store.layout.hidden_name` names them
        (``<prefix><name>-<pid>-<random>``), with rank 0's pid, so that the
        cleanup of a store recognises a directory whose writer is gone.
        """
        return f"{prefix}{name}-{self._tag}{save:x}"

    def agree(self, failed: bool, text: str, doing: str) -> tuple[bool, bool]:
        """(whether any rank ``failed``, whether every rank has the same ``text``): one small all-reduce."""
        if not self.distributed:
            return failed, True
        import torch
        import torch.distributed as dist

        h = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=7).digest(), "big")
        t = torch.tensor([int(failed), h, -h], dtype=torch.int64)
        self.run(doing, lambda: dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group))
        return bool(t[0].item()), int(t[1].item()) == -int(t[2].item())

    def broadcast(self, obj: Any, doing: str) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj]
        self.run(doing, lambda: dist.broadcast_object_list(box, src=self._first(), group=self.group))
        return box[0]

    def _first(self) -> int:
        """The global rank of the group's rank 0 (a distributed Ranks always has its group)."""
        import torch.distributed as dist

        if self.group is None:
            raise RuntimeError("saverules: a collective on ranks without their process group (a single process)")
        return dist.get_global_rank(self.group, 0)

    def all_gather(self, obj: Any, doing: str) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.size
        self.run(doing, lambda: dist.all_gather_object(out, obj, group=self.group))
        return out

    def gather(self, obj: Any, doing: str) -> list[Any] | None:
        """Every rank's ``obj`` on rank 0 (None elsewhere)."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: list[Any] | None = [None] * self.size if self.rank == 0 else None
        self.run(doing, lambda: dist.gather_object(obj, out, dst=self._first(), group=self.group))
        return out


def process_rank() -> tuple[int, int]:
    """(rank, world size) of this process in the initialised default process group; (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def for_format(fmt: Any, commit_timeout: float | None) -> Ranks | None:
    """The ranks' group of a sharded format (every rank writes, rank 0 commits), else None.

    Creating the group is a collective, like the construction of the
    Checkpointer on every rank.  ``commit_timeout`` is checked all the same
    for another format: a typo should not wait for a format change.
    """
    if getattr(fmt, "sharded", False):
        return Ranks(timeout_from(commit_timeout))
    if commit_timeout is not None:
        timeout_from(commit_timeout)
    return None
