"""Which rank checks which file's digest when the ranks resume a sharded checkpoint together.

Rank 0 alone once re-hashed every file of the checkpoint before any rank
read one, while the other ranks waited.  Now the ranks split the pass: each
file is hashed by exactly one rank, the largest files first, each to the
rank with the fewest bytes to hash so far (a rank takes its own DCP data
file when the sizes tie, the one it is about to read).  The split is a
function of the manifest and the number of ranks, so every rank computes
the same one without a message.

Before a rank reads anything itself, it has checked what it reads first:
its own rank file (a small pickle) and DCP's ``.metadata`` index.  The rest
of its share is hashed on a thread (:class:`Pending`) while DCP loads; the
checkpoint is used only once every rank has reported its share good, and a
damaged file fails it on every rank, with the reason of the rank that found
it: the ranks fall back together (see
:func:`~saverules.store.sharded.coordinate.load_latest`).
"""
from __future__ import annotations

import re
import threading
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


class Pending:
    """:func:`check` of ``names`` on a thread of its own, started at once; :meth:`result` waits for it."""

    def __init__(self, directory: Path, files: Mapping[str, Mapping[str, Any]], names: list[str]) -> None:
        self._problem: str | None = None
        self._thread = threading.Thread(target=self._run, args=(directory, files, names),
                                        name="saverules-digests", daemon=True)
        self._thread.start()

    def _run(self, directory: Path, files: Mapping[str, Mapping[str, Any]], names: list[str]) -> None:
        try:
            check(directory, files, names)
        except CheckpointError as exc:
            self._problem = str(exc)
        except Exception as exc:  # reported as the checkpoint's problem, never lost with the thread
            self._problem = f"checking the digests failed ({type(exc).__name__}: {exc})"

    def result(self) -> str | None:
        """Why the first file of the share failed its check, or None when all matched."""
        self._thread.join()
        return self._problem
