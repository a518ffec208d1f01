"""Save stall and throughput: synchronous against asynchronous ``Checkpointer`` saves.

The states are the sizes the store's issue names, built from the minimind
"small" preset (hidden size 512, vocabulary 6400) with fewer layers:

* **~50 MB**: 3 layers (11.7M parameters), the model's weights alone (47 MB);
* **~200 MB**: 5 layers (17.4M parameters), the weights with AdamW's two
  moment buffers (208 MB).

For each state, in interleaved rounds into a temporary directory on the same disk:

* **raw**: the tensors' bytes written to one file, then fsync: what the disk does;
* **sync**: ``Checkpointer.save`` with the default ``verify="hash"`` and with
  ``verify="none"``: the training thread waits for all of it;
* **async**: ``Checkpointer(async_save=True).save``: the training thread waits
  only for the CPU snapshot; a background thread writes.

Stall is the time ``save()`` blocks the caller; throughput is the checkpoint's
bytes on disk divided by the time from ``save()`` until the write is
committed.

Then the sharded row (:mod:`benchmarks.bench_save_sharded`): 2 gloo ranks,
FSDP2, ``format = "dcp"`` against ``dcp.save`` and ``dcp.async_save``.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from . import Row, median

NAME = "save"
ROOT = Path(__file__).resolve().parent.parent
STALL_GOAL = 0.15      # async stall / sync stall
THROUGHPUT_GOAL = 0.70  # sync throughput / raw write

POLICY = """\
version = 1
final = false
[[rules]]
kind = "every_steps"
every = 1000000000
[storage]
dir = "checkpoints"
name = "step-{step:08d}"
"""


#: (label, preset, layers (None: the preset's), with AdamW)
CASES = [
    ("~50 MB (small, 3 layers, weights)", "small", 3, False),
    ("~200 MB (small, 5 layers, weights + AdamW)", "small", 5, True),
]
QUICK_CASES = [("tiny + AdamW", "tiny", None, True)]


def _state(preset: str, optimizer: bool, layers=None):
    import torch
    from saverules.minimind.model import MiniMindLM, config_for

    torch.manual_seed(0)
    model = MiniMindLM(config_for(preset, num_hidden_layers=layers))
    state = {"model": model, "step": 0}
    if optimizer:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()  # creates exp_avg / exp_avg_sq
        opt.zero_grad(set_to_none=True)
        state["optimizer"] = opt
    return state


def _tensors(state):
    """Every distinct tensor of the state (shared storage counted once)."""
    import torch

    seen, out = set(), []

    def visit(x):
        if isinstance(x, torch.Tensor):
            key = (x.untyped_storage().data_ptr(), x.storage_offset(), x.numel())
            if key not in seen:
                seen.add(key)
                out.append(x)
        elif isinstance(x, dict):
            for v in x.values():
                visit(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                visit(v)

    for obj in state.values():
        visit(obj.state_dict() if hasattr(obj, "state_dict") else obj)
    return out


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _raw(tensors, path: Path):
    """Seconds to write the tensors' bytes to one file and fsync it; bytes written."""
    views = [t.detach().contiguous().view(-1).numpy().view("uint8") for t in tensors]
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for v in views:
            f.write(v.data)
        f.flush()
        os.fsync(f.fileno())
    secs = time.perf_counter() - t0
    size = path.stat().st_size
    path.unlink()
    return secs, size


def _save(ckpt, state, step: int):
    """(stall seconds, seconds until committed, bytes on disk) for one forced save."""
    from saverules import Progress

    ckpt.wait()
    t0 = time.perf_counter()
    ckpt.save(Progress(step, total_steps=10**9), state, reason="benchmark")
    t1 = time.perf_counter()
    ckpt.wait()
    t2 = time.perf_counter()
    target = ckpt.dir / ckpt.policy.storage.render_name(step=step)
    size = _dir_bytes(target)
    shutil.rmtree(target)  # outside the timing: keep the disk use flat
    return t1 - t0, t2 - t0, size


def run(quick: bool = False) -> list:
    import saverules
    from saverules.torch import Checkpointer

    policy = saverules.loads(POLICY)
    cases = QUICK_CASES if quick else CASES
    rounds = 2 if quick else 5
    rows = []
    with tempfile.TemporaryDirectory(prefix="saverules-bench-", dir=os.environ.get("BENCH_TMPDIR")) as tmp:
        tmp = Path(tmp)
        for label, preset, layers, with_opt in cases:
            state = _state(preset, with_opt, layers)
            tensors = _tensors(state)
            ckpts = {
                "sync": Checkpointer(policy, tmp / "sync", verify="hash"),
                "sync_noverify": Checkpointer(policy, tmp / "sync-none", verify="none"),
                "async": Checkpointer(policy, tmp / "async", async_save=True, verify="hash"),
            }
            res = {k: [] for k in ("raw", *ckpts)}
            step = 0
            for r in range(rounds + 1):  # round 0 warms up (allocations, snapshot buffers, page cache)
                order = ["raw", *ckpts]
                k = r % len(order)
                for name in order[k:] + order[:k]:
                    step += 1
                    if name == "raw":
                        secs, size = _raw(tensors, tmp / "raw.bin")
                        got = (secs, secs, size)
                    else:
                        got = _save(ckpts[name], state, step)
                    if r > 0:
                        res[name].append(got)
            for c in ckpts.values():
                c.close()
            del state, tensors

            def med(name, i):
                return median([x[i] for x in res[name]])

            size_mb = med("sync", 2) / 1e6
            raw_tp = med("raw", 2) / 1e6 / med("raw", 1)
            sync_stall = med("sync", 0)
            tp = {n: med(n, 2) / 1e6 / med(n, 1) for n in ckpts}
            rows += [
                Row(NAME, f"{label}: checkpoint size", size_mb, "MB", samples=[x[2] / 1e6 for x in res["sync"]]),
                Row(NAME, f"{label}: raw write + fsync", raw_tp, "MB/s", samples=[x[2] / 1e6 / x[1] for x in res["raw"]]),
                Row(NAME, f"{label}: sync save stall (verify=hash)", sync_stall, "s", samples=[x[0] for x in res["sync"]]),
                Row(NAME, f"{label}: async save stall", med("async", 0), "s", ratio=med("async", 0) / sync_stall,
                    vs="sync stall", goal=f"<= {STALL_GOAL:.0%} of sync", met=med("async", 0) / sync_stall <= STALL_GOAL,
                    samples=[x[0] for x in res["async"]], note="the CPU snapshot taken in the training thread"),
                Row(NAME, f"{label}: sync throughput (verify=hash)", tp["sync"], "MB/s", ratio=tp["sync"] / raw_tp,
                    vs="raw write", goal=f">= {THROUGHPUT_GOAL:.0%} of raw", met=tp["sync"] / raw_tp >= THROUGHPUT_GOAL,
                    samples=[x[2] / 1e6 / x[1] for x in res["sync"]],
                    note="includes re-reading every file to check its sha256"),
                Row(NAME, f"{label}: sync throughput (verify=none)", tp["sync_noverify"], "MB/s",
                    ratio=tp["sync_noverify"] / raw_tp, vs="raw write", goal=f">= {THROUGHPUT_GOAL:.0%} of raw",
                    met=tp["sync_noverify"] / raw_tp >= THROUGHPUT_GOAL,
                    samples=[x[2] / 1e6 / x[1] for x in res["sync_noverify"]],
                    note="the manifest's sha256 is still computed from the bytes written; no re-read"),
                Row(NAME, f"{label}: async throughput (verify=hash)", tp["async"], "MB/s", ratio=tp["async"] / raw_tp,
                    vs="raw write", samples=[x[2] / 1e6 / x[1] for x in res["async"]],
                    note="save() until the background write is committed"),
            ]
    # The sharded row: 2 ranks writing format "dcp", against DCP itself (benchmarks/bench_save_sharded.py).
    from . import bench_save_sharded

    rows += bench_save_sharded.run(quick)
    return rows
