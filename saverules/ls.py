"""List a checkpoint store: ``python -m saverules.ls DIR``.

One row per checkpoint: its step, epoch, training clock, when it was saved,
why, its size, whether every file still matches the sha256 in its manifest,
and which retention rule keeps it.  The retention rules come from
``DIR/policy.toml`` (written by :class:`saverules.store.Checkpointer` and by the
trainer integrations) or from ``--policy FILE``.  A Hugging Face output
directory (``checkpoint-N/``) or a Lightning ``dirpath`` (``.ckpt`` files) is
listed from the manifests :mod:`saverules.framework_manifest` describes.

Exit status: 0 when every checkpoint verifies, 1 when any fails
verification, 2 on a usage error (DIR missing, unreadable policy given with
``--policy``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional, Sequence

__all__ = ["main", "format_table"]

#: Same name as saverules.store.POLICY_FILE (not imported from there: that package imports torch).
POLICY_FILE = "policy.toml"


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def _clock(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}"


def _world(info) -> Optional[int]:
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


def _framework_checkpoints(root: str, args, notes: List[str]):
    """The checkpoints of a Hugging Face output dir or a Lightning dirpath (no torch import), else None."""
    from . import framework_manifest

    if not framework_manifest.is_framework_dir(root):
        return None
    if args.load:
        notes.append("--load reads the store's own state files; framework checkpoints are checked by their hashes")
    return framework_manifest.scan(root, verify=not args.no_verify)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m saverules.ls",
        description="List the checkpoints in a saverules checkpoint store and verify them.",
    )
    parser.add_argument("dir", metavar="DIR", help="the checkpoint directory ([storage].dir)")
    parser.add_argument("--policy", metavar="FILE", help="policy whose retention rules to explain "
                        "(default: DIR/policy.toml)")
    parser.add_argument("--no-verify", action="store_true",
                        help="check manifests and file sizes only, do not re-hash the files")
    parser.add_argument("--load", action="store_true",
                        help="also load every state file (safely, weights_only) to check it can be read")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)

    root = args.dir
    if not os.path.exists(root):
        print(f"saverules.ls: error: {root} does not exist", file=sys.stderr)
        return 2
    if not os.path.isdir(root):
        print(f"saverules.ls: error: {root} is not a directory", file=sys.stderr)
        return 2

    from . import PolicyError

    if args.policy and not os.path.exists(args.policy):
        print(f"saverules.ls: error: policy file {args.policy} does not exist", file=sys.stderr)
        return 2
    notes: List[str] = []
    policy = None
    policy_path = args.policy or os.path.join(root, POLICY_FILE)
    if os.path.exists(policy_path):
        try:
            policy = _load_policy(policy_path)
        except PolicyError as exc:
            if args.policy:
                print(f"saverules.ls: error: cannot use the policy {args.policy}:\n{exc}", file=sys.stderr)
                return 2
            notes.append(f"{policy_path} is not a valid policy, retention not explained:\n{exc}")
    else:
        notes.append(f"no {POLICY_FILE} in {root}; pass --policy FILE to see which retention rule keeps what")

    import dataclasses

    infos = _framework_checkpoints(root, args, notes)  # None: not a Hugging Face / Lightning directory
    store = None
    if infos is None:
        from . import store  # imports torch: only once the arguments are known to be usable

        try:
            infos = store.scan(root, verify=not args.no_verify)
        except OSError as exc:
            print(f"saverules.ls: error: cannot read {root}: {exc.strerror or exc}", file=sys.stderr)
            return 2

    if args.load and store is not None:
        loaded = []
        for info in infos:
            if info.ok:
                try:
                    store.read_checkpoint(info, "cpu")
                except store.CheckpointError as exc:
                    info = dataclasses.replace(info, verified=False, error=str(exc))
            loaded.append(info)
        infos = loaded

    valid = [i for i in infos if i.ok and i.step is not None]
    kept = {}
    if policy is not None and valid:
        explained = policy.explain_retention([i.as_checkpoint() for i in valid])
        kept = {id(info): why for info, why in zip(valid, explained)}

    failed = [i for i in infos if not i.ok]

    if args.json:
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
                "error": info.error,
                "format": getattr(info, "format", None),
                "world_size": _world(info),
                "kept_by": list(kept[id(info)]) if id(info) in kept else None,
            })
        print(json.dumps({"dir": os.path.abspath(root), "checkpoints": out, "notes": notes}, indent=1))
        return 1 if failed else 0

    rows = []
    for info in infos:
        if info.ok:
            verified = "yes" if info.verified else "size only"
        else:
            verified = "FAILED"
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
            _clock(info.time),
            info.utc.strftime("%Y-%m-%d %H:%M:%S") if info.utc else "?",
            ", ".join(info.reasons) or ("-" if info.ok else "?"),
            _size(info.size),
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
    print(f"{os.path.abspath(root)}: {len(infos)} checkpoint{'s' if len(infos) != 1 else ''}")
    if rows:
        print(format_table(rows, header))
    for info in failed:
        print(f"FAILED {info.name}: {info.error}")
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    if failed:
        print(
            f"{len(failed)} checkpoint{'s' if len(failed) != 1 else ''} failed verification; "
            "resume skips such checkpoints and retention never deletes them",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover - exercised through subprocess in the tests
    sys.exit(main())
