"""Export one object of a checkpoint to a single file: ``python -m saverules.export CHECKPOINT OUT``.

    python -m saverules.export checkpoints/step-00001000 model.safetensors
    python -m saverules.export checkpoints model.safetensors          # the newest checkpoint that verifies
    python -m saverules.export checkpoints/step-00001000 optim.pt --object optimizer

CHECKPOINT is a checkpoint directory, or a store directory (then its newest
checkpoint that verifies).  The checkpoint is verified first (every file
against the digest in its manifest; ``--no-verify`` skips that).  A
``format = "dcp"`` checkpoint is read unsharded in this one process with
DCP's own conversion planner (the one behind
``torch.distributed.checkpoint.format_utils.dcp_to_torch_save``), whatever
the number of ranks that wrote it; the other formats are read as a resume
reads them.

Only the shards of the exported entry are read.  OUT ending in ``.safetensors`` gets a flat ``{name: tensor}`` state dict (a
model's, for inference: ``model.load_state_dict(safetensors.torch.load_file(OUT))``);
OUT ending in ``.pt`` gets the object's state dict as it was saved, written
with ``torch.save`` (readable with ``torch.load(weights_only=True)``).
``--object`` picks the entry of the saved state (default: ``model``).

Exit status: 0 when exported, 1 when the checkpoint fails verification or
cannot be read, 2 for a usage error.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .engine.quantities import format_bytes

__all__ = ["main"]


class _Failed(Exception):
    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def _pick(path: str, verify: bool):
    from . import store

    if not os.path.isdir(path):
        raise _Failed(f"{path} is not a directory (give a checkpoint directory or a store directory)", 2)
    if os.path.exists(os.path.join(path, store.MANIFEST)):
        info = store.inspect_checkpoint(path, verify=verify)
        if not info.ok:
            raise _Failed(f"{path} fails verification: {info.error}", 1)
        return info
    infos = [i for i in store.scan(path, verify=verify) if i.ok and i.step is not None]
    if not infos:
        raise _Failed(f"{path} holds no checkpoint that verifies (is it a checkpoint store?)", 1)
    return infos[-1]


def _read_entry(info, name: str):
    """The saved state's entry ``name``; a sharded checkpoint reads only that entry's shards."""
    from . import store
    from .store import formats

    try:
        fmt = formats.get(info.format)
        if hasattr(fmt, "read_object") and hasattr(fmt, "entries"):  # the sharded format has both
            source = formats.Source.of(info.path, info.manifest)
            try:
                return fmt.read_object(source, name)
            except KeyError:
                names = ", ".join(fmt.entries(source)) or "nothing"
        else:
            payload = store.read_checkpoint(info, "cpu")
            entries = {**payload.objects, **payload.values}
            if name in entries:
                return entries[name]
            names = ", ".join(sorted(entries)) or "nothing"
    except store.CheckpointError as exc:
        raise _Failed(str(exc).replace("saverules: ", "", 1), 1) from None
    raise _Failed(f"{info.path} has no entry {name!r} (it holds {names}); pass --object NAME", 2)


def _flat_tensors(name: str, sd) -> dict:
    import torch

    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise _Failed(f"state[{name!r}] is not a flat {{name: tensor}} state dict (an optimizer's is nested); "
                      "export it to a .pt file instead", 2)
    out, seen = {}, set()
    for k, t in sd.items():
        t = t.detach()
        ptr = t.untyped_storage().data_ptr()
        # safetensors refuses tensors that share memory: tied weights are written as copies
        out[k] = t.clone() if ptr in seen and t.numel() else t.contiguous()
        seen.add(ptr)
    return out


def _file_mode() -> int:
    """0644 less the process's umask (read by setting it, then put back at once)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o644 & ~umask


def _refuse_a_checkpoint_dir(out: str) -> None:
    """Refuse an output inside a checkpoint's directory: it holds only the files its manifest lists."""
    from .store.layout import MANIFEST

    folder = Path(os.path.abspath(out)).parent
    if (folder / MANIFEST).exists():
        raise _Failed(
            f"{out} would be written into the checkpoint directory {folder}, which holds only the files its "
            "manifest lists (a file added there is not part of the checkpoint and retention deletes it with "
            "the checkpoint); write the export elsewhere, for example next to the store", 2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m saverules.export",
        description="Export one object of a saverules checkpoint (any format, sharded or not) to one file.",
    )
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint directory, or a store (its newest)")
    parser.add_argument("out", metavar="OUT", help="the file to write: NAME.safetensors or NAME.pt")
    parser.add_argument("--object", default="model", help="the entry of the saved state to export (default: model)")
    parser.add_argument("--no-verify", action="store_true", help="do not check the files against their digests")
    args = parser.parse_args(argv)

    suffix = os.path.splitext(args.out)[1]
    if suffix not in (".safetensors", ".pt"):
        print(f"saverules.export: error: {args.out}: the output must end in .safetensors or .pt", file=sys.stderr)
        return 2
    try:
        _refuse_a_checkpoint_dir(args.out)
        if os.path.exists(args.out):
            raise _Failed(f"{args.out} exists already; remove it or choose another name", 2)
        info = _pick(args.checkpoint, verify=not args.no_verify)
        sd = _read_entry(info, args.object)
        if os.path.exists(args.out):
            raise _Failed(f"{args.out} exists already; remove it or choose another name", 2)
        import torch

        tmp = f"{args.out}.tmp-{os.getpid()}"
        try:
            if suffix == ".safetensors":
                try:
                    from safetensors.torch import save_file
                except ImportError:
                    raise _Failed("writing .safetensors needs the safetensors package: pip install safetensors", 2) from None
                tensors = _flat_tensors(args.object, sd)
                save_file(tensors, tmp, metadata={"format": "pt", "saverules_step": str(info.step)})
                count = len(tensors)
            else:
                torch.save(sd, tmp)
                count = sum(1 for _ in _tensors(sd))
            os.chmod(tmp, _file_mode())  # as any new file: 0644 less the umask, whichever writer made it
            os.replace(tmp, args.out)
        except OSError as exc:
            raise _Failed(f"cannot write {args.out}: {exc.strerror or exc}", 1) from None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except _Failed as exc:
        print(f"saverules.export: error: {exc}", file=sys.stderr)
        return exc.status
    world = (info.manifest or {}).get("world_size") or 1
    print(f"exported state[{args.object!r}] of step {info.step} ({info.format or 'torch'} format, written by "
          f"{world} rank{'s' if world != 1 else ''}) to {args.out}: {count} tensors, {format_bytes(os.path.getsize(args.out))}")
    return 0


def _tensors(obj):
    import torch

    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            yield x
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)


if __name__ == "__main__":  # pragma: no cover - exercised through main() and a subprocess in the tests
    sys.exit(main())
