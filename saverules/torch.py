"""The checkpoint store under its first import path: ``from saverules.torch import Checkpointer``.

The store lives in the package :mod:`saverules.store`; this module re-exports
its public names so that code written against ``saverules.torch`` keeps
working.  Like the store, importing it imports torch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .store import *  # noqa: F401,F403
from .store import __all__  # noqa: F401

if TYPE_CHECKING:  # the store's names are lazy (its module __getattr__), which a star import cannot show mypy
    from .store import (  # noqa: F401
        ALLOWED_GLOBALS,
        FORMAT_VERSION,
        LOCK_FILE,
        MANIFEST,
        POLICY_FILE,
        STATE_FILE,
        WEIGHTS_FILE,
        Checkpointer,
        CheckpointError,
        CheckpointInfo,
        CheckpointVerifyError,
        CheckpointWarning,
        CheckpointWriteError,
        NoValidCheckpointError,
        StateChangedError,
        StateTooDeepError,
        StateTypeError,
        StoreLockedError,
        UnsafeCheckpointError,
        inspect_checkpoint,
        read_checkpoint,
        recover_errno,
        restore_rng_state,
        retention_view,
        rng_state,
        scan,
    )
