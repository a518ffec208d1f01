"""The "torch" format: the whole state in one ``state.pt`` written with ``torch.save``."""
from __future__ import annotations

from typing import Any

import torch

from ..layout import STATE_FILE
from ..state import Payload
from ..writer import tensors_in
from . import Encoded, Format, Output, Source, torchfile


class TorchFormat(Format):
    name = "torch"

    def encode(self, payload: Payload, out: Output) -> Encoded:
        data = torchfile.payload_dict(payload, payload.objects, None)
        entry = out.write(STATE_FILE, lambda f: torch.save(data, f), tensors_in(data))
        return Encoded({STATE_FILE: entry})

    def decode(self, source: Source, map_location: Any, mmap: bool = False) -> Payload:
        data = torchfile.read_payload_dict(source.dir / STATE_FILE, source.step, map_location, mmap=mmap)
        if data.get("safetensors"):
            # A state file that points at weights elsewhere: read it as the format that wrote it would.
            from .safetensors_format import attach_weights

            attach_weights(source, data, map_location)
        return torchfile.as_payload(data)

    def check_loads(self, source: Source) -> None:
        torchfile.load(source.dir / STATE_FILE, "cpu", mmap=True)
