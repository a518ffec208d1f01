"""``tensors.safetensors``: raw tensor bytes behind a safetensors-style header, written straight from memory.

Layout (the safetensors layout): an 8-byte little-endian header length ``N``;
``N`` bytes of JSON, padded with spaces so that the data starts at a
multiple of 64; then the data.  The header maps entry names to
``{"dtype": code, "shape": [...], "data_offsets": [begin, end]}`` (offsets
from the start of the data), plus ``"__metadata__"``.  Entries follow one
another without gaps, largest element size first, so every entry starts at
a multiple of its element size and a mapped file needs no copy.

One entry is one *storage* of the state: tensors that share memory (views,
tied weights) share an entry, and the structure file records each tensor as
(entry, dtype, offset, shape, stride).  An entry that one contiguous tensor
fills exactly carries that tensor's dtype and shape; any other is a ``U8``
run of bytes.  A file holding only dtypes the safetensors package knows
opens with ``safetensors.safe_open`` too.

Reading never runs code: the header is JSON, checked entry by entry (known
dtype codes only, sizes that agree with shapes, entries that tile the data
exactly up to the end of the file) before any tensor is made.
"""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import torch

from ..errors import CheckpointError

MAGIC_NAME = "saverules-tensors"
VERSION = "1"
ALIGN = 64
MAX_HEADER = 100 << 20

_CODES = [
    ("float64", "F64"), ("float32", "F32"), ("float16", "F16"), ("bfloat16", "BF16"),
    ("int64", "I64"), ("int32", "I32"), ("int16", "I16"), ("int8", "I8"), ("uint8", "U8"), ("bool", "BOOL"),
    ("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64"),
    ("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("float8_e4m3fnuz", "F8_E4M3FNUZ"),
    ("float8_e5m2fnuz", "F8_E5M2FNUZ"), ("float8_e8m0fnu", "F8_E8M0"),
    ("complex64", "C64"), ("complex128", "C128"), ("complex32", "C32"),
]
#: torch dtype <-> header code, for the dtypes this torch has (nothing else is ever read).
CODE_OF: dict[torch.dtype, str] = {getattr(torch, n): c for n, c in _CODES if hasattr(torch, n)}
DTYPE_OF: dict[str, torch.dtype] = {c: d for d, c in CODE_OF.items()}
#: dtype names the structure file may name.
DTYPE_BY_NAME: dict[str, torch.dtype] = {n: getattr(torch, n) for n, _ in _CODES if hasattr(torch, n)}


class Entry:
    """One run of bytes in the data: a storage of the state."""

    __slots__ = ("name", "code", "shape", "nbytes", "align", "storage", "device")

    def __init__(self, name: str, code: str, shape: Sequence[int], nbytes: int, align: int, storage, device):
        self.name, self.code, self.shape, self.nbytes = name, code, list(shape), nbytes
        self.align, self.storage, self.device = align, storage, device


def header_bytes(entries: Sequence[Entry]) -> bytes:
    """The header for ``entries`` in the order given (offsets follow that order)."""
    header: dict[str, Any] = {"__metadata__": {"format": MAGIC_NAME, "version": VERSION}}
    offset = 0
    for e in entries:
        header[e.name] = {"dtype": e.code, "shape": e.shape, "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-(8 + len(text)) % ALIGN)
    return len(text).to_bytes(8, "little") + text


def order(entries: Sequence[Entry]) -> list[Entry]:
    """Largest alignment first (stable), so each entry starts at a multiple of its element size."""
    return sorted(entries, key=lambda e: -e.align)


def write(f, entries: Sequence[Entry], head: bytes) -> None:
    """Write the header and every entry's bytes from the storage's own memory (one copy per entry from a GPU)."""
    if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
        raise CheckpointError("saverules: the tensors format needs a little-endian machine")
    f.write(head)
    for e in entries:
        if not e.nbytes:
            continue
        u8 = torch.empty(0, dtype=torch.uint8, device=e.device).set_(e.storage, 0, (e.nbytes,), (1,))
        if u8.device.type != "cpu":
            u8 = u8.cpu()
        f.write(u8.numpy().data)


def _bad(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"saverules: cannot read {path}: {why} (damaged?)")


def read_header(path: Path, f) -> tuple[int, dict[str, tuple[torch.dtype, list[int], int, int]], bytes]:
    """Parse and check the header of the open file ``f``: (data start, {name: (dtype, shape, begin, end)}, raw)."""
    size = os.fstat(f.fileno()).st_size
    first = f.read(8)
    if len(first) != 8:
        raise _bad(path, "the file is shorter than its header")
    n = int.from_bytes(first, "little")
    if n > min(MAX_HEADER, size - 8):
        raise _bad(path, f"its header claims {n} bytes")
    raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise _bad(path, f"its header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise _bad(path, "its header is not a JSON object")
    meta = header.pop("__metadata__", None)
    if not isinstance(meta, dict) or meta.get("format") != MAGIC_NAME:
        raise _bad(path, "it is not a saverules tensors file")
    start = 8 + n
    spans = []
    out: dict[str, tuple[torch.dtype, list[int], int, int]] = {}
    for name, e in header.items():
        if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
            raise _bad(path, f"entry {name!r} of its header is malformed")
        dtype = DTYPE_OF.get(e["dtype"]) if isinstance(e["dtype"], str) else None
        shape, offs = e["shape"], e["data_offsets"]
        if dtype is None:
            raise _bad(path, f"entry {name!r} has an unknown dtype {e['dtype']!r}")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise _bad(path, f"entry {name!r} has a bad shape")
        if not (isinstance(offs, list) and len(offs) == 2 and all(type(o) is int for o in offs)
                and 0 <= offs[0] <= offs[1]):
            raise _bad(path, f"entry {name!r} has bad data offsets")
        numel = 1
        for d in shape:
            numel *= d
        if numel * torch.empty(0, dtype=dtype).element_size() != offs[1] - offs[0]:
            raise _bad(path, f"entry {name!r} has {offs[1] - offs[0]} bytes for its shape {shape}")
        spans.append((offs[0], offs[1]))
        out[name] = (dtype, shape, offs[0], offs[1])
    end = 0
    for b, e in sorted(spans):
        if b != end:
            raise _bad(path, "its entries do not tile the data")
        end = e
    if start + end != size:
        raise _bad(path, f"it has {size} bytes, its header accounts for {start + end} (truncated?)")
    return start, out, raw


Entries = dict[str, tuple[torch.dtype, list[int], int, int]]


def read_storages(path: Path, mmap: bool = False, expected: tuple[str, str] | None = None,
                  into: Callable[[Entries], Mapping[str, torch.UntypedStorage]] | None = None,
                  ) -> dict[str, torch.UntypedStorage]:
    """Every entry of the file as a CPU storage of its bytes.

    Read: one buffer per entry, filled straight from the file (no storage
    outlives what it holds).  ``mmap``: slices of one private (copy-on-write)
    map of the file, as ``torch.load(mmap=True)`` does.  Either way
    ``into(entries)`` may name, for some entries, the storage of exactly their
    size to land them in instead (see :mod:`~saverules.store.formats.in_place`):
    the bytes are read (or copied from the map) into it.  With ``expected``
    (algorithm, hex digest) the digest of every byte of the file is computed,
    in file order, in pieces of :data:`~saverules.store.digest.CHUNK` bytes
    on the hash worker while this thread reads (or copies) the next piece,
    and compared before this returns.
    """
    from .. import digest

    try:
        with open(path, "rb", buffering=0) as f:
            start, entries, raw = read_header(path, f)
            size = os.fstat(f.fileno()).st_size
            stream = digest.HashStream(expected[0]) if expected else None
            if stream is not None:
                stream.h.update(len(raw).to_bytes(8, "little") + raw)
            land = dict(into(entries)) if into is not None else {}
            if mmap:
                out = _mapped(path, size, start, entries, land, stream)
            else:
                out = _read(path, f, start, entries, land, stream)
    except OSError as exc:
        raise CheckpointError(f"saverules: cannot read {path}: {exc.strerror or exc}") from exc
    if stream is not None and expected is not None and stream.h.hexdigest() != expected[1]:
        # (stream is made exactly when a digest is expected)
        raise CheckpointError(f"{path.name} does not match its {expected[0]} digest (damaged)")
    return out


def _target(land: Mapping[str, torch.UntypedStorage], name: str, nbytes: int) -> torch.UntypedStorage | None:
    target = land.get(name)
    return target if target is not None and target.nbytes() == nbytes else None


def _drain(stream: Any) -> None:
    """Wait until the hash worker is done with everything submitted for ``stream`` (it reads our buffers)."""
    from .. import digest

    if stream is not None:
        digest.HASHER.submit(stream, None, wait=True).wait()


def _hashed(stream: Any) -> None:
    """Raise what the hash worker raised while hashing ``stream``."""
    if stream is not None and stream.error is not None:
        raise stream.error


def _read(path: Path, f: Any, start: int, entries: Entries, land: Mapping[str, torch.UntypedStorage],
          stream: Any) -> dict[str, torch.UntypedStorage]:
    from .. import digest

    out: dict[str, torch.UntypedStorage] = {}
    try:
        for name, (_, _, b, e) in sorted(entries.items(), key=lambda kv: kv[1][2]):
            target = _target(land, name, e - b)
            buf = torch.empty(0 if target is not None else e - b, dtype=torch.uint8)
            if target is not None:
                buf.set_(target, 0, (e - b,), (1,))
            if e > b:
                f.seek(start + b)
                view = buf.numpy().data
                got = 0
                while got < e - b:
                    piece = view[got:got + digest.CHUNK]
                    n = f.readinto(piece)
                    if not n:
                        raise _bad(path, "it ended early")
                    if stream is not None:
                        digest.HASHER.submit(stream, piece[:n])  # the memory stays alive: no wait
                    got += n
            out[name] = buf.untyped_storage()
    finally:
        _drain(stream)  # (also after an error: the worker must be done with the buffers)
    _hashed(stream)
    return out


def _mapped(path: Path, size: int, start: int, entries: Entries, land: Mapping[str, torch.UntypedStorage],
            stream: Any) -> dict[str, torch.UntypedStorage]:
    """The entries as slices of a private map of the file; those ``land`` names copied into their storage.

    The hash worker digests, in file order, each landed piece after it is
    copied (from the cache) and every other entry straight from the map,
    while this thread goes on copying: a mapped entry's pages are touched
    once by the digest, a landed one's by the copy and the digest.
    """
    import numpy

    from .. import digest

    # torch's stub types from_file as _StorageBase; on UntypedStorage it makes an UntypedStorage
    whole = cast(torch.UntypedStorage, torch.UntypedStorage.from_file(str(path), False, size))
    mapped = torch.empty(0, dtype=torch.uint8).set_(whole, 0, (size,), (1,)).numpy() if size else None
    out: dict[str, torch.UntypedStorage] = {}
    try:
        for name, (_, _, b, e) in sorted(entries.items(), key=lambda kv: kv[1][2]):
            target = _target(land, name, e - b)
            if mapped is None or e == b:
                out[name] = target if target is not None else whole[start + b:start + e]
                continue
            src = mapped[start + b:start + e]
            if target is None:
                if stream is not None:
                    digest.HASHER.submit(stream, src.data)  # the map stays alive until _drain
                out[name] = whole[start + b:start + e]
                continue
            dst = torch.empty(0, dtype=torch.uint8).set_(target, 0, (e - b,), (1,)).numpy()
            for at in range(0, e - b, digest.CHUNK):
                numpy.copyto(dst[at:at + digest.CHUNK], src[at:at + digest.CHUNK])
                if stream is not None:
                    digest.HASHER.submit(stream, dst[at:at + digest.CHUNK].data)
            out[name] = target
    finally:
        _drain(stream)
    _hashed(stream)
    return out


def view(storage: torch.UntypedStorage, dtype: torch.dtype, offset: int, shape: Sequence[int],
         stride: Sequence[int]) -> torch.Tensor | None:
    """The tensor (dtype, offset, shape, stride) over ``storage``, or None when it would reach outside it."""
    esize = torch.empty(0, dtype=dtype).element_size()
    if offset < 0 or len(shape) != len(stride) or any(s < 0 for s in stride) or any(d < 0 for d in shape):
        return None
    # A tensor with no elements reads nothing: its offset may lie past the end of its (empty) storage.
    extent = 0 if any(d == 0 for d in shape) else 1 + sum((d - 1) * s for d, s in zip(shape, stride))
    if extent and (offset + extent) * esize > storage.nbytes():
        return None
    if storage.nbytes() and storage.data_ptr() % esize:
        storage = storage.clone()  # a mapped entry off its alignment: copy it to aligned memory
    return torch.empty(0, dtype=dtype).set_(storage, offset, tuple(shape), tuple(stride))


def reread_header(path: Path, length: int, algo: str, expected: str) -> None:
    """Check that the header on disk has the digest of the header written and still parses against the file size."""
    from .. import digest

    try:
        with open(path, "rb", buffering=0) as f:
            _, _, raw = read_header(path, f)
    except OSError as exc:
        raise CheckpointError(f"saverules: cannot read {path}: {exc.strerror or exc}") from exc
    h = digest.new(algo)
    h.update(raw)
    if len(raw) != length or h.hexdigest() != expected:
        raise CheckpointError(f"saverules: the header of {path} did not read back as written")
