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

from .checkpointer import Checkpointer
from .errors import (
    CheckpointError,
    CheckpointVerifyError,
    CheckpointWarning,
    CheckpointWriteError,
    StateTypeError,
    UnsafeCheckpointError,
)
from .formats import read as read_checkpoint
from .layout import MANIFEST, POLICY_FILE, STATE_FILE, WEIGHTS_FILE
from .manifest import FORMAT_VERSION, CheckpointInfo
from .rng import restore_rng_state, rng_state
from .verify import inspect_checkpoint, scan

__all__ = [
    "Checkpointer",
    "CheckpointInfo",
    "CheckpointError",
    "CheckpointWriteError",
    "CheckpointVerifyError",
    "UnsafeCheckpointError",
    "StateTypeError",
    "CheckpointWarning",
    "rng_state",
    "restore_rng_state",
    "scan",
    "inspect_checkpoint",
    "read_checkpoint",
    "MANIFEST",
    "STATE_FILE",
    "WEIGHTS_FILE",
    "POLICY_FILE",
    "FORMAT_VERSION",
]
