"""The arguments of a :class:`~saverules.torch.Checkpointer`, checked, and what they build.

Every argument is checked when the checkpointer is made, with an error that
names it and what it may be, so that a typo never waits for the first save:
:func:`load_policy` (a policy or the path of its TOML file),
:func:`check_arguments` (the directory and the flags), :func:`storage_format`
(the format ``[storage].format`` names, with its dependencies) and
:func:`make_decider` (the compiled policy, synced across ranks under DDP).
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from . import formats
from .errors import type_name

__all__ = ["ON_ERROR_CHOICES", "VERIFY_CHOICES", "check_arguments", "load_policy", "make_decider", "storage_format"]

VERIFY_CHOICES = ("hash", "device", "load", "none")
ON_ERROR_CHOICES = ("raise", "warn")


def load_policy(policy: Any) -> Any:
    """A :class:`saverules.Policy` as given, or loaded from the path of its TOML file."""
    import saverules

    if isinstance(policy, (str, os.PathLike)):
        return saverules.load(policy)
    if not (hasattr(policy, "compile") and hasattr(policy, "storage") and hasattr(policy, "retain")):
        raise ValueError(
            f"policy must be a saverules.Policy or the path of a policy TOML file, got {type_name(policy)}"
        )
    return policy


def check_arguments(*, dir: str | os.PathLike | None, read_only: Any, async_save: Any, verify: Any,
                    on_error: Any, run_name: Any) -> None:
    """Raise ``ValueError`` naming the first argument that is not one the checkpointer takes."""
    if dir is not None and not isinstance(dir, (str, os.PathLike)):
        raise ValueError(f"dir must be a path or None, got {type_name(dir)}")
    if dir is not None and not os.fspath(dir):
        raise ValueError("dir must not be empty")
    if not isinstance(read_only, bool):
        raise ValueError(f"read_only must be True or False, got {read_only!r}")
    if not isinstance(async_save, bool):
        raise ValueError(f"async_save must be True or False, got {async_save!r}")
    if verify not in VERIFY_CHOICES:
        raise ValueError(f"verify must be one of {', '.join(map(repr, VERIFY_CHOICES))}, got {verify!r}")
    if on_error not in ON_ERROR_CHOICES:
        raise ValueError(f"on_error must be one of {', '.join(map(repr, ON_ERROR_CHOICES))}, got {on_error!r}")
    if not isinstance(run_name, str) or not run_name or any(c in run_name for c in "/\\\0"):
        raise ValueError(f"run_name must be a non-empty string without path separators, got {run_name!r}")


def storage_format(policy: Any) -> Any:
    """The format ``[storage].format`` names, once its dependencies are known to be installed."""
    fmt = policy.storage.format
    if fmt not in formats.names():
        raise ValueError(
            f"[storage].format must be {' or '.join(map(repr, formats.names()))}, got {fmt!r}"
        )
    found = formats.get(fmt)
    found.check_available()
    return found


def make_decider(policy: Any, total_steps: int | None, world_size: int,
                 sync: Mapping[str, Any] | None) -> Any:
    """The policy compiled; under DDP (``world_size`` > 1) wrapped so that every rank decides alike."""
    if sync is not None and not isinstance(sync, Mapping):
        raise ValueError(f"sync must be a mapping of SyncedDecider options or None, got {type_name(sync)}")
    decider = policy.compile(total_steps)
    if world_size > 1:
        from saverules.distributed import SyncedDecider

        # Under DDP every rank must take the same decision: see docs/distributed.md.
        # ``sync`` passes SyncedDecider's options (sync_seconds, max_interval, sync_signals, ...).
        decider = SyncedDecider(decider, **dict(sync or {}))
    return decider
