"""A rank of the sharded-promotion tests (tests/store/test_durable_dcp.py), run under torchrun or alone.

    torchrun --nproc_per_node 2 tests/helpers/durable_dcp_child.py ACTION LOCAL_DIR URL [ACTION LOCAL_DIR URL ...]

The actions run in order in one launch (one start of the ranks for several
checks).  The moto server's address comes in ``AWS_ENDPOINT_URL`` (set by the
test); each rank writes ``<SAVERULES_TEST_OUT>/<action>-rank<R>.json`` with
what it saw.  Actions:

``fault``
    An FSDP2 model (tests/helpers/dcp_worker.py's) trained 3 steps on every
    rank, saved at step 3 in format "dcp" to ``LOCAL_DIR`` (no durable tier);
    then rank 1 flips one byte of a shard it wrote (a disk that went bad, a
    file changed under the store), and every rank runs its promotion
    (:class:`saverules.store.remote.sharded.ShardedUpload` on the tier it
    opened: rank 0 the writer, the others without the lock).  Rank 1's upload
    fails its digest; every rank records the error it got.
``train``
    The whole runtime: a dcp Checkpointer with ``durable=URL`` on every rank
    (rank 0 holds the tier's lock), 6 steps, the local tier saving every 2
    steps and the durable tier every 3 (and the final step); ``close()``
    waits for the uploads and raises when the final step did not reach the
    durable tier.  Rank 0 writes the full state to ``saved.pt``.
``resume``
    An empty ``LOCAL_DIR`` (a new node): a dcp Checkpointer with
    ``durable=URL`` resumes (``load_latest``): rank 0 downloads the newest
    durable checkpoint, every rank loads its part (resharded to this many
    ranks); records the step and ``resumed_from``; rank 0 writes the full
    state to ``loaded-<world>.pt``.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dcp_worker import Counter, build, gathered, train_step  # noqa: E402

POLICY = """
version = 1
final = false
[[rules]]
kind = "every_steps"
every = 3
[storage]
dir = "checkpoints"
format = "dcp"
"""


TIERED = POLICY.replace("every = 3", "every = 2").replace("final = false\n", "") + """
[durable]
[[durable.rules]]
kind = "every_steps"
every = 3
[durable.retention]
keep_last = 1
"""


def main(argv: list[str]) -> int:
    from saverules.store.remote.retry import Retries

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    torch.set_num_threads(1)
    out = Path(os.environ["SAVERULES_TEST_OUT"])
    timeout = float(os.environ.get("SAVERULES_COMMIT_TIMEOUT", "60"))
    retries = Retries(attempts=2, first=0.1, longest=0.2)
    for i in range(0, len(argv), 3):
        action, local_dir, url = argv[i:i + 3]
        rec = run(action, local_dir, url, rank, world, out, timeout, retries)
        (out / f"{action}-rank{rank}.json").write_text(json.dumps(rec))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return 0


def run(action: str, local_dir: str, url: str, rank: int, world: int, out: Path, timeout: float,
        retries) -> dict:
    from saverules import Progress, loads
    from saverules.store.remote import DurableTier
    from saverules.store.remote.sharded import ShardedUpload
    from saverules.torch import Checkpointer

    rec: dict = {"rank": rank, "world": world}
    model, opt = build(world)
    state = {"model": model, "optimizer": opt, "counter": Counter(rank)}
    if action == "fault":
        ck = Checkpointer(loads(POLICY), dir=local_dir)
        for step in (1, 2, 3):
            train_step(model, opt, step, rank)
            ck.step(Progress(step, total_steps=3), state)
        ck.close()
        local = Path(local_dir) / "step-00000003"
        manifest = json.loads((local / "manifest.json").read_text())
        rec["mine"] = sorted(f for f, e in manifest["files"].items() if e.get("rank") == rank)
        if rank == 1:
            shard = local / [f for f in rec["mine"] if f.endswith(".distcp")][0]
            data = bytearray(shard.read_bytes())
            data[len(data) // 2] ^= 0x01
            shard.write_bytes(bytes(data))
            rec["flipped"] = shard.name
        if world > 1:
            dist.barrier()  # every rank's checkpoint is committed (and rank 1's shard damaged) before the uploads
        tier = DurableTier(url, writer=rank == 0, retries=retries)
        try:
            ShardedUpload(tier, rank, world, timeout)(local, local.name)
            rec["error"] = None
        except Exception as exc:
            rec["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            tier.close()
    elif action == "train":
        ck = Checkpointer(loads(TIERED), dir=local_dir, durable=url, durable_retries=retries)
        rec["decisions"] = []
        for step in range(1, 7):
            train_step(model, opt, step, rank)
            d = ck.step(Progress(step, total_steps=6), state)
            rec["decisions"].append([step, bool(d.save), list(d.reasons), list(getattr(d, "durable", ()))])
        ck.close(timeout=120)
        msd, osd = gathered(model, opt)
        if rank == 0:
            torch.save({"model": msd, "optimizer": osd}, out / "saved.pt")
        rec["local"] = sorted(p.name for p in Path(local_dir).iterdir() if p.name.startswith("step-"))
    elif action == "resume":
        assert not (Path(local_dir).exists() and any(Path(local_dir).iterdir()))
        ck = Checkpointer(loads(TIERED), dir=local_dir, durable=url, durable_retries=retries)
        got = ck.load_latest(state)
        rec["step"] = got.step if got is not None else None
        rec["resumed_from"] = list(ck.resumed_from) if ck.resumed_from is not None else None
        ck.close()
        msd, osd = gathered(model, opt)
        if rank == 0:
            torch.save({"model": msd, "optimizer": osd}, out / f"loaded-{world}.pt")
    return rec


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
