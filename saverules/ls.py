"""List a checkpoint store: ``python -m saverules.ls DIR``.

One row per checkpoint: its step, epoch, training clock, when it was saved,
why, its size, whether every file still matches the sha256 in its manifest,
and which retention rule keeps it.  The retention rules come from
``DIR/policy.toml`` (written by :class:`saverules.store.Checkpointer` and by the
trainer integrations) or from ``--policy FILE``.  A Hugging Face output
directory (``checkpoint-N/``) or a Lightning ``dirpath`` (``.ckpt`` files) is
listed from the manifests :mod:`saverules.integrations.manifest` describes.

"Verified" means what resume means: the files match their sha256, and
their structure (the torch archive, the pickle's opcodes, read and never
run; the safetensors header) is one ``load_latest`` accepts.  A checkpoint
that asks to unpickle anything but tensors and plain values is UNSAFE:
resume stops there.  Listing and verifying never import torch; only
``--load`` does.  Given a run folder that holds no checkpoints itself (say
``out``), ls lists the stores below it (``out/checkpoints``).

Below the table, "removed by retention" lists the checkpoints that a
writer's retention deleted (from the store's removal log, see
:mod:`saverules.store.removed`): when, under which policy, and why, so that
a resume under a changed policy is accounted for.

Exit status: 0 when every checkpoint verifies, 1 when any fails
verification, 2 on a usage error (DIR missing, unreadable policy given with
``--policy``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

from .engine.quantities import format_bytes, format_seconds

__all__ = ["main", "format_table"]

#: How deep below a run folder ls looks for stores, and how many directories it looks at.
SEARCH_DEPTH = 3
SEARCH_LIMIT = 2000
#: How many removed checkpoints the table shows (the newest; --json lists every one the log holds).
REMOVED_SHOWN = 20


def _world(info) -> int | None:
    """How many ranks wrote the checkpoint (its manifest's world size), or None when unknown."""
    world = (getattr(info, "manifest", None) or {}).get("world_size")  # a framework checkpoint has none
    return world if type(world) is int and world > 0 else None


def format_table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    """Left-aligned columns separated by two spaces (numbers right-aligned)."""
    widths = [len(h) for h in header]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    right = {1, 2, 6}  # step, epoch, size
    lines = []
    for row in [list(header)] + [list(r) for r in rows]:
        cells = [c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _load_policy(path: str):
    import saverules

    return saverules.load(path)


def _framework_checkpoints(root: str, args, notes: list[str]):
    """The checkpoints of a Hugging Face output dir or a Lightning dirpath (no torch import), else None."""
    from .integrations import manifest as framework_manifest

    if not framework_manifest.is_framework_dir(root):
        return None
    if args.load:
        notes.append("--load reads the store's own state files; framework checkpoints are checked by their hashes")
    return framework_manifest.list_checkpoints(root, verify=not args.no_verify)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m saverules.ls",
        description="List the checkpoints in a saverules checkpoint store and verify them.",
    )
    parser.add_argument("dir", metavar="DIR", help="the checkpoint directory ([storage].dir), or a run folder "
                        "above it, or a durable tier's URL ([durable].dir: s3://, gs://, file://, ...)")
    parser.add_argument("--policy", metavar="FILE", help="policy whose retention rules to explain "
                        "(default: DIR/policy.toml)")
    parser.add_argument("--no-verify", action="store_true",
                        help="check manifests and file sizes only, do not re-hash the files")
    parser.add_argument("--load", action="store_true",
                        help="also load every state file (safely, weights_only) to check it can be read")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


class _Usage(Exception):
    """A usage error: printed, exit status 2."""


def _policy_for(root: str, given: str | None, notes: list[str]):
    from . import PolicyError
    from .store.layout import POLICY_FILE

    policy_path = given or os.path.join(root, POLICY_FILE)
    if not os.path.exists(policy_path):
        notes.append(f"no {POLICY_FILE} in {root}; pass --policy FILE to see which retention rule keeps what")
        return None
    try:
        return _load_policy(policy_path)
    except PolicyError as exc:
        if given:
            raise _Usage(f"cannot use the policy {given}:\n{exc}") from None
        notes.append(f"{policy_path} is not a valid policy, retention not explained:\n{exc}")
        return None


def _writer_note(root: str) -> str | None:
    """Who writes the store, from its lock file (read only: ls never takes or probes the lock)."""
    import socket

    from .store.layout import pid_alive
    from .store.lock import describe_holder, holder_of

    holder = holder_of(root)
    if not holder:
        return None
    who = describe_holder(holder)
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        if pid_alive(holder["pid"]):
            return f"being written by {who}"
        return f"last written by {who}, which is no longer running (its lock is free)"
    return f"written by {who}, according to its lock file (a process on another host)"


def _examine(root: str, args, policy, notes: list[str]) -> list:
    """The checkpoints of one store (or framework directory), with ``--load`` applied."""
    import dataclasses

    framework = _framework_checkpoints(root, args, notes)  # None: not a Hugging Face / Lightning directory
    if framework is not None:
        return framework
    from .store import verify

    infos = verify.scan(root, verify=not args.no_verify)
    if not args.load:
        return infos
    from .store import errors, formats  # imports torch: only --load reads tensors

    loaded = []
    for info in infos:
        if info.ok:
            try:
                formats.read(info, "cpu")
            except errors.UnsafeCheckpointError as exc:
                info = dataclasses.replace(info, verified=False, error=str(exc), unsafe=True)
            except errors.CheckpointError as exc:
                info = dataclasses.replace(info, verified=False, error=str(exc))
                if verify.gone(info):  # removed while it was read (by a writer's retention): gone, not damaged
                    continue
        loaded.append(info)
    return loaded


def _kept_by(infos: list, policy) -> dict:
    from .store.retain import retention_view

    valid = [i for i in infos if i.ok and i.step is not None]
    if policy is None or not valid:
        return {}
    explained = policy.explain_retention(retention_view(valid))
    return {id(info): why for info, why in zip(valid, explained)}


def _removed(root: str, infos: list, notes: list[str]) -> tuple[list[dict], int]:
    """The checkpoints retention removed from the store at ``root`` that are not in it now, oldest first; and how
    many older removals the log's size bound dropped."""
    from .store.removed import log_path, read

    log = read(root)
    if log.error:
        notes.append(f"the removal log {log.error}; the checkpoints retention removed are not listed")
    if log.unreadable:
        notes.append(f"{log.unreadable} line{'s' if log.unreadable != 1 else ''} of {log_path(root)} could not be "
                     f"read (a write cut short) and {'were' if log.unreadable != 1 else 'was'} skipped")
    present = {i.name for i in infos}
    return [e for e in log.entries if e["name"] not in present], log.dropped


def _print_removed(removed: list[dict], dropped: int) -> None:
    if not removed:
        return
    print(f"removed by retention ({len(removed)}):")
    rows = []
    for e in removed[-REMOVED_SHOWN:]:
        when = e.get("removed_at")
        digest = e.get("policy_digest")
        source = e.get("policy_source")
        policy = (digest[:12] if isinstance(digest, str) else "?") + (f" ({source})" if source else "")
        rows.append([
            str(e["name"]),
            str(e.get("step", "?")),
            (datetime.fromtimestamp(when, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
             if isinstance(when, (int, float)) else "?"),
            policy,
            str(e.get("why", "?")),
        ])
    # indented: a section of its own, never read as rows of the checkpoints' table above
    for line in format_table(rows, ["NAME", "STEP", "REMOVED (UTC)", "BY POLICY", "WHY"]).splitlines():
        print(f"  {line}")
    if len(removed) > REMOVED_SHOWN:
        print(f"({len(removed) - REMOVED_SHOWN} earlier removals not shown; ls --json lists them)")
    if dropped:
        print(f"({dropped} older removals are no longer in the log, which keeps only the newest)")


def _as_json(root: str, infos: list, kept: dict, notes: list[str]) -> dict:
    removed, dropped = _removed(root, infos, notes)
    out = []
    for info in infos:
        out.append({
            "name": info.name,
            "path": str(info.path),
            "step": info.step,
            "epoch": info.epoch,
            "time": info.time,
            "utc": info.utc.isoformat() if info.utc else None,
            "reasons": list(info.reasons),
            "size": info.size,
            "verified": info.verified,
            "unsafe": bool(getattr(info, "unsafe", False)),
            "error": info.error,
            "format": getattr(info, "format", None),
            "world_size": _world(info),
            "kept_by": list(kept[id(info)]) if id(info) in kept else None,
        })
    return {"dir": _shown(root), "checkpoints": out, "removed": removed, "removed_dropped": dropped, "notes": notes}


def _shown(root: str) -> str:
    """How a store is named in the output: a URL as given, a directory as an absolute path."""
    return root if "://" in root else os.path.abspath(root)


def _print_table(root: str, infos: list, kept: dict, writer: str | None) -> None:
    rows = []
    for info in infos:
        if info.ok:
            verified = "yes" if info.verified else "size only"
        else:
            verified = "UNSAFE" if getattr(info, "unsafe", False) else "FAILED"
        if not info.ok:
            why = "(not counted)"
        elif id(info) in kept:
            why = ", ".join(kept[id(info)]) or "(delete at next save)"
        else:
            why = "-"
        rows.append([
            info.name,
            str(info.step) if info.step is not None else "?",
            str(info.epoch) if info.epoch is not None else "?",
            format_seconds(info.time),
            info.utc.strftime("%Y-%m-%d %H:%M:%S") if info.utc else "?",
            ", ".join(info.reasons) or ("-" if info.ok else "?"),
            format_bytes(info.size),
            verified,
            why,
        ])
    header = ["NAME", "STEP", "EPOCH", "CLOCK", "SAVED (UTC)", "REASONS", "SIZE", "VERIFIED", "KEPT BY"]
    if any(getattr(info, "format", None) == "dcp" or (_world(info) or 1) > 1 for info in infos):
        # sharded checkpoints: how many ranks wrote each one (a dcp checkpoint loads on any number)
        header.insert(7, "RANKS")
        for info, row in zip(infos, rows):
            world = _world(info)
            sharded = getattr(info, "format", None) == "dcp"
            row.insert(7, (f"{world} (dcp)" if sharded else str(world)) if world else "?")
    print(f"{_shown(root)}: {len(infos)} checkpoint{'s' if len(infos) != 1 else ''}")
    if writer:
        print(writer)
    if rows:
        print(format_table(rows, header))
    for info in infos:
        if getattr(info, "unsafe", False):
            print(f"UNSAFE {info.name}: {info.error} (refused: nothing of it is loaded)")
        elif not info.ok:
            print(f"FAILED {info.name}: {info.error}")


def _summary(infos: list) -> int:
    """The closing lines on stderr; the exit status."""
    failed = [i for i in infos if not i.ok]
    unsafe = [i for i in failed if getattr(i, "unsafe", False)]
    if unsafe:
        newest = max((i for i in infos if i.step is not None), key=lambda i: i.step, default=None)
        newest_unsafe = newest is not None and getattr(newest, "unsafe", False)
        where = "the newest checkpoint" if newest_unsafe else "a checkpoint"
        print(
            f"{len(unsafe)} checkpoint{'s' if len(unsafe) != 1 else ''} refused as unsafe (it asks to unpickle "
            f"code, which saverules never runs); {where} is unsafe, and resume stops at an unsafe checkpoint "
            "with UnsafeCheckpointError instead of falling back past it",
            file=sys.stderr,
        )
    if len(failed) > len(unsafe):
        count = len(failed) - len(unsafe)
        print(
            f"{count} checkpoint{'s' if count != 1 else ''} failed verification; "
            "resume skips such checkpoints and retention never deletes them",
            file=sys.stderr,
        )
    return 1 if failed else 0


def _stores_below(root: str, unreadable: list[str]) -> list[str]:
    """Directories below ``root`` (a few levels, not following links) that hold checkpoints.

    A directory that cannot be read is skipped and added to ``unreadable`` (with the reason).
    """
    from .integrations import manifest as framework_manifest
    from .store.layout import POLICY_FILE, candidates

    found: list[str] = []
    seen = 0
    level = [root]
    for _ in range(SEARCH_DEPTH):
        below: list[str] = []
        for directory in level:
            try:
                with os.scandir(directory) as entries:
                    subdirs = sorted(e.path for e in entries
                                     if not e.name.startswith(".") and e.is_dir(follow_symlinks=False))
            except OSError as exc:
                if directory != root:
                    unreadable.append(f"{directory} ({exc.strerror or exc})")
                continue
            for sub in subdirs:
                seen += 1
                if seen > SEARCH_LIMIT:
                    return found
                try:
                    holds = os.path.exists(os.path.join(sub, POLICY_FILE)) or bool(candidates(Path(sub))) \
                        or framework_manifest.is_framework_dir(sub)
                except OSError as exc:
                    unreadable.append(f"{sub} ({exc.strerror or exc})")
                    continue
                if holds:
                    found.append(sub)
                else:
                    below.append(sub)
        level = below
    return found


def _durable(args) -> int:
    """List a durable tier (an fsspec URL): committed checkpoints only, verified by re-reading every object."""
    from . import PolicyError
    from .engine.tiers import durable_policy
    from .store.errors import CheckpointError
    from .store.lock import describe_holder
    from .store.remote import DurableTier
    from .store.remote.lease import LOCK_OBJECT, read_holder

    root = args.dir
    notes: list[str] = []
    policy = None
    if args.policy:
        try:
            policy = _load_policy(args.policy)
        except PolicyError as exc:
            print(f"saverules.ls: error: cannot use the policy {args.policy}:\n{exc}", file=sys.stderr)
            return 2
        policy = durable_policy(policy) or policy
    else:
        notes.append("pass --policy FILE to see which retention rule of [durable] keeps what")
    try:
        tier = DurableTier(root, writer=False)
        infos = tier.list(verify=not args.no_verify)
        leftovers = tier.leftovers()
        holder = read_holder(tier.fs, f"{tier.root}/{LOCK_OBJECT}")
    except CheckpointError as exc:
        print(f"saverules.ls: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # the backend's own errors: the network, permissions, a missing bucket
        print(f"saverules.ls: error: cannot list {root}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    if leftovers:
        notes.append(f"{len(leftovers)} unfinished upload(s) without a commit marker, not listed "
                     f"({', '.join(leftovers[:5])}); the next writer removes them")
    kept = _kept_by(infos, policy)
    if args.json:
        print(json.dumps(_as_json(root, infos, kept, notes), indent=1))
        return 1 if any(not i.ok for i in infos) else 0
    writer = f"written by {describe_holder(holder)}, according to its lock" if holder else None
    _print_table(root, infos, kept, writer)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return _summary(infos)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    root = args.dir
    if "://" in root:
        if args.load:
            print("saverules.ls: error: --load reads local stores only; download the checkpoint first",
                  file=sys.stderr)
            return 2
        return _durable(args)
    if not os.path.exists(root):
        print(f"saverules.ls: error: {root} does not exist", file=sys.stderr)
        return 2
    if not os.path.isdir(root):
        print(f"saverules.ls: error: {root} is not a directory", file=sys.stderr)
        return 2
    if args.policy and not os.path.exists(args.policy):
        print(f"saverules.ls: error: policy file {args.policy} does not exist", file=sys.stderr)
        return 2
    from .store.layout import POLICY_FILE

    notes: list[str] = []
    try:
        policy = _policy_for(root, args.policy, notes)
        infos = _examine(root, args, policy, notes)
    except _Usage as exc:
        print(f"saverules.ls: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"saverules.ls: error: cannot read {root}: {exc.strerror or exc}", file=sys.stderr)
        return 2

    searched = not infos and not os.path.exists(os.path.join(root, POLICY_FILE))
    unreadable: list[str] = []
    stores = _stores_below(root, unreadable) if searched else []
    if unreadable:
        shown = "; ".join(unreadable[:5]) + (f"; and {len(unreadable) - 5} more" if len(unreadable) > 5 else "")
        print(f"saverules.ls: note: skipped {len(unreadable)} folder{'s' if len(unreadable) != 1 else ''} below "
              f"{root} that cannot be read: {shown}; run ls on a store you can read, or as a user who can read "
              "these", file=sys.stderr)
    if stores:
        return _list_below(root, stores, args)

    kept = _kept_by(infos, policy)
    if searched:
        notes.append(
            f"no checkpoint store below {root} either; a store is the [storage].dir of the policy "
            "(for the reference training loop, OUT_DIR/checkpoints)"
        )
    if args.json:
        print(json.dumps(_as_json(root, infos, kept, notes), indent=1))
        return 1 if any(not i.ok for i in infos) else 0
    _print_table(root, infos, kept, _writer_note(root))
    _print_removed(*_removed(root, infos, notes))
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return _summary(infos)


def _list_below(root: str, stores: list[str], args) -> int:
    """``ls RUN_DIR``: every store found below the run folder, one after the other."""
    status = 0
    listed = []
    for store_dir in stores:
        notes: list[str] = []
        try:
            policy = _policy_for(store_dir, args.policy, notes)
        except _Usage as exc:
            print(f"saverules.ls: error: {exc}", file=sys.stderr)
            return 2
        try:
            infos = _examine(store_dir, args, policy, notes)
        except OSError as exc:
            print(f"saverules.ls: error: cannot read {store_dir}: {exc.strerror or exc}", file=sys.stderr)
            status = 2
            continue
        listed.append((store_dir, infos, _kept_by(infos, policy), notes))
    if args.json:
        data = {
            "dir": os.path.abspath(root),
            "checkpoints": [],
            "notes": [f"no checkpoints directly in {root}; the stores below it are listed under 'stores'"],
            "stores": [_as_json(d, infos, kept, notes) for d, infos, kept, notes in listed],
        }
        print(json.dumps(data, indent=1))
        failed = any(not i.ok for _, infos, _, _ in listed for i in infos)
        return max(status, 1 if failed else 0)
    names = ", ".join(os.path.abspath(d) for d in stores)
    print(f"{os.path.abspath(root)}: no checkpoints directly in it; the store{'s' if len(stores) != 1 else ''} "
          f"below it: {names}")
    for store_dir, infos, kept, notes in listed:
        print()
        _print_table(store_dir, infos, kept, _writer_note(store_dir))
        _print_removed(*_removed(store_dir, infos, notes))
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
        status = max(status, _summary(infos))
    return status


if __name__ == "__main__":  # pragma: no cover - exercised through subprocess in the tests
    sys.exit(main())
