"""A crash-safe checkpoint store for PyTorch training loops.

:class:`Checkpointer` asks the policy's decider on every step, and when the
answer is "save" it writes the training state so that the save cannot be lost
half-way: every checkpoint is written into a hidden temporary directory,
fsynced, and renamed into place; ``manifest.json`` (sizes and digests of every
file) is written last, so a directory without a valid manifest is never taken
for a checkpoint.  On resume the newest checkpoint is verified and the store
falls back to the previous good one, with a warning, when it is damaged.

Nothing read from a checkpoint runs code (torch files are read with
``torch.load(weights_only=True)``).  See docs/checkpoints.md for the on-disk
format, the guarantees, and "How a save flows" through the modules of this
package.  This package (with the reference training loop) is the only part
of the library that imports torch; ``import saverules`` does not.
"""
from __future__ import annotations

import importlib
from typing import Any

#: Public name -> the module of this package that defines it.  Loaded on first use, so that
#: listing and verifying a store (``saverules.ls``, :mod:`saverules.store.verify`) never
#: imports torch; the checkpointer and the formats do.
_EXPORTS = {
    "Checkpointer": "checkpointer",
    "CheckpointError": "errors",
    "CheckpointVerifyError": "errors",
    "CheckpointWarning": "errors",
    "CheckpointWriteError": "errors",
    "DurableError": "errors",
    "NoValidCheckpointError": "errors",
    "StateChangedError": "errors",
    "StateTypeError": "errors",
    "StateTooDeepError": "errors",
    "StoreLockedError": "errors",
    "UnsafeCheckpointError": "errors",
    "recover_errno": "errors",
    "read_checkpoint": "formats",
    "MANIFEST": "layout",
    "POLICY_FILE": "layout",
    "STATE_FILE": "layout",
    "WEIGHTS_FILE": "layout",
    "LOCK_FILE": "lock",
    "FORMAT_VERSION": "manifest",
    "CheckpointInfo": "manifest",
    "retention_view": "retain",
    "restore_rng_state": "rng",
    "rng_state": "rng",
    "ALLOWED_GLOBALS": "pickle_scan",
    "inspect_checkpoint": "verify",
    "scan": "verify",
}
_RENAMED = {"read_checkpoint": "read"}

__all__ = [
    "Checkpointer",
    "CheckpointInfo",
    "CheckpointError",
    "CheckpointWriteError",
    "CheckpointVerifyError",
    "UnsafeCheckpointError",
    "NoValidCheckpointError",
    "StoreLockedError",
    "DurableError",
    "StateChangedError",
    "StateTypeError",
    "StateTooDeepError",
    "CheckpointWarning",
    "rng_state",
    "restore_rng_state",
    "scan",
    "inspect_checkpoint",
    "read_checkpoint",
    "recover_errno",
    "retention_view",
    "ALLOWED_GLOBALS",
    "MANIFEST",
    "STATE_FILE",
    "WEIGHTS_FILE",
    "POLICY_FILE",
    "LOCK_FILE",
    "FORMAT_VERSION",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), _RENAMED.get(name, name))
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
