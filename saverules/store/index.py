"""The writer's index of its store: the committed checkpoints, in memory, so a save never rescans the store.

A :class:`~saverules.torch.Checkpointer` that writes builds the index once
(its first save reads every manifest, as :func:`~saverules.store.verify.scan`
without hashing) and then keeps it up to date itself: each commit adds the
new checkpoint, each deletion by retention removes one.  What the writer did
not do itself (another process removed or damaged a checkpoint) is found
when retention touches that checkpoint, and :meth:`StoreIndex.drop` makes the
next save rebuild the index from the disk.

The index holds the usable checkpoints (a manifest with a step, sizes that
match) in the store's order (:func:`~saverules.store.verify.sort_key`), the
order retention plans in, and the rest apart (warned about once, never
counted).  Listing and resuming still read the disk: they are not per-save
work.
"""
from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .manifest import CheckpointInfo
from .verify import scan, sort_key

__all__ = ["StoreIndex"]


class StoreIndex:
    """The checkpoints of one store, oldest first, kept by its writer (see the module)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._good: list[CheckpointInfo] | None = None  # usable checkpoints, in sort_key order
        self._keys: list[tuple[Any, ...]] = []  # their sort keys, for bisect
        self._by_path: dict[Path, CheckpointInfo] = {}
        self.bad: list[CheckpointInfo] = []  # found unusable when the index was built

    @property
    def built(self) -> bool:
        return self._good is not None

    def build(self) -> None:
        """Read every manifest of the store (sizes checked, nothing hashed)."""
        self.build_from(scan(self.root, verify=False))

    def build_from(self, infos: Sequence[CheckpointInfo]) -> None:
        """The index of what a scan of the store just found (oldest first)."""
        self._good = [i for i in infos if i.ok and i.step is not None]
        self._keys = [sort_key(i) for i in self._good]
        self._by_path = {i.path: i for i in self._good}
        self.bad = [i for i in infos if not (i.ok and i.step is not None)]

    def drop(self) -> None:
        """Forget everything: the store changed behind the writer's back; the next use rebuilds."""
        self._good, self._keys, self._by_path, self.bad = None, [], {}, []

    def good(self) -> list[CheckpointInfo]:
        """The usable checkpoints, oldest first (the list itself: do not change it)."""
        if self._good is None:
            self.build()
        assert self._good is not None
        return self._good

    def __len__(self) -> int:
        return len(self.good())

    def __iter__(self) -> Iterator[CheckpointInfo]:
        return iter(self.good())

    def _position(self, info: CheckpointInfo) -> int:
        key = sort_key(info)
        i = bisect.bisect_left(self._keys, key)
        good = self.good()
        while good[i] is not info:  # equal keys (two checkpoints of one step): a few at most
            i += 1
        return i

    def add(self, info: CheckpointInfo) -> int:
        """A committed checkpoint (replacing one at the same path); its position."""
        good = self.good()
        self.remove(info.path)
        key = sort_key(info)
        i = bisect.bisect_right(self._keys, key)
        good.insert(i, info)
        self._keys.insert(i, key)
        self._by_path[info.path] = info
        return i

    def remove(self, path: Path) -> CheckpointInfo | None:
        """Take the checkpoint at ``path`` out of the index (deleted); what it was, or None."""
        info = self._by_path.pop(path, None) if self.good() is not None else None
        if info is None:
            return None
        i = self._position(info)
        del self.good()[i]
        del self._keys[i]
        return info
