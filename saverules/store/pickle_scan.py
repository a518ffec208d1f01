"""The pickle of a state file, read as data: its opcodes interpreted without running any of them.

``state.pt`` is a torch zip archive whose ``data.pkl`` says how to rebuild the
state.  :func:`read_pickle` walks its opcodes with :mod:`pickletools` (never
:mod:`pickle`): containers become plain lists, tuples and dicts, a global is
only looked up by name in :data:`ALLOWED_GLOBALS` (never imported), and a call
is recorded (never made).  :func:`check_call` then checks that each recorded
call has the arguments torch's rebuild would accept, and :func:`storage_size`
says how many bytes each tensor storage's record must hold.  Anything else
(a class, a function, an extension-registry object) raises
:class:`UnsafeStructure`; a damaged pickle raises :class:`StructureError`.

The archive around the pickle, and the safetensors file beside it, are
checked in :mod:`saverules.store.structure`.  This module imports no torch.
"""
from __future__ import annotations

import pickletools
import struct
from typing import Any

__all__ = [
    "ALLOWED_GLOBALS",
    "StructureError",
    "UnsafeStructure",
    "check_call",
    "read_pickle",
    "storage_size",
]

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


def _pop_mark(stack: list[Any]) -> list[Any]:
    for i in range(len(stack) - 1, -1, -1):
        if stack[i] is _MARK:
            items = stack[i + 1:]
            del stack[i:]
            return items
    raise StructureError("has a damaged pickle (no MARK)")


def read_pickle(data: bytes) -> tuple[Any, list[Any], list[_Call]]:
    """Interpret the opcodes of ``data`` as data only; return (top object, persistent ids, calls).

    Containers are built as plain lists, tuples and dicts; a global is only
    looked up by name in :data:`ALLOWED_GLOBALS`, never imported, and a call
    is recorded, never made.
    """
    stack: list[Any] = []
    memo: dict[Any, Any] = {}
    pids: list[Any] = []
    calls: list[_Call] = []
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
                if not isinstance(arg, int) or not 0 <= arg <= 5:  # pickletools gives PROTO an int
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
                group = tuple(stack[-n:])
                del stack[-n:]
                stack.append(group)
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
                if not isinstance(arg, str):  # pickletools gives GLOBAL "module name"
                    raise StructureError("has a damaged pickle (a global without a name)")
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


def _pairs(target: dict, items: list[Any]) -> dict:
    if len(items) % 2:
        raise StructureError("has a damaged pickle (odd SETITEMS)")
    for i in range(0, len(items), 2):
        if not _plain_key(items[i]):
            raise StructureError("has a damaged pickle (a dict key that is not a plain value)")
        target[items[i]] = items[i + 1]
    return target


def storage_size(pid: Any) -> tuple[str, int]:
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
    _, nbytes = storage_size(storage.pid)
    if storage.pid[1].name == "torch.storage.UntypedStorage":
        short = dtype.name.rsplit(".", 1)[-1] if isinstance(dtype, _Global) else None
        if short not in _DTYPES:
            raise StructureError("has a damaged pickle (a tensor of an unknown dtype)")
        return nbytes // _DTYPES[short]
    return storage.pid[4]


def check_call(call: _Call) -> None:
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
