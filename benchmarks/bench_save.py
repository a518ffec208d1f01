"""Saves and loads: the store against its peers, side by side, at ~200 MB and ~1 GB.

The states are the minimind "small" preset (hidden size 512, vocabulary
6400) with AdamW's two moment buffers: 5 layers (17.4M parameters, ~209 MB)
and 26 layers (~83M parameters, ~1 GB).  Every writer is made durable (its
files and directory fsynced), each into its own directory on the same disk,
in interleaved rounds after a warm-up round; medians are reported.

Peers: the tensors' bytes written raw to one file; ``torch.save``;
``safetensors.torch.save_file`` of every tensor (model and optimizer,
flattened); ``torch.distributed.checkpoint.save`` and ``async_save`` (one
process, no process group).  The store: ``Checkpointer.save`` in its default
format ("tensors") with each verify mode, the "torch" format, and
``async_save``.  Loads: ``torch.load(weights_only=True)`` (and with
``mmap=True``) followed by ``load_state_dict`` of the model and the
optimizer, against ``Checkpointer.load_latest`` from a new Checkpointer
(so the newest checkpoint's digests are checked, not taken from a cache).

Throughput is the bytes written divided by the time until durable; stall is
how long the call blocks the caller.  For the stall rows, the two
asynchronous writers (``dcp.async_save`` and the store's ``async_save``) are
followed by one training step (forward, backward, ``optimizer.step()``) before their write
is awaited, and their stall also counts the time that step's
``optimizer.step()`` was held: the store copies the parameters and AdamW's
moments in its writer thread while forward and backward run, and holds the
step until that copy is done (:mod:`saverules.store.staging`).

Then the sharded row (:mod:`benchmarks.bench_save_sharded`): 2 gloo ranks,
FSDP2, ``format = "dcp"`` against ``dcp.save`` and ``dcp.async_save``.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from . import Row, held_training_step, median

NAME = "save"
SYNC_GOAL = 0.80        # default sync save (verify on) / raw write
STALL_GOAL = 0.10       # async stall / sync stall
DCP_STALL_GOAL = 0.25   # async stall / dcp.async_save stall
LOAD_GOAL = 1.00        # load_latest / (torch.load(weights_only) + load_state_dict)

POLICY = """\
version = 1
final = false
[[rules]]
kind = "every_steps"
every = 1000000000
[storage]
name = "step-{step:08d}"
format = "%s"
"""

#: (label, preset, layers)
CASES = [("~200 MB (small, 5 layers, weights + AdamW)", "small", 5),
         ("~1 GB (small, 26 layers, weights + AdamW)", "small", 26)]
QUICK_CASES = [("tiny + AdamW", "tiny", None)]
#: The writers followed by a training step whose hold counts as stall (see _timed); their
#: throughput is the plain writers' ("dcp.async_save", "store async"), awaited at once.
ASYNC_WRITERS = ("dcp.async_save + step", "store async + step")


def _state(preset: str, layers=None):
    import torch

    from saverules.minimind.model import MiniMindLM, config_for

    torch.manual_seed(0)
    model = MiniMindLM(config_for(preset, num_hidden_layers=layers))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()  # creates exp_avg / exp_avg_sq
    opt.zero_grad(set_to_none=True)
    return model, opt


def _flat(model, opt):
    """Every distinct tensor of model + optimizer under a unique name (shared storage once)."""
    import torch

    out, seen = {}, set()

    def visit(prefix, x):
        if isinstance(x, torch.Tensor):
            key = x.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                out[prefix] = x.detach().contiguous()
        elif isinstance(x, dict):
            for k, v in x.items():
                visit(f"{prefix}.{k}", v)

    visit("model", model.state_dict())
    visit("optimizer", opt.state_dict()["state"])
    return out


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for p in [path, *path.rglob("*")]:
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(path)


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _timed(fn, target: Path, after=None):
    """(stall, seconds until durable, bytes) of fn(target); the output is removed afterwards.

    ``after()``, when given, runs once fn returns (a training step) and
    answers how long it was held: that counts as stall.
    """
    t0 = time.perf_counter()
    wait = fn(target)
    t1 = time.perf_counter()
    held = after() if after is not None else 0.0
    if wait is not None:
        wait()
    t2 = time.perf_counter()
    size = _size(target)
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    return (t1 - t0) + held, t2 - t0, size


def _writers(model, opt, tmp: Path):
    import torch
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file

    import saverules
    from saverules import Progress
    from saverules.store import Checkpointer

    flat = _flat(model, opt)
    views = [t.reshape(-1).view(torch.uint8).numpy() for t in flat.values()]
    sd = {"model": model.state_dict(), "optimizer": opt.state_dict()}
    state = {"model": model, "optimizer": opt, "step": 0}
    step = [0]

    def raw(path):
        with open(path, "wb") as f:
            for v in views:
                f.write(v.data)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(path.parent)

    def torch_save(path):
        with open(path, "wb") as f:
            torch.save(sd, f)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(path.parent)

    def st_save(path):
        save_file(flat, str(path))
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        _fsync_dir(path.parent)

    def dcp_save(path):
        dcp.save(sd, checkpoint_id=str(path))  # FileSystemWriter fsyncs its files
        _fsync_tree(path)

    def dcp_async(path):
        future = dcp.async_save(sd, checkpoint_id=str(path))
        return lambda: (future.result(), _fsync_tree(path))

    def store(fmt, verify="hash", async_save=False):
        policy = saverules.loads(POLICY % fmt)
        ck = Checkpointer(policy, tmp / f"store-{fmt}-{verify}-{async_save}", verify=verify, async_save=async_save)

        def save(path):
            step[0] += 1
            ck.save(Progress(step[0], total_steps=10**9), state, reason="benchmark")
            made = ck.dir / policy.storage.render_name(step=step[0])

            def done():
                ck.wait()
                os.rename(made, path)  # measured as the store wrote it; moved so that _timed removes it
            return done
        return save

    out = {
        "raw": raw, "torch.save": torch_save, "safetensors": st_save, "dcp.save": dcp_save,
        "dcp.async_save": dcp_async,
        "store hash": store("tensors"), "store device": store("tensors", "device"),
        "store none": store("tensors", "none"), "store torch format": store("torch"),
        "store async": store("tensors", async_save=True),
    }
    # The stall rows: the same writers, each followed by a training step (see _timed and ASYNC_WRITERS).
    out["dcp.async_save + step"] = out["dcp.async_save"]
    out["store async + step"] = store("tensors", async_save=True)
    return out


def _loads(model, opt, tmp: Path):
    import torch

    import saverules
    from saverules import Progress
    from saverules.store import Checkpointer

    path = tmp / "load.pt"
    with open(path, "wb") as f:
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, f)
    policy = saverules.loads(POLICY % "tensors")
    Checkpointer(policy, tmp / "load-store").save(Progress(1), {"model": model, "optimizer": opt, "step": 0})

    def torch_load(mmap):
        def run():
            sd = torch.load(path, weights_only=True, mmap=mmap)
            model.load_state_dict(sd["model"])
            opt.load_state_dict(sd["optimizer"])
        return run

    def store_load(mmap):
        def run():
            assert Checkpointer(policy, tmp / "load-store").load_latest(
                {"model": model, "optimizer": opt, "step": None}, mmap=mmap).step == 1
        return run

    return {"torch.load": torch_load(False), "torch.load mmap": torch_load(True),
            "load_latest": store_load(False), "load_latest mmap": store_load(True)}


def run(quick: bool = False) -> list:
    import gc

    cases = QUICK_CASES if quick else CASES
    rounds = 1 if quick else 3
    rows = []
    with tempfile.TemporaryDirectory(prefix="saverules-bench-", dir=os.environ.get("BENCH_TMPDIR")) as tmp:
        tmp = Path(tmp)
        for label, preset, layers in cases:
            model, opt = _state(preset, layers)
            writers = _writers(model, opt, tmp)
            step_after = held_training_step(model, opt)
            res = {k: [] for k in writers}
            names = list(writers)
            for r in range(rounds + 1):  # round 0 warms up (allocations, snapshot buffers)
                k = r % len(names)
                for name in names[k:] + names[:k]:
                    after = step_after if name in ASYNC_WRITERS else None
                    got = _timed(writers[name], tmp / f"out-{name.replace(' ', '-')}", after)
                    if r > 0:
                        res[name].append(got)
            loads = _loads(model, opt, tmp)
            lres = {k: [] for k in loads}
            for r in range(rounds + 1):
                k = r % len(loads)
                for name in list(loads)[k:] + list(loads)[:k]:
                    gc.collect()
                    t0 = time.perf_counter()
                    loads[name]()
                    if r > 0:
                        lres[name].append(time.perf_counter() - t0)
            rows += _rows(label, res, lres)
            del writers, loads, model, opt
            gc.collect()
            for p in tmp.iterdir():
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    # The sharded row: 2 ranks writing format "dcp", against DCP itself (benchmarks/bench_save_sharded.py).
    from . import bench_save_sharded

    rows += bench_save_sharded.run(quick)
    return rows


def _rows(label, res, lres):
    def med(name, i):
        return median([x[i] for x in res[name]])

    def tp(name):
        return med(name, 2) / 1e6 / med(name, 1)

    def tps(name):
        return [x[2] / 1e6 / x[1] for x in res[name]]

    raw = tp("raw")
    rows = [Row(NAME, f"{label}: checkpoint size", med("store hash", 2) / 1e6, "MB",
                samples=[x[2] / 1e6 for x in res["store hash"]]),
            Row(NAME, f"{label}: raw write + fsync", raw, "MB/s", samples=tps("raw"))]
    for peer in ("torch.save", "safetensors", "dcp.save"):
        rows.append(Row(NAME, f"{label}: {peer} + fsync", tp(peer), "MB/s", ratio=tp(peer) / raw, vs="raw write",
                        samples=tps(peer)))
    sync = tp("store hash")
    rows.append(Row(NAME, f"{label}: sync throughput (default: tensors format, verify=hash)", sync, "MB/s",
                    ratio=sync / raw, vs="raw write", goal=f">= {SYNC_GOAL:.0%} of raw",
                    met=sync / raw >= SYNC_GOAL, samples=tps("store hash"),
                    note="digest of the bytes written; sizes, header and structure re-read before the commit"))
    rows.append(Row(NAME, f"{label}: sync throughput vs torch.save + fsync", sync, "MB/s",
                    ratio=sync / tp("torch.save"), vs="torch.save + fsync", goal=">= 1x torch.save",
                    met=sync >= tp("torch.save"), samples=tps("store hash")))
    for name, note in (("store device", "every file re-read from the device (page cache dropped) and digested"),
                       ("store none", "no re-read; the digest of the bytes written is still recorded"),
                       ("store torch format", "the torch format (torch.save), verify=hash: a full re-read")):
        rows.append(Row(NAME, f"{label}: sync throughput ({name[6:]})", tp(name), "MB/s", ratio=tp(name) / raw,
                        vs="raw write", samples=tps(name), note=note))
    sync_stall = med("store hash", 0)
    stall, dcp_stall = med("store async + step", 0), med("dcp.async_save + step", 0)
    ours = [x[0] for x in res["store async + step"]]
    rows.append(Row(NAME, f"{label}: dcp.async_save stall", dcp_stall, "s",
                    samples=[x[0] for x in res["dcp.async_save + step"]]))
    rows.append(Row(NAME, f"{label}: async save stall", stall, "s", ratio=stall / sync_stall, vs="sync save",
                    goal=f"<= {STALL_GOAL:.0%} of sync", met=stall / sync_stall <= STALL_GOAL, samples=ours,
                    note="until save returns + the next optimizer.step()'s wait for the writer's copy"))
    rows.append(Row(NAME, f"{label}: async save stall vs dcp.async_save", stall, "s", ratio=stall / dcp_stall,
                    vs="dcp.async_save stall", goal=f"<= {DCP_STALL_GOAL:.0%} of dcp.async_save",
                    met=stall / dcp_stall <= DCP_STALL_GOAL, samples=ours))
    rows.append(Row(NAME, f"{label}: async throughput", tp("store async"), "MB/s", ratio=tp("store async") / raw,
                    vs="raw write", samples=tps("store async"), note="save() until the background write is committed"))
    lm = {k: median(v) for k, v in lres.items()}
    rows.append(Row(NAME, f"{label}: torch.load(weights_only) + load_state_dict", lm["torch.load"], "s",
                    samples=lres["torch.load"]))
    rows.append(Row(NAME, f"{label}: torch.load(mmap=True) + load_state_dict", lm["torch.load mmap"], "s",
                    samples=lres["torch.load mmap"]))
    rows.append(Row(NAME, f"{label}: load_latest (digests checked)", lm["load_latest"], "s",
                    ratio=lm["load_latest"] / lm["torch.load"], vs="torch.load + load_state_dict",
                    goal=f"<= {LOAD_GOAL:g}x torch.load", met=lm["load_latest"] <= LOAD_GOAL * lm["torch.load"],
                    samples=lres["load_latest"]))
    rows.append(Row(NAME, f"{label}: load_latest(mmap=True) (digests checked)", lm["load_latest mmap"], "s",
                    ratio=lm["load_latest mmap"] / lm["torch.load mmap"], vs="torch.load(mmap=True) + load_state_dict",
                    samples=lres["load_latest mmap"]))
    return rows
