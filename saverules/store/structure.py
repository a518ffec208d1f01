"""The structure of a checkpoint's files, checked without unpickling anything.

A checkpoint whose files match their sha256 can still be one that resume will
not load: a 0-byte ``state.pt`` listed with the hash of 0 bytes, a state file
copied from another step, or an archive that asks to unpickle ``posix.system``.
:func:`check_state_file` and :func:`check_weights_file` find these the way
resume would, but without running any of it:

- ``state.pt`` must be a torch zip archive with one ``data.pkl`` whose pickle
  opcodes (read with :mod:`pickletools`, never executed) name only the globals
  a safe checkpoint needs (:data:`ALLOWED_GLOBALS`), whose top-level dict is
  tagged as a saverules state of the manifest's step, and whose every tensor
  storage is a record of the right size in the archive;
- ``model.safetensors`` must have a valid header whose byte ranges tile the
  file, and hold every tensor the state file's layout names.

This module imports neither torch nor safetensors: listing and verifying a
store stays fast.
"""
from __future__ import annotations

import json
import os
import pickletools
import struct
import zipfile
from typing import Any, Dict, Iterable, List, Mapping, Tuple

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

_STORAGE_BYTES = {
    "BFloat16Storage": 2, "BoolStorage": 1, "ByteStorage": 1, "CharStorage": 1, "ComplexDoubleStorage": 16,
    "ComplexFloatStorage": 8, "DoubleStorage": 8, "FloatStorage": 4, "HalfStorage": 2, "IntStorage": 4,
    "LongStorage": 8, "ShortStorage": 2,
}
#: Bytes per element of every dtype a tensor in a checkpoint may have.
_DTYPES = {
    "bfloat16": 2, "bits16": 2, "bits1x8": 1, "bits2x4": 1, "bits4x2": 1, "bits8": 1, "bool": 1, "complex128": 16,
    "complex32": 4, "complex64": 8, "float16": 2, "float32": 4, "float4_e2m1fn_x2": 1, "float64": 8,
    "float8_e4m3fn": 1, "float8_e4m3fnuz": 1, "float8_e5m2": 1, "float8_e5m2fnuz": 1, "float8_e8m0fnu": 1,
    "int16": 2, "int32": 4, "int64": 8, "int8": 1, "uint16": 2, "uint32": 4, "uint64": 8, "uint8": 1,
}

#: Every global a state file written by the store may name: what tensors, parameters, ``torch.Size``,
#: ``torch.dtype``, ``torch.device``, ``OrderedDict`` and ``bytes`` pickle to.  All of them are in
#: torch's own weights-only allowlist, so a file that passes here is one ``torch.load(weights_only=True)``
#: accepts.
ALLOWED_GLOBALS = frozenset(
    {
        "_codecs.encode",
        "collections.OrderedDict",
        "torch.Size",
        "torch.device",
        "torch._utils._rebuild_tensor_v2",
        "torch._utils._rebuild_tensor_v3",
        "torch._utils._rebuild_parameter",
        "torch._utils._rebuild_parameter_with_state",
        "torch.storage.UntypedStorage",
    }
    | {f"torch.{name}" for name in _STORAGE_BYTES}
    | {f"torch.{name}" for name in _DTYPES}
)


class StructureError(Exception):
    """A file is not what the manifest says it is (damaged, foreign, from another step)."""


class UnsafeStructure(StructureError):
    """A state file asks for something a safe checkpoint never holds (a class, a function)."""

    def __init__(self, message: str, name: str):
        super().__init__(message)
        self.name = name


class _Global:
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name


class _Call:
    """What a REDUCE / NEWOBJ would have built: never built, only recorded."""

    __slots__ = ("func", "args")

    def __init__(self, func: Any, args: Any):
        self.func = func
        self.args = args


class _Persistent:
    __slots__ = ("pid",)

    def __init__(self, pid: Any):
        self.pid = pid


_MARK = object()

_TENSOR_REBUILDS = ("torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor_v3")
_PARAMETER_REBUILDS = ("torch._utils._rebuild_parameter", "torch._utils._rebuild_parameter_with_state")

_PUSH_ARG = frozenset(
    {
        "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "STRING", "BINSTRING",
        "SHORT_BINSTRING", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "UNICODE", "SHORT_BINUNICODE",
        "BINUNICODE", "BINUNICODE8", "FLOAT", "BINFLOAT",
    }
)
_CONSTANTS = {"NONE": None, "NEWTRUE": True, "NEWFALSE": False}
_SKIP = frozenset({"FRAME"})
#: Opcodes no file of the store contains, and that need more than data to interpret.
_REFUSED = {
    "EXT1": "an extension-registry object", "EXT2": "an extension-registry object",
    "EXT4": "an extension-registry object", "NEXT_BUFFER": "an out-of-band buffer",
    "READONLY_BUFFER": "an out-of-band buffer", "PERSID": "a text persistent id",
}


def _refuse(name: str) -> UnsafeStructure:
    return UnsafeStructure(f"asks to unpickle {name}, which is not a tensor or a plain value (loading it would run code from the file, which saverules never does)", name)


def _pop_mark(stack: List[Any]) -> List[Any]:
    for i in range(len(stack) - 1, -1, -1):
        if stack[i] is _MARK:
            items = stack[i + 1:]
            del stack[i:]
            return items
    raise StructureError("has a damaged pickle (no MARK)")


def _read_pickle(data: bytes) -> Tuple[Any, List[Any], List[_Call]]:
    """Interpret the opcodes of ``data`` as data only; return (top object, persistent ids, calls).

    Containers are built as plain lists, tuples and dicts; a global is only
    looked up by name in :data:`ALLOWED_GLOBALS`, never imported, and a call
    is recorded, never made.
    """
    stack: List[Any] = []
    memo: Dict[Any, Any] = {}
    pids: List[Any] = []
    calls: List[_Call] = []
    try:
        for op, arg, _pos in pickletools.genops(data):
            name = op.name
            if name in _PUSH_ARG:
                stack.append(arg)
            elif name in _CONSTANTS:
                stack.append(_CONSTANTS[name])
            elif name in _SKIP:
                continue
            elif name == "PROTO":
                if not 0 <= arg <= 5:
                    raise StructureError(f"has a damaged pickle (protocol {arg})")
            elif name == "MARK":
                stack.append(_MARK)
            elif name == "EMPTY_DICT":
                stack.append({})
            elif name == "EMPTY_LIST":
                stack.append([])
            elif name == "EMPTY_TUPLE":
                stack.append(())
            elif name in ("EMPTY_SET", "FROZENSET", "ADDITEMS"):
                raise _refuse("a set")
            elif name == "BYTEARRAY8":
                raise _refuse("a bytearray")
            elif name == "TUPLE":
                stack.append(tuple(_pop_mark(stack)))
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                n = int(name[-1])
                if len(stack) < n:
                    raise StructureError("has a damaged pickle (stack underflow)")
                items = tuple(stack[-n:])
                del stack[-n:]
                stack.append(items)
            elif name == "LIST":
                stack.append(_pop_mark(stack))
            elif name == "DICT":
                items = _pop_mark(stack)
                stack.append(_pairs({}, items))
            elif name in ("APPEND", "APPENDS"):
                items = _pop_mark(stack) if name == "APPENDS" else [stack.pop()]
                target = stack[-1]
                if not isinstance(target, list):
                    raise StructureError("has a damaged pickle (items appended to something that is not a list)")
                target.extend(items)
            elif name in ("SETITEM", "SETITEMS"):
                if name == "SETITEMS":
                    items = _pop_mark(stack)
                else:
                    value = stack.pop()
                    items = [stack.pop(), value]
                target = stack[-1]
                if isinstance(target, dict):
                    _pairs(target, items)
                elif _is_call(target, "collections.OrderedDict"):
                    _pairs({}, items)
                else:
                    raise StructureError("has a damaged pickle (items set on something that is not a dict)")
            elif name == "POP":
                stack.pop()
            elif name == "POP_MARK":
                _pop_mark(stack)
            elif name == "DUP":
                stack.append(stack[-1])
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[arg] = stack[-1]
            elif name == "MEMOIZE":
                memo[len(memo)] = stack[-1]
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                if arg not in memo:
                    raise StructureError("has a damaged pickle (unknown memo entry)")
                stack.append(memo[arg])
            elif name == "GLOBAL":
                full = arg.replace(" ", ".", 1)
                if full not in ALLOWED_GLOBALS:
                    raise _refuse(full)
                stack.append(_Global(full))
            elif name == "STACK_GLOBAL":
                qual = stack.pop()
                module = stack.pop()
                if not (isinstance(module, str) and isinstance(qual, str)):
                    raise _refuse("a global whose name is computed")
                full = f"{module}.{qual}"
                if full not in ALLOWED_GLOBALS:
                    raise _refuse(full)
                stack.append(_Global(full))
            elif name == "REDUCE":
                args = stack.pop()
                func = stack.pop()
                if not isinstance(func, _Global):
                    raise _refuse("a call of something that is not a named global")
                call = _Call(func, args)
                calls.append(call)
                stack.append(call)
            elif name in ("NEWOBJ", "NEWOBJ_EX"):
                raise StructureError(f"has a pickle opcode torch.save never writes ({name})")
            elif name in ("INST", "OBJ"):
                raise _refuse("an instance of a class")
            elif name == "BUILD":
                stack.pop()
                if not _is_call(stack[-1], "collections.OrderedDict", *_TENSOR_REBUILDS, *_PARAMETER_REBUILDS):
                    raise StructureError("has a damaged pickle (object state set on a plain value)")
            elif name == "BINPERSID":
                pid = stack.pop()
                pids.append(pid)
                stack.append(_Persistent(pid))
            elif name in _REFUSED:
                raise _refuse(_REFUSED[name])
            elif name == "STOP":
                if len(stack) != 1:
                    raise StructureError("has a damaged pickle (unbalanced stack)")
                return stack[0], pids, calls
            else:  # pragma: no cover - every opcode of protocols 0-5 is handled above
                raise _refuse(f"opcode {name}")
    except IndexError:
        raise StructureError("has a damaged pickle (stack underflow)") from None
    except (ValueError, struct.error, UnicodeDecodeError) as exc:
        raise StructureError(f"has a damaged pickle ({exc})") from None
    raise StructureError("has a damaged pickle (no STOP)")


_KEY_TYPES = (str, int, float, bool, type(None), bytes)


def _plain_key(key: Any) -> bool:
    if isinstance(key, tuple):
        return all(_plain_key(k) for k in key)
    return type(key) in _KEY_TYPES


def _pairs(target: dict, items: List[Any]) -> dict:
    if len(items) % 2:
        raise StructureError("has a damaged pickle (odd SETITEMS)")
    for i in range(0, len(items), 2):
        if not _plain_key(items[i]):
            raise StructureError("has a damaged pickle (a dict key that is not a plain value)")
        target[items[i]] = items[i + 1]
    return target


class StateFacts:
    """What the state file says about itself: its step, and the tensors it expects in model.safetensors."""

    __slots__ = ("step", "weights")

    def __init__(self, step: Any, weights: Tuple[str, ...]):
        self.step = step
        self.weights = weights


def _storage_size(pid: Any) -> Tuple[str, int]:
    """(record key, bytes) of one persistent id ``('storage', type, key, location, numel)``."""
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
        raise StructureError("holds a persistent id that is not a tensor storage")
    _, stype, key, location, numel = pid
    if not (isinstance(stype, _Global) and isinstance(key, str) and isinstance(location, str)
            and type(numel) is int and numel >= 0):
        raise StructureError("holds a malformed tensor storage reference")
    short = stype.name.rsplit(".", 1)[-1]
    if short == "UntypedStorage":
        return key, numel
    per = _STORAGE_BYTES.get(short)
    if per is None:
        raise _refuse(stype.name)
    return key, numel * per




def _ints(value: Any) -> bool:
    return isinstance(value, tuple) and all(type(v) is int and v >= 0 for v in value)


def _is_call(value: Any, *names: str) -> bool:
    return isinstance(value, _Call) and value.func.name in names


def _elements(storage: Any, dtype: Any) -> int:
    """How many elements of the tensor's dtype its storage holds."""
    if not isinstance(storage, _Persistent):
        raise StructureError("has a damaged pickle (a tensor without a storage)")
    _, nbytes = _storage_size(storage.pid)
    if storage.pid[1].name == "torch.storage.UntypedStorage":
        short = dtype.name.rsplit(".", 1)[-1] if isinstance(dtype, _Global) else None
        if short not in _DTYPES:
            raise StructureError("has a damaged pickle (a tensor of an unknown dtype)")
        return nbytes // _DTYPES[short]
    return storage.pid[4]


def _check_call(call: _Call) -> None:
    """The arguments of each call torch would make on load must be what that call accepts.

    Resume loads what passes here; a tensor whose view reaches past its
    storage, or a Size of strings, would fail only when torch rebuilt it.
    """
    name, args = call.func.name, call.args
    damaged = StructureError(f"has a damaged pickle (malformed arguments to {name})")
    if not isinstance(args, tuple):
        raise damaged
    if name in _TENSOR_REBUILDS:
        v3 = name.endswith("v3")
        if len(args) not in ((7, 8) if v3 else (6, 7)):
            raise damaged
        storage, offset, size, stride, requires_grad, hooks = args[:6]
        if not (type(offset) is int and offset >= 0 and _ints(size) and _ints(stride) and len(size) == len(stride)
                and type(requires_grad) is bool and (_is_call(hooks, "collections.OrderedDict") or hooks == {})):
            raise damaged
        elements = _elements(storage, args[6] if v3 else None)
        if all(size):
            last = offset + sum((n - 1) * st for n, st in zip(size, stride))
            if last >= elements:
                raise StructureError("has a damaged pickle (a tensor that reaches past its storage)")
    elif name in _PARAMETER_REBUILDS:
        if len(args) != (3 if name.endswith("parameter") else 4) or not _is_call(args[0], *_TENSOR_REBUILDS) \
                or type(args[1]) is not bool:
            raise damaged
    elif name == "torch.Size":
        if len(args) != 1 or not _ints(args[0]):
            raise damaged
    elif name == "torch.device":
        if not (1 <= len(args) <= 2 and isinstance(args[0], str) and all(type(a) is int for a in args[1:])):
            raise damaged
    elif name == "collections.OrderedDict":
        if args not in ((), ([],)):
            raise damaged
    elif name == "_codecs.encode":
        if not (len(args) == 2 and isinstance(args[0], str) and args[1] in ("latin1", "latin-1")):
            raise damaged
    else:  # a dtype or a storage type called as a function
        raise damaged


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
    top, pids, calls = _read_pickle(data)
    for call in calls:
        _check_call(call)
    for pid in pids:
        key, nbytes = _storage_size(pid)
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
    weights: List[str] = []
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
