"""``manifest.json``: what a checkpoint holds, written last; its schema, reading and checking.

A directory is a checkpoint only when its manifest reads and checks out.
:class:`CheckpointInfo` is how the rest of the store (and ``saverules.ls``)
sees one checkpoint directory.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from ..engine.progress import Checkpoint, Progress
from .digest import KNOWN as _DIGESTS
from .errors import StateTypeError
from .layout import MANIFEST, STATE_FILE

#: ``manifest.json`` identifies itself with these two fields.  Version 2 names each file's digest
#: algorithm (``{"size": n, "xxh3_128": hex}``, or ``"blake3"``, ``"sha256"``) and may carry
#: ``format_metadata``; version 1 holds ``{"size": n, "sha256": hex}`` entries only.  Both are read.
FORMAT_NAME = "saverules-checkpoint"
FORMAT_VERSION = 2

MAX_MANIFEST_BYTES = 16 << 20

#: The files a checkpoint of each format cannot lack (``state.pt`` for the others).
REQUIRED_FILES: dict[str | None, tuple[str, ...]] = {"dcp": ("rank-00000.pt", ".metadata")}


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """One checkpoint directory as the store sees it.

    ``verified`` is True when every file was re-hashed and matched the
    manifest, False when something is wrong (``error`` says what), and None
    when only the manifest and file sizes were checked.  ``time`` is the
    training clock (seconds) at the save, ``utc`` the wall-clock moment.
    ``unsafe`` is True when a state file asks to unpickle something a safe
    checkpoint never holds: resume stops there (:class:`UnsafeCheckpointError`)
    instead of falling back.
    """

    path: Path
    name: str
    step: int | None = None
    epoch: int | None = None
    time: float | None = None
    utc: datetime | None = None
    reasons: tuple[str, ...] = ()
    size: int = 0
    verified: bool | None = None
    error: str | None = None
    final: bool = False
    metrics: Mapping[str, float] | None = None
    policy_digest: str | None = None
    format: str | None = None
    manifest: Mapping[str, Any] | None = dataclasses.field(default=None, repr=False, compare=False)
    unsafe: bool = False

    @property
    def ok(self) -> bool:
        """Usable: the manifest and files check out (``verified`` is not False)."""
        return self.error is None and self.verified is not False

    def as_checkpoint(self) -> Checkpoint:
        """What retention sees."""
        if self.step is None:
            raise ValueError(f"{self.path} has no valid manifest ({self.error}): retention sees only "
                             "checkpoints that scan() read")
        return Checkpoint(self.step, self.time, self.metrics, self.final)


class Invalid(Exception):
    """A manifest that cannot be taken for a checkpoint's; the message says why."""


def check_manifest(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise Invalid("manifest.json is not a JSON object")
    if data.get("format") != FORMAT_NAME:
        raise Invalid("manifest.json is not a saverules manifest")
    version = data.get("format_version")
    if type(version) is not int or version < 1:
        raise Invalid("manifest.json has no valid format_version")
    if version > FORMAT_VERSION:
        raise Invalid(
            f"manifest format version {version} is newer than this saverules reads ({FORMAT_VERSION}); upgrade saverules"
        )
    step = data.get("step")
    if type(step) is not int or step < 0:
        raise Invalid("manifest.json has no valid step")
    epoch = data.get("epoch")
    if type(epoch) is not int or epoch < 0:
        raise Invalid("manifest.json has no valid epoch")
    clock = data.get("time")
    if clock is not None and (type(clock) not in (int, float) or not math.isfinite(clock)):
        raise Invalid("manifest.json has no valid time")
    reasons = data.get("reasons")
    if not isinstance(reasons, list) or not all(isinstance(r, str) for r in reasons):
        raise Invalid("manifest.json has no valid reasons")
    utc = data.get("utc")
    try:
        moment = datetime.fromisoformat(utc) if isinstance(utc, str) else None
    except ValueError:
        moment = None
    if moment is None:
        raise Invalid("manifest.json has no valid utc time")
    metrics = data.get("metrics")
    if metrics is not None and not (
        isinstance(metrics, dict) and all(isinstance(k, str) and type(v) in (int, float) for k, v in metrics.items())
    ):
        raise Invalid("manifest.json has invalid metrics")
    files = data.get("files")
    required = REQUIRED_FILES.get(data.get("storage_format"), (STATE_FILE,))
    if not isinstance(files, dict):
        raise Invalid(f"manifest.json lists no {required[0]}")
    for fname in required:
        if fname not in files:
            raise Invalid(f"manifest.json lists no {fname}")
    for fname, entry in files.items():
        if (
            not isinstance(fname, str)
            or fname in ("", ".", "..", MANIFEST)
            or "/" in fname
            or "\\" in fname
            or "\0" in fname
        ):
            raise Invalid(f"manifest.json lists a bad file name {fname!r}")
        if not isinstance(entry, dict) or type(entry.get("size")) is not int or entry["size"] < 0:
            raise Invalid(f"manifest.json has a bad entry for {fname}")
        algos = [a for a in _DIGESTS if a in entry] if version >= 2 else ["sha256"]
        if len(algos) != 1 or not _is_hex(entry.get(algos[0]), _DIGESTS[algos[0]]):
            raise Invalid(f"manifest.json has a bad entry for {fname}")
    meta = data.get("format_metadata")
    if meta is not None and not isinstance(meta, dict):
        raise Invalid("manifest.json has invalid format_metadata")
    return data


def _is_hex(value: Any, length: int) -> bool:
    return isinstance(value, str) and len(value) == length and all(c in "0123456789abcdef" for c in value)


def read_manifest(path: Path) -> dict[str, Any]:
    """The checked manifest of the checkpoint directory ``path``; raises :class:`Invalid`."""
    return check_manifest(read_json(path / MANIFEST, missing=f"{MANIFEST} is missing"))


def read_json(mpath: Path, missing: str) -> Any:
    """The JSON document in the manifest file ``mpath``, unchecked; raises :class:`Invalid`.

    The message names the file; ``missing`` is the message when there is no
    such file.  A file over :data:`MAX_MANIFEST_BYTES` is refused unread.
    """
    try:
        with open(mpath, "rb") as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        raise Invalid(missing) from None
    except OSError as exc:
        raise Invalid(f"cannot read {mpath.name}: {exc.strerror or exc}") from None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise Invalid(f"{mpath.name} is too large")
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise Invalid(f"{mpath.name} is damaged ({exc})") from None


def encode_manifest(manifest: Mapping[str, Any]) -> bytes:
    return json.dumps(manifest, indent=1, sort_keys=True).encode("utf-8")


def info_from_manifest(path: Path, root: Path, m: Mapping[str, Any], verified, error) -> CheckpointInfo:
    return CheckpointInfo(
        path=path,
        name=os.path.relpath(path, root),
        step=m["step"],
        epoch=m["epoch"],
        time=float(m["time"]) if m.get("time") is not None else None,
        utc=datetime.fromisoformat(m["utc"]),
        reasons=tuple(m["reasons"]),
        size=sum(int(e["size"]) for e in m["files"].values()),
        verified=verified,
        error=error,
        final=bool(m.get("final", "final" in m["reasons"])),
        metrics=dict(m["metrics"]) if m.get("metrics") is not None else None,
        policy_digest=m.get("policy_digest"),
        format=m.get("storage_format"),
        manifest=m,
    )


def library_version() -> str | None:
    import saverules

    version = getattr(saverules, "__version__", None)
    if version:
        return str(version)
    try:
        from importlib.metadata import version as _v

        return _v("saverules")
    except Exception:
        return None


def metrics_of(progress: Progress) -> dict[str, float] | None:
    """``Progress.metrics`` as the manifest records them (names to floats); raise on one that is not a number."""
    if progress.metrics is None:
        return None
    metrics = {}
    for k, v in progress.metrics.items():
        try:
            metrics[str(k)] = float(v)
        except (TypeError, ValueError):
            raise StateTypeError(f"Progress.metrics[{k!r}] is not a number: {v!r}") from None
    return metrics


def new_manifest(*, name: str, progress: Progress, clock: float, utc: datetime, reasons: Sequence[str],
                 metrics: dict[str, float] | None, policy_digest: str, storage_format: str,
                 world_size: int) -> dict[str, Any]:
    """Every field of a manifest but ``files`` (added by the commit once the files are written)."""
    import torch

    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "name": name,
        "step": int(progress.step),
        "epoch": int(progress.epoch),
        "epoch_end": bool(progress.epoch_end),
        "is_last": progress.is_last,
        "total_steps": progress.total_steps,
        "time": clock,
        "utc": utc.isoformat(),
        "reasons": list(reasons),
        "final": "final" in reasons,
        "metrics": metrics,
        "policy_digest": policy_digest,
        "storage_format": storage_format,
        "saverules_version": library_version(),
        "torch_version": torch.__version__,
        "python_version": ".".join(map(str, sys.version_info[:3])),
        "world_size": world_size,
    }


def progress_of(info: CheckpointInfo, clock: float) -> Progress:
    """The Progress of the saved step, as ``load_latest`` returns it."""
    manifest = info.manifest
    if info.step is None or info.epoch is None or manifest is None:
        raise ValueError(f"{info.path} has no valid manifest ({info.error}): only a checkpoint that scan() "
                         "read can be resumed")
    return Progress(
        step=info.step,
        total_steps=manifest.get("total_steps"),
        epoch=info.epoch,
        epoch_end=bool(manifest.get("epoch_end", False)),
        is_last=manifest.get("is_last"),
        time=clock,
        metrics=info.metrics,
    )
