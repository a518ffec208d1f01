"""The structure of a checkpoint's files, checked without unpickling anything.

A checkpoint whose files match their sha256 can still be one that resume will
not load: a 0-byte ``state.pt`` listed with the hash of 0 bytes, a state file
copied from another step, or an archive that asks to unpickle ``posix.system``.
:func:`check_state_file` and :func:`check_weights_file` find these the way
resume would, but without running any of it:

- ``state.pt`` must be a torch zip archive with one ``data.pkl`` whose pickle
  opcodes (read as data by :mod:`saverules.store.pickle_scan`, never executed)
  name only the globals a safe checkpoint needs (:data:`ALLOWED_GLOBALS`),
  whose top-level dict is tagged as a saverules state of the manifest's step,
  and whose every tensor storage is a record of the right size in the archive;
- ``model.safetensors`` must have a valid header whose byte ranges tile the
  file, and hold every tensor the state file's layout names.

This module imports neither torch nor safetensors: listing and verifying a
store stays fast.
"""
from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Iterable, Mapping
from typing import Any

from .pickle_scan import ALLOWED_GLOBALS, StructureError, UnsafeStructure, check_call, read_pickle, storage_size

__all__ = [
    "ALLOWED_GLOBALS",
    "StateFacts",
    "StructureError",
    "UnsafeStructure",
    "check_files",
    "check_state_file",
    "check_weights_file",
]

#: The formats (the manifest's ``storage_format``) whose files this module knows how to check.
CHECKED_FORMATS = frozenset({"tensors", "torch", "safetensors"})
#: The files it checks (the names those formats write them under).
STATE_FILE = "state.pt"
WEIGHTS_FILE = "model.safetensors"

#: The tag of the dict in ``state.pt`` (the same value the writer uses).
PAYLOAD_NAME = "saverules-state"


class StateFacts:
    """What the state file says about itself: its step, and the tensors it expects in model.safetensors."""

    __slots__ = ("step", "weights")

    def __init__(self, step: Any, weights: tuple[str, ...]):
        self.step = step
        self.weights = weights


def check_state_file(path: str, step: int) -> StateFacts:
    """Check ``state.pt`` as resume would read it, without unpickling; raise StructureError / UnsafeStructure."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise StructureError(f"cannot be read: {exc.strerror or exc}") from None
    if magic != b"PK\x03\x04":
        raise StructureError("is not a torch.save zip archive (damaged?)")
    try:
        with zipfile.ZipFile(path) as z:
            infos = {i.filename: i for i in z.infolist()}
            pickles = [n for n in infos if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pickles) != 1:
                raise StructureError("is a zip archive but not one written by torch.save (no data.pkl)")
            record = infos[pickles[0]]
            # torch.save stores its records uncompressed: a compressed one is foreign, and could be a
            # small file that inflates to gigabytes.
            if record.compress_type != zipfile.ZIP_STORED or record.file_size > os.path.getsize(path):
                raise StructureError("is a zip archive but not one written by torch.save (a compressed data.pkl)")
            prefix = pickles[0][: -len("data.pkl")]
            data = z.read(pickles[0])
    except StructureError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
        raise StructureError(f"is not a readable zip archive (damaged?): {exc}") from None
    top, pids, calls = read_pickle(data)
    for call in calls:
        check_call(call)
    for pid in pids:
        key, nbytes = storage_size(pid)
        record = infos.get(f"{prefix}data/{key}")
        if record is None:
            raise StructureError(f"lacks the tensor data record {key} (damaged?)")
        if record.file_size != nbytes:
            raise StructureError(
                f"has a tensor data record {key} of {record.file_size} bytes where the tensor needs {nbytes} (damaged?)"
            )
    if not isinstance(top, dict) or top.get("format") != PAYLOAD_NAME:
        raise StructureError("is not a saverules state file")
    if top.get("step") != step or type(top.get("step")) is not int:
        raise StructureError(f"holds step {top.get('step')!r}, the manifest says {step}")
    weights: list[str] = []
    layout = top.get("safetensors")
    if layout:
        if not isinstance(layout, dict):
            raise StructureError("has a malformed safetensors layout")
        for entry in layout.values():
            names = entry.get("tensors") if isinstance(entry, dict) else None
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise StructureError("has a malformed safetensors layout")
            weights.extend(names)
    return StateFacts(top["step"], tuple(weights))


_ST_ITEM = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8, "C64": 8, "F8_E8M0": 1,
}
_MAX_HEADER = 100 << 20


def check_weights_file(path: str, size: int, expected: Iterable[str] = ()) -> None:
    """Check a safetensors file's header against its ``size``; every name in ``expected`` must be in it."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise StructureError("is too short to be a safetensors file (damaged?)")
            n = int.from_bytes(head, "little")
            if n > min(_MAX_HEADER, size - 8):
                raise StructureError("has an impossible header length (damaged?)")
            raw = f.read(n)
    except OSError as exc:
        raise StructureError(f"cannot be read: {exc.strerror or exc}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise StructureError("has a header that is not valid JSON (damaged?)") from None
    if not isinstance(header, dict):
        raise StructureError("has a header that is not a JSON object (damaged?)")
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise StructureError(f"has a malformed entry {name!r}")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in _ST_ITEM or not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise StructureError(f"has an entry {name!r} with a bad dtype or shape")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            raise StructureError(f"has an entry {name!r} with bad data offsets")
        count = 1
        for d in shape:
            count *= d
        if offsets[1] - offsets[0] != count * _ST_ITEM[dtype] or offsets[0] < 0:
            raise StructureError(f"has an entry {name!r} whose byte range does not fit its shape")
        spans.append((offsets[0], offsets[1]))
    spans.sort()
    end = 0
    for start, stop in spans:
        if start != end:
            raise StructureError("has byte ranges that overlap or leave gaps (damaged?)")
        end = stop
    if 8 + n + end != size:
        raise StructureError(f"describes {8 + n + end} bytes in its header, the file has {size} (damaged?)")
    missing = [name for name in expected if name not in header]
    if missing:
        raise StructureError(f"lacks the tensor {missing[0]!r} that {STATE_FILE} names")


def check_files(directory, manifest: Mapping[str, Any]) -> None:
    """Check every file of a checkpoint whose structure is known, as resume would read it.

    ``state.pt`` is checked against the manifest's step;
    ``model.safetensors`` against its size and the tensors the state file
    names.  Only the formats in :data:`CHECKED_FORMATS` are checked: another
    format lays its files out its own way.  Raises :class:`StructureError` (or :class:`UnsafeStructure`)
    with a message that starts with the file's name.
    """
    files = manifest["files"]
    if (manifest.get("storage_format") or "torch") not in CHECKED_FORMATS:
        return  # a format whose files this module does not know: its hashes are all there is to check here
    facts = None
    if STATE_FILE in files:
        try:
            facts = check_state_file(os.path.join(directory, STATE_FILE), manifest["step"])
        except UnsafeStructure as exc:
            raise UnsafeStructure(f"{STATE_FILE} {exc}", exc.name) from None
        except StructureError as exc:
            raise StructureError(f"{STATE_FILE} {exc}") from None
    if WEIGHTS_FILE in files:
        try:
            check_weights_file(os.path.join(directory, WEIGHTS_FILE), int(files[WEIGHTS_FILE]["size"]),
                               facts.weights if facts is not None else ())
        except StructureError as exc:
            raise StructureError(f"{WEIGHTS_FILE} {exc}") from None
