"""Which checkpoints to keep: keep-masks, one per retention rule, ORed together.

Always kept, whatever the table says: the newest checkpoint, the final one,
and (with ``keep_best``) the current best.  Without a ``[retention]`` table
every checkpoint is kept.
"""
from __future__ import annotations

import math
from collections.abc import Sequence


def _metric(checkpoint, name: str) -> float | None:
    metrics = checkpoint.metrics
    if not metrics or name not in metrics:
        return None
    value = metrics[name]
    if isinstance(value, bool):
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def explain_retention(retention, checkpoints: Sequence) -> list[tuple[str, ...]]:
    """For each checkpoint (oldest first), the rules that keep it; empty = delete."""
    count = len(checkpoints)
    if retention is None:
        return [("all",)] * count
    why: list[list] = [[] for _ in range(count)]
    if count:
        why[-1].append("newest")
    for i, checkpoint in enumerate(checkpoints):
        if checkpoint.final:
            why[i].append("final")
    for i in range(max(0, count - retention.keep_last), count):
        why[i].append("keep_last")
    if retention.keep_every is not None:
        for i, checkpoint in enumerate(checkpoints):
            if checkpoint.step % retention.keep_every == 0:
                why[i].append("keep_every")
    best = retention.keep_best
    if best is not None:
        sign = 1.0 if best.mode == "min" else -1.0
        ranked = sorted(
            (sign * value, i)  # ties: the earlier checkpoint ranks first
            for i, value in ((i, _metric(c, best.metric)) for i, c in enumerate(checkpoints))
            if value is not None
        )
        for _, i in ranked[: best.n]:
            why[i].append("keep_best")
    return [tuple(reasons) for reasons in why]
