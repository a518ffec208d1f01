"""A store on disk: file names, hidden entries, and which directories are checkpoints.

A store directory holds ``policy.toml`` and one directory per checkpoint.
Entries whose name starts with a hidden prefix belong to a write, a
replacement or a deletion in progress; they are never read as checkpoints
and are cleaned up when a store is opened (unless their process is alive).
"""
from __future__ import annotations

import os
import secrets
import threading
from pathlib import Path

#: File names inside a checkpoint directory and in the store's root.
MANIFEST = "manifest.json"
STATE_FILE = "state.pt"
WEIGHTS_FILE = "model.safetensors"
POLICY_FILE = "policy.toml"

TMP_PREFIX = ".tmp-"   # a checkpoint being written
OLD_PREFIX = ".old-"   # a checkpoint being replaced by one of the same name
DEL_PREFIX = ".del-"   # a checkpoint being deleted by retention
HIDDEN_PREFIXES = (TMP_PREFIX, OLD_PREFIX, DEL_PREFIX)

#: Files whose presence makes a directory without a manifest look like a (damaged) checkpoint.
CHECKPOINT_FILE_NAMES = frozenset({STATE_FILE, ".metadata"})
CHECKPOINT_FILE_SUFFIXES = (".safetensors", ".distcp")

#: Temporary directories this process is writing right now (never cleaned up).
INFLIGHT: set = set()
INFLIGHT_LOCK = threading.Lock()


def mark_inflight(path: Path) -> None:
    with INFLIGHT_LOCK:
        INFLIGHT.add(str(path))


def unmark_inflight(path: Path) -> None:
    with INFLIGHT_LOCK:
        INFLIGHT.discard(str(path))


def is_inflight(path: str) -> bool:
    with INFLIGHT_LOCK:
        return str(path) in INFLIGHT


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def split_hidden(name: str) -> tuple[str, str, int] | None:
    """``.tmp-<name>-<pid>-<rand>`` -> (prefix, name, pid); None when it is not ours."""
    for prefix in HIDDEN_PREFIXES:
        if name.startswith(prefix):
            parts = name[len(prefix):].rsplit("-", 2)
            if len(parts) == 3 and parts[1].isdigit() and parts[0]:
                return prefix, parts[0], int(parts[1])
    return None


def hidden_name(prefix: str, name: str) -> str:
    return f"{prefix}{name}-{os.getpid()}-{secrets.token_hex(4)}"


def disk_size(path: Path) -> int:
    total = 0
    try:
        with os.scandir(path) as entries:
            for entry in entries:
                try:
                    if entry.is_file(follow_symlinks=False):
                        total += entry.stat(follow_symlinks=False).st_size
                except OSError:
                    pass
    except OSError:
        pass
    return total


def looks_like_checkpoint(path: Path) -> bool:
    """A directory without a manifest that holds checkpoint files (an unfinished or damaged one)."""
    try:
        with os.scandir(path) as entries:
            for entry in entries:
                if entry.name in CHECKPOINT_FILE_NAMES or entry.name.endswith(CHECKPOINT_FILE_SUFFIXES):
                    return True
    except OSError:
        return False
    return False


def candidates(root: Path) -> list[Path]:
    """Every visible directory of ``root`` with a manifest or checkpoint files.

    A symbolic link to such a directory is listed too, so that it is
    reported (and refused: see :func:`saverules.store.verify.inspect_checkpoint`)
    rather than silently ignored.
    """
    try:
        with os.scandir(root) as it:
            entries = list(it)
    except FileNotFoundError:
        return []
    out = []
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            if not entry.is_dir():  # follows a link: a link to a checkpoint directory is one to report
                continue
        except OSError:
            continue
        path = Path(entry.path)
        if os.path.lexists(path / MANIFEST) or looks_like_checkpoint(path):
            out.append(path)
    return out
