"""``training_args.bin`` read as data: a pickle's opcodes interpreted without running any of them.

Hugging Face saves ``TrainingArguments`` with ``torch.save``: a zip archive whose
``data.pkl`` rebuilds the dataclass.  :func:`read_training_args` walks the opcodes
with :mod:`pickletools` (never :mod:`pickle`): a global is kept as its dotted name
(never imported), a call or ``NEWOBJ`` is recorded (never made), and ``BUILD``
attaches the object's state.  An enum member pickles as a call of its class with
its value, so it reads back as that value.  The store's reader
(:mod:`saverules.store.pickle_scan`) refuses every global that is not a tensor part;
this one accepts any name, since it only ever reads names.
"""
from __future__ import annotations

import io
import pickletools
import zipfile
from typing import Any


class _Obj:
    """What a REDUCE / NEWOBJ would have built: the callable's name, its arguments, its state."""

    __slots__ = ("name", "args", "state")

    def __init__(self, name: str, args: Any):
        self.name: str = name
        self.args: Any = args
        self.state: Any = None


class _Name:
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name


_MARK = object()
_PUSH = frozenset({"INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "STRING", "BINSTRING",
                   "SHORT_BINSTRING", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "UNICODE", "SHORT_BINUNICODE",
                   "BINUNICODE", "BINUNICODE8", "FLOAT", "BINFLOAT", "BYTEARRAY8"})
_CONST = {"NONE": None, "NEWTRUE": True, "NEWFALSE": False}


class NotTrainingArgs(ValueError):
    """The file is not a readable pickle of a ``TrainingArguments``."""


def _pop_mark(stack: list[Any]) -> list[Any]:
    for i in range(len(stack) - 1, -1, -1):
        if stack[i] is _MARK:
            items = stack[i + 1:]
            del stack[i:]
            return items
    raise NotTrainingArgs("a damaged pickle (no MARK)")


def _interpret(data: bytes) -> Any:
    stack: list[Any] = []
    memo: dict[Any, Any] = {}
    for op, arg, _pos in pickletools.genops(data):
        name = op.name
        if name in _PUSH:
            stack.append(arg)
        elif name in _CONST:
            stack.append(_CONST[name])
        elif name in ("PROTO", "FRAME"):
            continue
        elif name == "MARK":
            stack.append(_MARK)
        elif name in ("EMPTY_DICT", "EMPTY_LIST", "EMPTY_TUPLE", "EMPTY_SET"):
            stack.append({"EMPTY_DICT": dict, "EMPTY_LIST": list, "EMPTY_TUPLE": tuple, "EMPTY_SET": list}[name]())
        elif name == "TUPLE":
            stack.append(tuple(_pop_mark(stack)))
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            n = int(name[-1])
            stack.append(tuple(stack[-n:]))
            del stack[-n - 1:-1]
        elif name in ("LIST", "FROZENSET"):
            stack.append(_pop_mark(stack))
        elif name == "DICT":
            items = _pop_mark(stack)
            stack.append({_key(items[i]): items[i + 1] for i in range(0, len(items) - 1, 2)})
        elif name in ("APPEND", "APPENDS", "ADDITEMS"):
            items = [stack.pop()] if name == "APPEND" else _pop_mark(stack)
            if isinstance(stack[-1], list):
                stack[-1].extend(items)
        elif name in ("SETITEM", "SETITEMS"):
            items = _pop_mark(stack) if name == "SETITEMS" else [stack.pop(-2), stack.pop()]
            target = stack[-1]
            if isinstance(target, _Obj):  # an OrderedDict or a dict subclass: its items are its state
                target.state = target.state if isinstance(target.state, dict) else {}
                target = target.state
            if isinstance(target, dict):
                for i in range(0, len(items) - 1, 2):
                    target[_key(items[i])] = items[i + 1]
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
            stack.append(memo[arg])
        elif name == "GLOBAL":
            stack.append(_Name(str(arg).replace(" ", ".", 1)))
        elif name == "STACK_GLOBAL":
            qual, module = stack.pop(), stack.pop()
            stack.append(_Name(f"{module}.{qual}"))
        elif name in ("REDUCE", "NEWOBJ", "NEWOBJ_EX"):
            if name == "NEWOBJ_EX":
                stack.pop()  # keyword arguments
            args = stack.pop()
            func = stack.pop()
            if isinstance(func, _Name) and func.name == "copyreg.__newobj__" and args:
                func, args = args[0], args[1:]
            stack.append(_Obj(func.name if isinstance(func, _Name) else "?", args))
        elif name == "BUILD":
            state = stack.pop()
            if isinstance(stack[-1], _Obj):
                stack[-1].state = state
        elif name in ("BINPERSID", "PERSID"):
            stack.pop() if name == "BINPERSID" else None
            stack.append(None)  # a tensor storage: no TrainingArguments field holds one
        elif name == "STOP":
            return stack[-1]
        else:
            raise NotTrainingArgs(f"a pickle opcode a TrainingArguments never needs ({name})")
    raise NotTrainingArgs("a damaged pickle (no STOP)")


def _key(key: Any) -> Any:
    return key if isinstance(key, (str, int, float, bool, type(None))) else repr(key)


def _plain(value: Any) -> Any:
    """Recorded objects as plain data: an enum member as its value, a dataclass as its state."""
    if isinstance(value, _Obj):
        if value.state is None and isinstance(value.args, tuple) and len(value.args) == 1:
            return _plain(value.args[0])  # an enum member: Class(value)
        return _plain(value.state) if isinstance(value.state, dict) else None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def read_training_args(data: bytes) -> tuple[str, dict[str, Any]]:
    """(class name, fields) of the ``TrainingArguments`` pickled in ``data`` (a torch.save archive or a
    bare pickle), read without unpickling.  Raises :class:`NotTrainingArgs`."""
    if data[:2] == b"PK":
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                names = [n for n in archive.namelist() if n.endswith("data.pkl")]
                if not names:
                    raise NotTrainingArgs("a zip archive without a data.pkl: not a torch.save file")
                data = archive.read(names[0])
        except zipfile.BadZipFile as exc:
            raise NotTrainingArgs(f"a damaged zip archive ({exc})") from None
    try:
        top = _interpret(data)
    except NotTrainingArgs:
        raise
    except (ValueError, IndexError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise NotTrainingArgs(f"not a readable pickle ({type(exc).__name__}: {exc})") from None
    if not (isinstance(top, _Obj) and top.name.startswith("transformers.") and top.name.endswith("Arguments")
            and isinstance(top.state, dict)):
        what = top.name if isinstance(top, _Obj) else type(top).__name__
        raise NotTrainingArgs(f"a pickle of {what}, not of transformers' TrainingArguments")
    fields = _plain(top.state)
    assert isinstance(fields, dict)
    return top.name, fields
