"""Which rank checks which file's digest when the ranks resume a sharded checkpoint together.

Rank 0 alone once re-hashed every file of the checkpoint before any rank
read one, while the other ranks waited.  Now the ranks split the pass: each
file is hashed by exactly one rank, the largest files first, each to the
rank with the fewest bytes to hash so far (a rank takes its own DCP data
file when the sizes tie, the one it is about to read).  The split is a
function of the manifest and the number of ranks, so every rank computes
the same one without a message.

Before a rank reads anything itself, it has checked what it reads first:
its own rank file (a small pickle) and DCP's ``.metadata`` index.  Nothing
is loaded into a model until every rank has reported its share good (the
gather that follows the read in :func:`~saverules.store.sharded.coordinate.load_latest`):
a damaged file fails the checkpoint on every rank, with the reason of the
rank that found it, and the ranks fall back together.
"""
from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from .. import digest
from ..errors import CheckpointError

_DATA_FILE = re.compile(r"__(\d+)_\d+\.distcp")


def share(files: Mapping[str, Mapping[str, Any]], rank: int, size: int, own: Collection[str] = ()) -> list[str]:
    """The files ``rank`` (of ``size`` ranks) hashes: ``own`` (which it reads first), then its part of all.

    The parts do not depend on ``own``, so every rank computes the same
    split; a small file a rank reads first may be hashed twice.
    """
    load = [0] * max(1, size)
    mine = [f for f in own if f in files]
    for fname in sorted(files, key=lambda f: (-int(files[f]["size"]), f)):
        least = min(load)
        tied = [r for r in range(len(load)) if load[r] == least]
        m = _DATA_FILE.fullmatch(fname)
        by = int(m.group(1)) if m is not None and int(m.group(1)) in tied else tied[0]
        load[by] += int(files[fname]["size"])
        if by == rank and fname not in mine:
            mine.append(fname)
    return mine


def check(directory: Path, files: Mapping[str, Mapping[str, Any]], names: list[str]) -> None:
    """Hash each of ``names`` and compare it with its manifest entry; CheckpointError naming the first bad one."""
    for fname in names:
        entry = files[fname]
        algo, expected = digest.entry_digest(entry)
        try:
            size, got = digest.hash_file(directory / fname, algo)
        except OSError as exc:
            raise CheckpointError(f"saverules: cannot read {directory / fname}: {exc.strerror or exc}") from None
        if size != entry["size"]:
            raise CheckpointError(f"{fname} has {size} bytes, the manifest says {entry['size']} (truncated?)")
        if got != expected:
            raise CheckpointError(f"{fname} does not match its {algo} digest (damaged)")
