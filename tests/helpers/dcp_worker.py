"""A rank of a sharded-checkpoint test job (run under torchrun by tests/store/test_dcp.py).

    torchrun --nproc_per_node N tests/helpers/dcp_worker.py PLAN.json

``PLAN.json`` is a list of actions that every rank runs in order; each rank
writes what it saw to ``<out>/rank<R>.json`` (and rank 0 may write gathered
tensors to ``.pt`` files), for the test to check.  Actions:

``{"op": "train", "dir", "first", "last", "every", "async"?, "resume"?, "verify"?, "keep_last"?}``
    A tiny FSDP2 model (``fully_shard`` on each layer when there is more than
    one rank) and AdamW, trained on deterministic per-rank data plus noise
    from the global RNG; a Checkpointer with ``format = "dcp"`` saves every
    ``every`` steps.  With ``resume``, ``load_latest`` first and continue from
    the step it returns.  Records the steps saved, the step resumed from,
    the committed steps every rank sees after each save, and the warnings.
``{"op": "gather", "out": "name"}``
    Rank 0 writes the full (unsharded) model and optimizer state to
    ``<out>/<name>.pt``.
``{"op": "load", "dir"}``
    Build the model, ``load_latest`` and record the step (then ``gather`` it).
``{"op": "full_disk", "dir", "rank", "limits": [bytes, ...], "on_error"?}``
    Save step 1; then, for each limit, save once more while rank ``rank``
    may write files of at most that many bytes (RLIMIT_FSIZE: a real EFBIG
    from the kernel), recording the error (or, with ``on_error="warn"``, the
    warnings) each rank got; then save again without a limit, and record
    the steps in the store.

``{"op": "overlap", "dir", "saves", "mutate_rank"?}``
    A larger FSDP2 model (~50 MB with AdamW, so that the writer's copy of
    the parameters and moments takes a while) and an asynchronous
    Checkpointer.  Each round: train a step, gather the full state
    (``before-<step>.pt``), save, and go straight on: another training step
    (whose ``optimizer.step()`` must wait for the writer's copy), on rank
    ``mutate_rank`` after an in-place change of every bias outside the
    optimizer.  Then wait for the write, record its error (or None) and the
    committed steps, and load the newest checkpoint into a fresh model
    (``loaded-<step>.pt``).

The environment: SAVERULES_TEST_OUT (where to write), SAVERULES_COMMIT_TIMEOUT.
"""
from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

POLICY = """
version = 1
final = false
[[rules]]
kind = "every_steps"
every = {every}
[storage]
dir = "checkpoints"
format = "dcp"
"""


def build(world: int, seed: int = 0, width: int = 32):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, width), torch.nn.ReLU(), torch.nn.Linear(width, width),
                                torch.nn.ReLU(), torch.nn.Linear(width, 4))
    if world > 1:
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, opt


class Counter:
    """A per-rank object with state_dict(): stored in each rank's file."""

    def __init__(self, rank: int):
        self.value = {"rank": rank, "seen": 0}

    def state_dict(self):
        return dict(self.value)

    def load_state_dict(self, d):
        self.value = dict(d)


def train_step(model, opt, step: int, rank: int) -> None:
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(8, 16, generator=g) + torch.rand(8, 16)  # torch.rand: the global RNG, restored per rank
    loss = model(x).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def gathered(model, opt):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=full), get_optimizer_state_dict(model, opt, options=full)


def main(plan_path: str) -> int:
    from saverules import Progress, loads
    from saverules.torch import Checkpointer, restore_rng_state, rng_state

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    torch.set_num_threads(1)
    out = Path(os.environ["SAVERULES_TEST_OUT"])
    report = {"rank": rank, "world": world, "actions": []}
    model = opt = None
    plan = json.loads(Path(plan_path).read_text())
    for action in plan:
        op = action["op"]
        rec = {"op": op}
        report["actions"].append(rec)
        if op in ("train", "load"):
            model, opt = build(world)
            counter = Counter(rank)
            state = {"model": model, "optimizer": opt, "counter": counter, "rng": None, "note": f"rank {rank}"}
            text = POLICY.format(every=action.get("every", 4))
            if action.get("keep_last"):
                text += f"[retention]\nkeep_last = {action['keep_last']}\n"
            policy = loads(text)
            ck = Checkpointer(policy, dir=action["dir"], async_save=bool(action.get("async")),
                              verify=action.get("verify", "hash"))
            first = action.get("first", 1)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if action.get("resume") or op == "load":
                    got = ck.load_latest(state)
                    rec["resumed"] = got.step if got is not None else None
                    rec["counter"] = dict(counter.value)
                    rec["note"] = state["note"]
                    if got is not None:
                        restore_rng_state(state["rng"])
                        first = got.step + 1
                rec["saved"], rec["visible"] = [], []
                if op == "train":
                    for step in range(first, action["last"] + 1):
                        train_step(model, opt, step, rank)
                        counter.value["seen"] += 1
                        state["rng"] = rng_state()
                        decision = ck.step(Progress(step, total_steps=action["last"]), state)
                        if decision.save:
                            rec["saved"].append(step)
                            ck.wait()
                            rec["visible"].append([i.step for i in ck.list()])
                    ck.close()
            rec["warnings"] = [str(w.message) for w in caught]
        elif op == "full_disk":
            import resource
            import signal

            from saverules.torch import CheckpointWriteError

            model, opt = build(world)
            state = {"model": model, "optimizer": opt, "counter": Counter(rank)}
            ck = Checkpointer(loads(POLICY.format(every=10**6)), dir=action["dir"],
                              on_error=action.get("on_error", "raise"))
            step = 1
            ck.save(Progress(step), state)
            rec["errors"] = []
            soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
            for limit in action["limits"]:
                step += 1
                if rank == action["rank"]:
                    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a signal
                    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
                try:
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always")
                        ck.save(Progress(step), state)
                    rec["errors"].append(["warned: " + str(w.message) for w in caught] or None)
                except CheckpointWriteError as exc:
                    rec["errors"].append([str(exc), exc.errno])
                finally:
                    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            step += 1
            ck.save(Progress(step), state)
            rec["steps"] = [i.step for i in ck.list()]
            rec["hidden"] = sorted(p.name for p in Path(action["dir"]).iterdir() if p.name.startswith(".") and p.name not in (".saverules.lock", ".saverules"))
        elif op == "overlap":
            from saverules.torch import CheckpointError

            width = 2048
            model, opt = build(world, width=width)
            state = {"model": model, "optimizer": opt, "counter": Counter(rank)}
            ck = Checkpointer(loads(POLICY.format(every=10**6)), dir=action["dir"], async_save=True)
            rec["errors"], rec["committed"] = [], []
            for step in range(1, action["saves"] + 1):
                train_step(model, opt, step, rank)
                msd, osd = gathered(model, opt)
                if rank == 0:
                    torch.save({"model": msd, "optimizer": osd}, out / f"before-{step}.pt")
                ck.save(Progress(step), state)
                if rank == action.get("mutate_rank"):
                    with torch.no_grad():  # not the optimizer, while the writer copies ~25 MB
                        for p in model.parameters():
                            if p.ndim == 1:  # the biases: small, done long before the copy is
                                p.add_(1.0)
                train_step(model, opt, 100 + step, rank)  # every rank: FSDP's collectives must match
                try:
                    ck.wait()
                    rec["errors"].append(None)
                except CheckpointError as exc:
                    rec["errors"].append(str(exc))
                rec["committed"].append([i.step for i in ck.list()])
                fresh, fresh_opt = build(world, seed=7, width=width)
                reader = Checkpointer(loads(POLICY.format(every=10**6)), dir=action["dir"], read_only=True)
                got = reader.load_latest({"model": fresh, "optimizer": fresh_opt, "counter": Counter(rank)})
                msd, osd = gathered(fresh, fresh_opt)
                if rank == 0 and got is not None:
                    torch.save({"model": msd, "optimizer": osd}, out / f"loaded-{step}.pt")
            ck.close()
        elif op == "gather":
            msd, osd = gathered(model, opt)
            if rank == 0:
                torch.save({"model": msd, "optimizer": osd}, out / f"{action['out']}.pt")
        else:  # pragma: no cover - a mistake in a test's plan
            raise ValueError(f"unknown op {op!r}")
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
