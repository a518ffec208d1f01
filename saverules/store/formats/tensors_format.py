"""The "tensors" format: every tensor in ``tensors.safetensors``, the structure around them in a small ``state.pt``.

Every tensor of the state (model weights and buffers, optimizer moments
and steps, plain tensor values) goes to ``tensors.safetensors`` (see
:mod:`~saverules.store.formats.tensorfile`), written straight from the
tensors' memory: no pickling of tensor data, no CRC, no copy on the CPU.
What is not a tensor (the nesting of dicts, lists and tuples, numbers,
strings, the decider's state, the clock) goes to ``state.pt``, a
``weights_only`` torch file that holds no tensor, in which every container
is tagged and every tensor is a reference (entry, dtype, offset, shape,
stride): views, tied weights and non-contiguous tensors come back as they
were, sharing what they shared.
"""
from __future__ import annotations

import collections
from collections.abc import Mapping
from typing import Any

import torch

from .. import digest
from ..errors import CheckpointError, StateTypeError
from ..layout import STATE_FILE
from ..state import TENSOR_TYPES, Payload
from . import Encoded, FileEntry, Format, Output, Source, in_place, tensorfile, torchfile

TENSORS_FILE = "tensors.safetensors"
STRUCTURE_VERSION = 2
_LEAVES = frozenset({int, float, bool, str, type(None), torch.Size, torch.dtype, torch.device})


class _Encoder:
    """Walks the state: containers become tagged lists, tensors references to storage entries."""

    def __init__(self):
        self.entries: dict[tuple, tensorfile.Entry] = {}
        self.users: dict[tuple, list[torch.Tensor]] = {}
        self.refs: list[list] = []
        self.names: set = set()

    def tensor(self, t: torch.Tensor, where: str) -> list:
        if t.device.type == "meta":
            raise StateTypeError(f"{where}: a tensor on the meta device has no data to checkpoint")
        if t.layout != torch.strided or t.is_quantized:
            raise StateTypeError(f"{where}: a {t.layout} tensor cannot be checkpointed; convert it with .to_dense()")
        if t.dtype not in tensorfile.CODE_OF:
            raise StateTypeError(f"{where}: the tensors format cannot store dtype {t.dtype}")
        st = t.untyped_storage()
        key = (st.data_ptr(), st.nbytes(), str(t.device))
        entry = self.entries.get(key)
        if entry is None:
            name = where
            n = 1
            while name in self.names or name == "__metadata__":
                n += 1
                name = f"{where}#{n}"
            self.names.add(name)
            esize = t.element_size()
            align = esize if st.nbytes() % esize == 0 else 1
            entry = tensorfile.Entry(name, "U8", [st.nbytes()], st.nbytes(), align, st, t.device)
            self.entries[key] = entry
            self.users[key] = []
        self.users[key].append(t.detach())
        self.refs.append([entry.name, str(t.dtype).replace("torch.", ""), int(t.storage_offset()), list(t.shape),
                          list(t.stride()), type(t) is torch.nn.Parameter, bool(t.requires_grad)])
        return ["T", len(self.refs) - 1]

    def node(self, x: Any, where: str) -> list:
        t = type(x)
        if t in TENSOR_TYPES:
            return self.tensor(x, where)
        if t is dict or t is collections.OrderedDict:
            items = [[k, self.node(v, f"{where}.{k}")] for k, v in x.items()]
            if t is dict:
                return ["D", items]
            meta = getattr(x, "_metadata", None)
            return ["O", items, self.node(meta, f"{where}._metadata") if meta is not None else None]
        if t is list or t is tuple:
            return ["L" if t is list else "U", [self.node(v, f"{where}.{i}") for i, v in enumerate(x)]]
        if t is bytes:  # a weights_only load refuses b"" in a pickle (it is written as a call to bytes())
            return ["B", x.hex()]
        if t in _LEAVES:
            return ["V", x]
        if isinstance(x, torch.Tensor):
            raise StateTypeError(f"{where}: tensor subclass {t.__qualname__} cannot be checkpointed safely")
        raise StateTypeError(f"{where}: {t.__qualname__} is not a type a checkpoint may hold")

    def finish(self) -> list[tensorfile.Entry]:
        """Entries filled exactly by one contiguous tensor take its dtype and shape (readable as safetensors)."""
        for key, entry in self.entries.items():
            users = self.users[key]
            t = users[0]
            if (len(users) == 1 and t.storage_offset() == 0 and t.is_contiguous()
                    and t.numel() * t.element_size() == entry.nbytes):
                entry.code, entry.shape = tensorfile.CODE_OF[t.dtype], list(t.shape)
        return tensorfile.order(list(self.entries.values()))


def _node(x: Any, tensors: list[torch.Tensor]) -> Any:
    if not isinstance(x, list) or not x or not isinstance(x[0], str):
        raise CheckpointError("a node of the structure is malformed")
    tag = x[0]
    if tag == "V" and len(x) == 2:
        return x[1]
    if tag == "B" and len(x) == 2 and isinstance(x[1], str):
        try:
            return bytes.fromhex(x[1])
        except ValueError:
            raise CheckpointError("a bytes value of the structure is malformed") from None
    if tag == "T" and len(x) == 2 and type(x[1]) is int and 0 <= x[1] < len(tensors):
        return tensors[x[1]]
    if tag in ("L", "U") and len(x) == 2 and isinstance(x[1], list):
        items = [_node(v, tensors) for v in x[1]]
        return items if tag == "L" else tuple(items)
    if tag in ("D", "O") and len(x) == (2 if tag == "D" else 3) and isinstance(x[1], list):
        out = {} if tag == "D" else collections.OrderedDict()
        for item in x[1]:
            if not isinstance(item, list) or len(item) != 2:
                raise CheckpointError("a dict of the structure is malformed")
            out[item[0]] = _node(item[1], tensors)
        if tag == "O" and x[2] is not None:
            out._metadata = _node(x[2], tensors)  # type: ignore[attr-defined]  # torch keeps version info on a state dict
        return out
    raise CheckpointError(f"a node of the structure is malformed (tag {tag!r})")


def _tensor(ref: Any, storages: dict[str, torch.UntypedStorage], i: int) -> torch.Tensor:
    ok = (isinstance(ref, list) and len(ref) == 7 and isinstance(ref[0], str) and ref[0] in storages
          and ref[1] in tensorfile.DTYPE_BY_NAME and type(ref[2]) is int
          and isinstance(ref[3], list) and isinstance(ref[4], list)
          and all(type(d) is int for d in ref[3] + ref[4]) and type(ref[5]) is bool and type(ref[6]) is bool)
    t = tensorfile.view(storages[ref[0]], tensorfile.DTYPE_BY_NAME[ref[1]], ref[2], ref[3], ref[4]) if ok else None
    if t is None:
        raise CheckpointError(f"tensor {i} of the structure does not fit its entry")
    if ref[5]:
        return torch.nn.Parameter(t, requires_grad=ref[6])
    if ref[6] and (t.is_floating_point() or t.is_complex()):
        t.requires_grad_(True)
    return t


def _on(storages: dict[str, torch.UntypedStorage], map_location: Any) -> dict[str, torch.UntypedStorage]:
    if map_location is None or not isinstance(map_location, (str, torch.device)):
        return storages
    device = torch.device(map_location)
    if device.type == "cpu":
        return storages
    return {n: torch.empty(0, dtype=torch.uint8).set_(s, 0, (s.nbytes(),), (1,)).to(device).untyped_storage()
            for n, s in storages.items()}


class TensorsFormat(Format):
    name = "tensors"

    def encode(self, payload: Payload, out: Output) -> Encoded:
        enc = _Encoder()
        tree = enc.node({"objects": payload.objects, "values": payload.values, "decider": payload.decider}, "state")
        entries = enc.finish()
        head = tensorfile.header_bytes(entries)
        memory = [torch.empty(0, dtype=torch.uint8, device=e.device).set_(e.storage, 0, (e.nbytes,), (1,))
                  for e in entries]
        files: dict[str, FileEntry | None] = {TENSORS_FILE: out.write(TENSORS_FILE, lambda f: tensorfile.write(f, entries, head), memory)}
        structure = {"format": torchfile.PAYLOAD_NAME, "format_version": STRUCTURE_VERSION,
                     "step": int(payload.step), "clock": payload.clock, "layout": self.name,
                     "tree": tree, "tensors": enc.refs}
        files[STATE_FILE] = out.write(STATE_FILE, lambda f: torch.save(structure, f))
        algo = digest.DEFAULT
        h = digest.new(algo)
        h.update(head[8:])
        return Encoded(files, {"tensors_header": {"bytes": len(head) - 8, "algorithm": algo, "digest": h.hexdigest()}})

    digests_while_decoding = True

    lands_in_place = True

    def decode(self, source: Source, map_location: Any, mmap: bool = False,
               into: Mapping[str, Any] | None = None) -> Payload:
        """The payload of ``source``; ``into`` (the caller's state) lets a read land in its plain modules' memory."""
        path = source.dir / STATE_FILE
        expected = {}
        for fname in (STATE_FILE, TENSORS_FILE):
            entry = source.files.get(fname)
            if entry is None:
                raise CheckpointError(f"saverules: {source.dir} lists no {fname}")
            expected[fname] = digest.entry_digest(entry)
        algo, want = expected[STATE_FILE]  # the structure is small: check it before unpickling it
        try:
            size, got = digest.hash_file(path, algo)
        except OSError as exc:
            raise CheckpointError(f"saverules: cannot read {path}: {exc.strerror or exc}") from exc
        if got != want:
            raise CheckpointError(f"{STATE_FILE} does not match its {algo} digest (damaged)")
        data = torchfile.read_payload_dict(path, source.step, "cpu")
        if data.get("layout") != self.name or not isinstance(data.get("tensors"), list):
            raise CheckpointError(f"saverules: {path} is not the structure of a tensors-format checkpoint")
        land = None
        if into is not None and in_place.on_cpu(map_location):
            tree, refs = data.get("tree"), data["tensors"]

            def land(entries: tensorfile.Entries) -> dict[str, torch.UntypedStorage]:
                return in_place.targets(tree, refs, entries, into)
        storages = _on(tensorfile.read_storages(source.dir / TENSORS_FILE, mmap=mmap,
                                                expected=expected[TENSORS_FILE], into=land), map_location)
        try:
            tensors = [_tensor(ref, storages, i) for i, ref in enumerate(data["tensors"])]
            tree = _node(data.get("tree"), tensors)
        except CheckpointError as exc:
            raise CheckpointError(f"saverules: cannot read {path}: {exc} (damaged?)") from None
        if not (isinstance(tree, dict) and isinstance(tree.get("objects"), dict) and isinstance(tree.get("values"), dict)):
            raise CheckpointError(f"saverules: cannot read {path}: its structure has no objects and values")
        return Payload(step=data["step"], objects=tree["objects"], values=tree["values"],
                       decider=tree.get("decider"), clock=data.get("clock"))

    def check_index(self, source: Source) -> bool:
        meta = (source.metadata or {}).get("tensors_header")
        if not isinstance(meta, dict):
            raise CheckpointError(f"saverules: {source.dir} has no record of the header it wrote")
        tensorfile.reread_header(source.dir / TENSORS_FILE, meta["bytes"], meta["algorithm"], meta["digest"])
        entry = source.files[STATE_FILE]  # the structure is small: re-read it whole
        algo, expected = digest.entry_digest(entry)
        size, got = digest.hash_file(source.dir / STATE_FILE, algo)
        if (size, got) != (entry["size"], expected):
            raise CheckpointError(f"saverules: {source.dir / STATE_FILE} did not read back as written")
        return True

    def check_loads(self, source: Source) -> None:
        self.decode(source, "cpu", mmap=True)
