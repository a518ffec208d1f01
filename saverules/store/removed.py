"""The removal log: which checkpoints retention deleted, when, under which policy, and why.

A checkpoint that retention deletes leaves no trace on disk, so after a
resume under a changed policy nobody could say where the earlier run's
checkpoints went.  The writer that deletes one therefore appends a line to
``.saverules/removed.jsonl`` in the store's root (a hidden folder, never read
as a checkpoint):

    {"name": "step-00000040", "step": 40, "removed_at": 1765170000.0,
     "policy_digest": "1a2b...", "policy_source": "rules/run.toml",
     "why": "no retention rule keeps it (keep_last = 1)"}

``saverules.ls`` lists them under "removed by retention", and the reference
training loop's summary reads the same lines.  The log is bounded: when it
grows past :data:`MAX_BYTES` it is rewritten (atomically) with its newest
entries, and its first line then counts the entries dropped so far, so a
reader can say that older removals are no longer listed.

Only one process writes a store at a time (the store's lock; the trainer
callbacks write from rank 0 only), so appends never interleave.  A line that
cannot be parsed (a crash mid-append) is skipped and counted by the reader; the
next append starts on a line of its own.  A last line without its newline is
being appended right now, and is not read.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import warn

FOLDER = ".saverules"
LOG = "removed.jsonl"
#: The log's size bound: past it, it is rewritten with the newest entries filling half of it.
MAX_BYTES = 256 * 1024


def log_path(root: str | os.PathLike) -> Path:
    return Path(root) / FOLDER / LOG


def why_removed(retention: Any) -> str:
    """The sentence recorded for a checkpoint that the retention table ``retention`` no longer keeps."""
    if retention is None:
        return "removed by retention"
    rules = [f"keep_last = {retention.keep_last}"]
    if getattr(retention, "keep_every", None) is not None:
        rules.append(f"keep_every = {retention.keep_every}")
    best = getattr(retention, "keep_best", None)
    if best is not None:
        rules.append(f"keep_best on {best.metric} ({best.mode}, n = {best.n})")
    return "no retention rule keeps it (" + ", ".join(rules) + ")"


def removal(name: str, step: int | None, policy: Any, why: str | None = None, when: float | None = None
          ) -> dict[str, Any]:
    """One line of the log for the checkpoint ``name`` that ``policy``'s retention removed."""
    return {
        "name": name,
        "step": step,
        "removed_at": round(time.time() if when is None else when, 3),
        "policy_digest": getattr(policy, "digest", None),
        "policy_source": getattr(policy, "source", None),
        "why": why if why is not None else why_removed(getattr(policy, "retention", None)),
    }


def record(root: str | os.PathLike, entries: Iterable[dict[str, Any]], warned: set[str] | None = None) -> None:
    """Append ``entries`` to the store's removal log, keeping it within :data:`MAX_BYTES`.

    A log that cannot be written never fails the save that retention followed:
    a warning (once per store and process when ``warned`` is given) says so.
    """
    lines = "".join(json.dumps(e, sort_keys=True) + "\n" for e in entries)
    if not lines:
        return
    path = log_path(root)
    try:
        path.parent.mkdir(exist_ok=True)
        with open(path, "a+b") as f:
            end = f.seek(0, os.SEEK_END)
            if end and os.pread(f.fileno(), 1, end - 1) != b"\n":
                lines = "\n" + lines  # a line cut short by a crash stays a line of its own
            f.write(lines.encode())
        if path.stat().st_size > MAX_BYTES:
            _trim(path)
    except OSError as exc:
        key = f"removed-log:{path}"
        if warned is None or key not in warned:
            if warned is not None:
                warned.add(key)
            warn(f"saverules: could not record the checkpoints retention removed in {path}: {exc}; "
                 "`saverules.ls` will not list them")


def _trim(path: Path) -> None:
    """Rewrite the log with its newest entries (half of the bound), counting those dropped."""
    log = read(path.parent.parent)
    keep: list[str] = []
    size = 0
    for e in reversed(log.entries):
        line = json.dumps(e, sort_keys=True) + "\n"
        if size + len(line) > MAX_BYTES // 2:
            break
        keep.append(line)
        size += len(line)
    dropped = log.dropped + len(log.entries) - len(keep)
    tmp = path.with_name(f".{LOG}-{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps({"dropped": dropped}) + "\n")
        f.writelines(reversed(keep))
    os.replace(tmp, path)


@dataclass
class RemovalLog:
    """What a store's removal log says: its entries, oldest first."""

    entries: list[dict[str, Any]] = field(default_factory=list)
    dropped: int = 0  # older entries the size bound dropped
    unreadable: int = 0  # lines that are not an entry (a crash mid-append)
    error: str | None = None  # why the log could not be read at all

    def since(self, when: float) -> list[dict[str, Any]]:
        """The entries recorded at or after the wall-clock time ``when``."""
        return [e for e in self.entries if isinstance(e.get("removed_at"), (int, float)) and e["removed_at"] >= when]


def read(root: str | os.PathLike) -> RemovalLog:
    """The removal log of the store at ``root`` (empty when retention never removed anything there)."""
    path = log_path(root)
    out = RemovalLog()
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read(4 * MAX_BYTES)  # bounded: a log is never much above MAX_BYTES
    except FileNotFoundError:
        return out
    except OSError as exc:
        out.error = f"{path} cannot be read: {exc.strerror or exc}"
        return out
    lines = text.split("\n")
    lines.pop()  # after the last newline: nothing, or a line being appended right now (never counted)
    for line in lines:
        try:
            value = json.loads(line)
        except ValueError:
            out.unreadable += 1
            continue
        if isinstance(value, dict) and set(value) == {"dropped"} and isinstance(value["dropped"], int):
            out.dropped += value["dropped"]
        elif isinstance(value, dict) and isinstance(value.get("name"), str):
            out.entries.append(value)
        else:
            out.unreadable += 1
    return out
