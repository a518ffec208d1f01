"""Manifests for checkpoints that a training framework writes itself.

The Hugging Face ``Trainer`` writes a ``checkpoint-N/`` directory and Lightning
writes one ``.ckpt`` file per save, each in its own format.  The integrations
(:mod:`saverules.transformers`, :mod:`saverules.lightning`) add a saverules
manifest next to what the framework wrote, and write it last: the sha256 and
size of every file, the step, epoch, training clock, the reasons for the save
and the metrics recorded at that step.  Without a valid manifest whose files
all match, a directory or file is not a checkpoint: resume skips it and
retention never deletes it.

* a Hugging Face checkpoint: ``checkpoint-N/saverules-manifest.json``, listing
  every file of the directory (sub-directories included);
* a Lightning checkpoint: ``NAME.ckpt`` with the manifest beside it, in
  ``NAME.ckpt.saverules-manifest.json``.

The manifest uses the field names of the checkpoint store's ``manifest.json``
(``step``, ``epoch``, ``time``, ``utc``, ``reasons``, ``metrics``, ``final``,
``policy_digest``, ``files`` with ``size`` and ``sha256``) under its own
``format`` name, so ``python -m saverules.ls DIR`` lists and verifies both
kinds.  Once the save has ended the callback adds ``save_costs``: the latest
measured save costs, this save's last, which the ``adaptive`` rule plans from.  This module is pure Python: listing never imports torch.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..store.digest import hash_file
from ..store.fs import fs
from ..store.manifest import CheckpointInfo, Invalid, read_json
from ..store.removed import record, removal, why_removed
from ..store.retain import plan
from ..store.verify import scan

__all__ = [
    "FORMAT_NAME", "FORMAT_VERSION", "DIR_MANIFEST", "SIDECAR_SUFFIX",
    "FrameworkCheckpoint", "ManifestWarning", "write_manifest", "manifest_path", "inspect", "list_checkpoints",
    "is_framework_dir", "last_good", "retention_plan", "apply_retention", "remove", "clean_metrics",
    "update_metrics", "record_save_costs", "save_costs_of",
]

FORMAT_NAME = "saverules-framework-checkpoint"
FORMAT_VERSION = 1
DIR_MANIFEST = "saverules-manifest.json"
SIDECAR_SUFFIX = ".saverules-manifest.json"
STORE_MANIFEST = "manifest.json"  # the checkpoint store's own manifest (saverules.store)
FRAMEWORKS = ("transformers", "lightning")

_HF_DIR = re.compile(r"^checkpoint-(\d+)$")


class ManifestWarning(UserWarning):
    """A checkpoint was skipped because it does not verify."""


@dataclasses.dataclass(frozen=True)
class FrameworkCheckpoint(CheckpointInfo):
    """One framework checkpoint (a directory or a file) and its verification status.

    The store's :class:`~saverules.store.manifest.CheckpointInfo` (what
    ``python -m saverules.ls`` shows) plus the ``framework`` that wrote it;
    ``verified`` is True when every file was re-hashed and matched, False with
    ``error`` when something is wrong, None when only sizes were checked.
    ``format`` and ``manifest`` stay None and ``unsafe`` False: the files are
    checked by their hashes, never loaded.
    """

    framework: str | None = None


# -- writing -------------------------------------------------------------------


def clean_metrics(values: Mapping[str, Any] | None) -> dict[str, float]:
    """The finite numbers among ``values`` as floats (tensors with one element included)."""
    out: dict[str, float] = {}
    for key, value in (values or {}).items():
        if isinstance(value, bool) or not isinstance(key, str):
            continue
        if hasattr(value, "item") and getattr(value, "numel", lambda: 1)() == 1:
            try:
                value = value.item()
            except (TypeError, ValueError, RuntimeError):
                continue
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[key] = float(value)
    return out


def manifest_path(checkpoint: str | os.PathLike) -> Path:
    """Where the manifest of a checkpoint directory or file lives."""
    p = Path(checkpoint)
    if p.is_dir():
        return p / DIR_MANIFEST
    return p.with_name(p.name + SIDECAR_SUFFIX)


def _files_of(checkpoint: Path) -> dict[str, Path]:
    if checkpoint.is_dir():
        out = {}
        for dirpath, dirnames, filenames in os.walk(checkpoint):
            dirnames.sort()
            for fname in sorted(filenames):
                full = Path(dirpath) / fname
                rel = full.relative_to(checkpoint).as_posix()
                if rel == DIR_MANIFEST or fname.startswith(".tmp-"):
                    continue
                out[rel] = full
        return out
    return {checkpoint.name: checkpoint}


def write_manifest(
    checkpoint: str | os.PathLike,
    *,
    framework: str,
    step: int,
    epoch: int,
    time: float | None,
    reasons: Sequence[str],
    metrics: Mapping[str, float] | None = None,
    final: bool = False,
    policy_digest: str | None = None,
) -> Path:
    """Hash every file of ``checkpoint`` and write its manifest, last and atomically.

    The files are fsynced before the manifest is renamed into place, so a
    crash leaves either no manifest (not a checkpoint) or a complete one.
    """
    if framework not in FRAMEWORKS:
        raise ValueError(f"framework must be one of {FRAMEWORKS}, got {framework!r}")
    checkpoint = Path(checkpoint)
    files = {}
    for rel, full in _files_of(checkpoint).items():
        fs.fsync_file(str(full))
        size, digest = hash_file(full)
        files[rel] = {"size": size, "sha256": digest}
    if checkpoint.is_dir():
        for dirpath, _, _ in os.walk(checkpoint):
            fs.fsync_dir(str(dirpath))
    doc = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "framework": framework,
        "step": int(step),
        "epoch": int(epoch),
        "time": None if time is None else float(time),
        "utc": datetime.now(timezone.utc).isoformat(),
        "reasons": [str(r) for r in reasons],
        "metrics": clean_metrics(metrics) or None,
        "final": bool(final),
        "policy_digest": policy_digest,
        "files": files,
    }
    target = manifest_path(checkpoint)
    _replace_manifest(target, doc)
    return target


def _replace_manifest(target: Path, doc: Mapping[str, Any]) -> None:
    """Write ``doc`` to ``target`` atomically: a fsynced temporary file renamed over it, then the directory fsynced."""
    tmp = target.with_name(f".tmp-{target.name}-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)
    fs.fsync_dir(str(target.parent))


def _update(checkpoint: str | os.PathLike, change: Callable[[dict[str, Any]], bool]) -> bool:
    """Change a checkpoint's manifest in place (``change`` edits the document, True when it changed it).

    The files are unchanged, so their hashes stay; the manifest is replaced
    atomically.  False when there is no valid manifest to update.
    """
    target = manifest_path(checkpoint)
    try:
        doc = _read(target)
    except Invalid:
        return False
    if change(doc):
        _replace_manifest(target, doc)
    return True


def update_metrics(checkpoint: str | os.PathLike, metrics: Mapping[str, Any]) -> bool:
    """Add ``metrics`` to a checkpoint's manifest (an evaluation that ran after the save, at its step)."""
    def add(doc: dict[str, Any]) -> bool:
        merged = dict(doc.get("metrics") or {})
        merged.update(clean_metrics(metrics))
        if merged == (doc.get("metrics") or {}):
            return False
        doc["metrics"] = merged
        return True

    return _update(checkpoint, add)


def record_save_costs(checkpoint: str | os.PathLike, costs: Sequence[tuple[float, float]]) -> bool:
    """Record in a checkpoint's manifest the latest save costs, its own last (``save_costs``).

    Each cost is ``[stall_seconds, write_seconds]`` as the callback reported it to the
    decider (:meth:`~saverules.engine.decider.Decider.note_cost`).  A save is timed to
    its very end, after its manifest went in, so the costs are added afterwards; the
    callback's state inside the checkpoint was written during the save and holds only
    the costs before it.  A resume from this checkpoint plans with these.
    """
    def add(doc: dict[str, Any]) -> bool:
        doc["save_costs"] = [[float(stall), float(write)] for stall, write in costs]
        return True

    return _update(checkpoint, add)


def save_costs_of(checkpoint: str | os.PathLike, step: int,
                  time: float | None = None) -> list[tuple[float, float]] | None:
    """The ``save_costs`` recorded for the save of ``step`` (at the training clock ``time``, when
    given) at ``checkpoint``; None when its manifest is missing, of another save, or has none."""
    try:
        doc = _read(manifest_path(checkpoint))
    except (Invalid, OSError):
        return None
    if doc.get("step") != step or (time is not None and doc.get("time") is not None and doc["time"] != time):
        return None
    costs = doc.get("save_costs")
    return None if costs is None else [(float(c), float(w)) for c, w in costs]


# -- reading -------------------------------------------------------------------


def _check(doc: Any, name: str) -> dict[str, Any]:
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise Invalid(f"{name} is not a saverules framework manifest")
    version = doc.get("format_version")
    if type(version) is not int or version < 1:
        raise Invalid(f"{name} has no valid format_version")
    if version > FORMAT_VERSION:
        raise Invalid(f"{name} has format version {version}, newer than this saverules reads; upgrade saverules")
    for key in ("step", "epoch"):
        if type(doc.get(key)) is not int or doc[key] < 0:
            raise Invalid(f"{name} has no valid {key}")
    clock = doc.get("time")
    if clock is not None and (type(clock) not in (int, float) or not math.isfinite(clock)):
        raise Invalid(f"{name} has no valid time")
    reasons = doc.get("reasons")
    if not isinstance(reasons, list) or not all(isinstance(r, str) for r in reasons):
        raise Invalid(f"{name} has no valid reasons")
    utc = doc.get("utc")
    try:
        if not isinstance(utc, str):
            raise TypeError(utc)
        datetime.fromisoformat(utc)
    except (TypeError, ValueError):
        raise Invalid(f"{name} has no valid utc time") from None
    costs = doc.get("save_costs")
    if costs is not None and not (isinstance(costs, list) and all(
            isinstance(c, list) and len(c) == 2
            and all(type(v) in (int, float) and math.isfinite(v) and v >= 0 for v in c) for c in costs)):
        raise Invalid(f"{name} has invalid save_costs")
    metrics = doc.get("metrics")
    if metrics is not None and not (
        isinstance(metrics, dict) and all(isinstance(k, str) and type(v) in (int, float) for k, v in metrics.items())
    ):
        raise Invalid(f"{name} has invalid metrics")
    files = doc.get("files")
    if not isinstance(files, dict) or not files:
        raise Invalid(f"{name} lists no files")
    for rel, entry in files.items():
        parts = rel.split("/") if isinstance(rel, str) else [""]
        if any(p in ("", ".", "..") for p in parts) or "\\" in rel or "\0" in rel:
            raise Invalid(f"{name} lists a bad file name {rel!r}")
        if (not isinstance(entry, dict) or type(entry.get("size")) is not int or entry["size"] < 0
                or not isinstance(entry.get("sha256"), str) or len(entry["sha256"]) != 64):
            raise Invalid(f"{name} has a bad entry for {rel}")
    return doc


def _read(mpath: Path) -> dict[str, Any]:
    doc = read_json(mpath, missing="no saverules manifest (unfinished, or not written by saverules)")
    return _check(doc, mpath.name)


def _size_on_disk(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in _files_of(path).values() if p.exists())


def inspect(path: str | os.PathLike, root: str | os.PathLike | None = None,
            verify: bool = True) -> FrameworkCheckpoint:
    """Read one checkpoint's manifest and check its files (re-hash them with ``verify``)."""
    path = Path(path)
    root = Path(root) if root is not None else path.parent
    name = os.path.relpath(path, root)
    base = path if path.is_dir() else path.parent
    try:
        doc = _read(manifest_path(path))
    except Invalid as exc:
        try:
            size = _size_on_disk(path)
        except OSError:
            size = 0
        return FrameworkCheckpoint(path=path, name=name, size=size, verified=False, error=str(exc))
    info = dict(
        path=path, name=name, framework=doc.get("framework"), step=doc["step"], epoch=doc["epoch"],
        time=None if doc.get("time") is None else float(doc["time"]),
        utc=datetime.fromisoformat(doc["utc"]), reasons=tuple(doc["reasons"]),
        size=sum(e["size"] for e in doc["files"].values()),
        final=bool(doc.get("final")), metrics=dict(doc["metrics"]) if doc.get("metrics") else None,
        policy_digest=doc.get("policy_digest"),
    )
    if path.is_dir():
        extra = sorted(set(_files_of(path)) - set(doc["files"]))
        if extra:
            return FrameworkCheckpoint(**info, verified=False,
                                       error=f"{extra[0]} is not in the manifest (written after it?)")
    for rel, entry in doc["files"].items():
        fpath = base / rel
        try:
            size = os.stat(fpath).st_size
        except FileNotFoundError:
            return FrameworkCheckpoint(**info, verified=False, error=f"{rel} is missing")
        except OSError as exc:
            return FrameworkCheckpoint(**info, verified=False, error=f"cannot read {rel}: {exc.strerror or exc}")
        if size != entry["size"]:
            return FrameworkCheckpoint(**info, verified=False,
                                       error=f"{rel} has {size} bytes, the manifest says {entry['size']} (truncated?)")
    if not verify:
        return FrameworkCheckpoint(**info, verified=None)
    for rel, entry in doc["files"].items():
        try:
            _, digest = hash_file(base / rel)
        except OSError as exc:
            return FrameworkCheckpoint(**info, verified=False, error=f"cannot read {rel}: {exc.strerror or exc}")
        if digest != entry["sha256"]:
            return FrameworkCheckpoint(**info, verified=False, error=f"{rel} does not match its sha256 (damaged)")
    return FrameworkCheckpoint(**info, verified=True)


def _candidates(root: Path) -> list[Path]:
    out = []
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except FileNotFoundError:
        return []
    names = {e.name for e in entries}
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            is_dir = entry.is_dir(follow_symlinks=False)
        except OSError:
            continue
        if is_dir:
            ours = os.path.lexists(os.path.join(entry.path, DIR_MANIFEST))
            # a checkpoint-N directory of the store itself ([storage].name = "checkpoint-{step}") is not ours
            unfinished = _HF_DIR.match(entry.name) and not os.path.lexists(os.path.join(entry.path, STORE_MANIFEST))
            if ours or unfinished:
                out.append(Path(entry.path))
        elif entry.name.endswith(".ckpt") or (entry.name + SIDECAR_SUFFIX) in names:
            out.append(Path(entry.path))
    return out


def is_framework_dir(root: str | os.PathLike) -> bool:
    """True when ``root`` holds Hugging Face ``checkpoint-N`` directories, ``.ckpt`` files or their manifests."""
    return bool(_candidates(Path(root)))


def list_checkpoints(root: str | os.PathLike, verify: bool = True) -> list[FrameworkCheckpoint]:
    """Every framework checkpoint under ``root``, oldest first; ones without a valid manifest last.

    The store's own listing (:func:`saverules.store.verify.scan`) with this module's
    candidates and check: the same order, and a checkpoint removed while it was read is
    left out, as for the store.
    """
    infos = scan(root, verify=verify, candidates=_candidates, inspect=inspect)
    return [i for i in infos if isinstance(i, FrameworkCheckpoint)]


def last_good(root: str | os.PathLike, verify: bool = True) -> FrameworkCheckpoint | None:
    """The newest checkpoint under ``root`` that verifies; newer ones that do not are skipped with a warning."""
    infos = list_checkpoints(root, verify=verify)
    good = [i for i in infos if i.ok]
    best = good[-1] if good else None
    for info in infos:
        if info.ok:
            continue
        if best is None or info.step is None or best.step is None or info.step >= best.step:
            fallback = f"resuming from {best.name} instead" if best else "no verified checkpoint is left"
            warnings.warn(f"saverules: skipping {info.path}: {info.error}; {fallback}", ManifestWarning,
                          stacklevel=3)
    return best


def retention_plan(policy: Any, infos: Sequence[FrameworkCheckpoint], newest: str | os.PathLike,
                   protect: Sequence[str | os.PathLike] = ()) -> list[tuple[FrameworkCheckpoint, str]]:
    """The usable checkpoints that ``policy.retain`` drops, each with a sentence saying why.

    The store's plan (:func:`saverules.store.retain.plan`): checkpoints that fail are never
    touched nor counted, only the newest run's finals stay pinned, and ``newest`` (the
    checkpoint just written) always stays.  ``protect`` adds paths that must stay (the
    trainer's own best model, say).
    """
    if policy.retention is None:
        return []
    guarded = {os.path.realpath(p) for p in protect}
    why = why_removed(policy.retention)
    dropped = plan(infos, Path(newest), policy)
    return [(info, why) for info in dropped
            if isinstance(info, FrameworkCheckpoint) and os.path.realpath(info.path) not in guarded]


def apply_retention(root: str | os.PathLike, policy: Any, framework: str, newest: str | os.PathLike,
                    protect: Sequence[str | os.PathLike] = (),
                    warned: set[str] | None = None) -> list[tuple[FrameworkCheckpoint, str]]:
    """Apply the policy's retention to the ``framework`` checkpoints under ``root``; what it removed, and why.

    As the store does: the plan is made from the manifests (sizes only); when
    it would delete anything, every checkpoint is re-hashed and the plan made
    again from the ones that verify, so a damaged checkpoint is never counted
    in place of a good one.  One that fails is warned about once (``warned``
    remembers) and left on disk.
    """
    def planned(verify: bool) -> list[tuple[FrameworkCheckpoint, str]]:
        infos = [i for i in list_checkpoints(root, verify=verify) if i.framework in (framework, None)]
        if verify:
            for info in infos:
                if not info.ok and (warned is None or str(info.path) not in warned):
                    if warned is not None:
                        warned.add(str(info.path))
                    warnings.warn(f"saverules: checkpoint {info.path} failed verification ({info.error}); it is not "
                                  "counted by retention and is left on disk for you to inspect or delete",
                                  ManifestWarning, stacklevel=4)
        return retention_plan(policy, infos, newest, protect=protect)

    doomed = planned(verify=False)
    if doomed:
        doomed = planned(verify=True)
    for info, _ in doomed:
        remove(info)
    # the same removal log as the store's, in ``root``: ``saverules.ls`` lists what retention removed
    record(root, [removal(info.name, info.step, policy, why) for info, why in doomed], warned)
    return doomed


def remove(info: FrameworkCheckpoint) -> None:
    """Delete a checkpoint: its manifest first (so a half-deleted one never verifies), then its files."""
    path = Path(info.path)
    try:
        os.unlink(manifest_path(path))
    except FileNotFoundError:
        pass
    if path.is_dir():
        import shutil

        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    fs.fsync_dir(str(path.parent))
