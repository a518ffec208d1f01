"""Free space for the next save: warn before a save fails for want of it.

The store writes and commits a new checkpoint before retention prunes, so
the next save needs room for one more checkpoint on top of everything kept.
After each save (and its retention) :func:`warn_if_short` compares the free
space of the store's file system with the size of the checkpoint just
written, and warns once, with the numbers, when the next one would not fit.
It warns again after the space has recovered and then fallen short again.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, MutableSet
from pathlib import Path
from typing import Any

from .errors import warn

#: The key in the Checkpointer's set of warnings given that says "the low-space warning is out".
WARNED = ("free space",)


def _bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def checkpoint_bytes(manifest: Mapping[str, Any]) -> int:
    """The bytes of a checkpoint's files, as its manifest lists them."""
    return sum(int(entry["size"]) for entry in manifest["files"].values())


def warn_if_short(root: Path, manifest: Mapping[str, Any], warned: MutableSet[Any]) -> None:
    """Warn (once, until it recovers) when ``root`` has less free space than the next save needs."""
    need = checkpoint_bytes(manifest)
    try:
        st = os.statvfs(root)
    except OSError:
        return  # the save itself reports a store it cannot reach
    free = st.f_bavail * st.f_frsize
    if free >= need:
        warned.discard(WARNED)
        return
    if WARNED in warned:
        return
    warned.add(WARNED)
    warn(
        f"saverules: {root} has {_bytes(free)} free, and the next save needs about {_bytes(need)} (the size of "
        f"step {manifest['step']}'s checkpoint, written before retention prunes): the next save will fail for "
        "want of space unless you free some, move the store ([storage].dir) to a larger disk, or keep fewer "
        "checkpoints ([retention]); `python -m saverules.check POLICY --checkpoint-size SIZE` shows what a "
        "policy needs at most"
    )
