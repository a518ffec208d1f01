"""Sharded checkpoints: every rank writes its own shards through ``torch.distributed.checkpoint``.

* :mod:`.coordinate`: a save and a load across ranks (start, write, report, commit by rank 0, confirm);
* :mod:`.format`: the "dcp" format, one rank's part of a checkpoint;
* :mod:`.files`: DCP's file layer, digesting each file as it is written;
* :mod:`.state`: the split of model and optimizer state dicts into shards and plain values.
"""
from __future__ import annotations

from .coordinate import ShardedCommitter, Without, load_latest, start
from .coordinate import commit as commit

__all__ = ["ShardedCommitter", "Without", "commit", "load_latest", "start"]
