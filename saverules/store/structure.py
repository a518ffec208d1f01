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
  file, and hold every tensor the state file's layout names;
- ``tensors.safetensors`` (the "tensors" format) must have a header that
  parses, names only known dtypes, whose byte ranges tile the file exactly,
  and whose entries are exactly the ones the structure in ``state.pt`` refers
  to: its header is bounded by what ``state.pt`` names before it is parsed, so a
  forged header of a million empty entries is refused without reading it.
- the structure tree in ``state.pt`` may not nest deeper than
  :data:`MAX_DEPTH` (a deeper one is refused, never a ``RecursionError``).

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
TENSORS_FILE = "tensors.safetensors"
#: The ``__metadata__`` format name of ``tensors.safetensors`` (the writer's value).
TENSORS_NAME = "saverules-tensors"
#: How deep the containers of a state may nest (the writer refuses deeper states, the readers deeper files).
MAX_DEPTH = 200

#: The tag of the dict in ``state.pt`` (the same value the writer uses).
PAYLOAD_NAME = "saverules-state"


class StateFacts:
    """What the state file says about itself: its step, and the tensors it expects in model.safetensors."""

    __slots__ = ("step", "weights", "entries", "max_dims")

    def __init__(self, step: Any, weights: tuple[str, ...], entries: frozenset[str] | None = None,
                 max_dims: int = 0):
        self.step = step
        self.weights = weights
        #: The entries of ``tensors.safetensors`` the structure refers to (None: not a tensors-format state).
        self.entries = entries
        self.max_dims = max_dims


def _depth(tree: Any, limit: int) -> int:
    """How deep the lists and dicts of ``tree`` nest (up to just past ``limit``), walked without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (list, tuple)):
            items: Any = node
        elif isinstance(node, dict):
            items = node.values()
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        stack.extend((x, depth + 1) for x in items)
    return deepest


def _tensor_refs(top: Mapping[str, Any]) -> tuple[frozenset[str], int]:
    """The entry names and the largest number of dimensions the structure of a tensors-format state names."""
    refs = top.get("tensors")
    if not isinstance(refs, list):
        raise StructureError("is not the structure of a tensors-format checkpoint (no tensor list)")
    names: set[str] = set()
    dims = 0
    for ref in refs:
        if not (isinstance(ref, list) and len(ref) == 7 and isinstance(ref[0], str)
                and isinstance(ref[3], list) and isinstance(ref[4], list)):
            raise StructureError("has a malformed tensor reference")
        names.add(ref[0])
        dims = max(dims, len(ref[3]))
    return frozenset(names), dims


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
            pickle_record = infos[pickles[0]]
            # torch.save stores its records uncompressed: a compressed one is foreign, and could be a
            # small file that inflates to gigabytes.
            if pickle_record.compress_type != zipfile.ZIP_STORED or pickle_record.file_size > os.path.getsize(path):
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
    # In the tensors format each container of the state is up to three list levels of the structure's tree.
    limit = 3 * MAX_DEPTH + 8 if top.get("layout") == "tensors" else MAX_DEPTH + 8
    if _depth(top, limit) > limit:
        raise StructureError(f"nests its containers deeper than {MAX_DEPTH} levels; saverules writes no such file")
    if top.get("layout") == "tensors":
        entries, dims = _tensor_refs(top)
        return StateFacts(top["step"], (), entries, dims)
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
    header = _json_header(raw)
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


#: Every dtype code ``tensors.safetensors`` may hold, with its element size (the writer's list).
_TENSORS_ITEM = {
    **_ST_ITEM, "F8_E4M3FNUZ": 1, "F8_E5M2FNUZ": 1, "C128": 16, "C32": 4,
}


def header_budget(entries: frozenset[str], max_dims: int) -> int:
    """The most header bytes a tensors file of these entries can need (the writer pads to 64 bytes)."""
    per_dim = 21  # a comma and up to 20 digits
    fixed = 128  # the metadata object
    each = 64 + (max_dims + 1) * per_dim + 2 * per_dim
    return fixed + 64 + sum(6 * len(name) + each for name in entries)


def check_tensors_file(path: str, size: int, facts: StateFacts) -> None:
    """Check ``tensors.safetensors`` against its ``size`` and the entries its structure refers to."""
    entries = facts.entries if facts.entries is not None else frozenset()
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise StructureError("is too short to be a tensors file (damaged?)")
            n = int.from_bytes(head, "little")
            if n > min(_MAX_HEADER, size - 8):
                raise StructureError(f"has a header that claims {n} bytes in a file of {size} (damaged?)")
            budget = header_budget(entries, facts.max_dims)
            if n > budget:
                raise StructureError(
                    f"has a header of {n} bytes where the {len(entries)} entries {STATE_FILE} names need at most "
                    f"{budget} (damaged or forged?)"
                )
            raw = f.read(n)
    except OSError as exc:
        raise StructureError(f"cannot be read: {exc.strerror or exc}") from None
    header = _json_header(raw)
    meta = header.pop("__metadata__", None)
    if not isinstance(meta, dict) or meta.get("format") != TENSORS_NAME:
        raise StructureError("is not a saverules tensors file (damaged?)")
    spans = []
    for name, entry in header.items():
        if name not in entries:
            raise StructureError(f"has an entry {name!r} that {STATE_FILE} does not refer to (damaged or forged?)")
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise StructureError(f"has a malformed entry {name!r}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _TENSORS_ITEM:
            raise StructureError(f"has an entry {name!r} with an unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise StructureError(f"has an entry {name!r} with a bad shape")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise StructureError(f"has an entry {name!r} with bad data offsets")
        count = 1
        for d in shape:
            count *= d
        if offsets[1] - offsets[0] != count * _TENSORS_ITEM[dtype]:
            raise StructureError(f"has an entry {name!r} whose byte range does not fit its shape")
        spans.append((offsets[0], offsets[1]))
    missing = sorted(entries - set(header))
    if missing:
        raise StructureError(f"lacks the entry {missing[0]!r} that {STATE_FILE} refers to (damaged?)")
    spans.sort()
    end = 0
    for start, stop in spans:
        if start != end:
            raise StructureError("has byte ranges that overlap or leave gaps (damaged?)")
        end = stop
    if 8 + n + end != size:
        raise StructureError(f"describes {8 + n + end} bytes in its header, the file has {size} (damaged?)")


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
    if TENSORS_FILE in files:
        if facts is None or facts.entries is None:
            raise StructureError(f"{TENSORS_FILE} comes without the structure in {STATE_FILE} that describes it")
        try:
            check_tensors_file(os.path.join(directory, TENSORS_FILE), int(files[TENSORS_FILE]["size"]), facts)
        except StructureError as exc:
            raise StructureError(f"{TENSORS_FILE} {exc}") from None
    if WEIGHTS_FILE in files:
        try:
            check_weights_file(os.path.join(directory, WEIGHTS_FILE), int(files[WEIGHTS_FILE]["size"]),
                               facts.weights if facts is not None else ())
        except StructureError as exc:
            raise StructureError(f"{WEIGHTS_FILE} {exc}") from None


def _json_header(raw: bytes) -> dict:
    """A safetensors header's bytes as the JSON object they must be."""
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise StructureError("has a header that is not valid JSON (damaged?)") from None
    if not isinstance(header, dict):
        raise StructureError("has a header that is not a JSON object (damaged?)")
    return header
