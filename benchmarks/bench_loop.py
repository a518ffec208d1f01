"""Loop overhead: what the engine costs a real training loop, alone and under DDP.

*Single process.*  The reference loop's optimizer step (minimind "tiny"
preset on CPU: forward, backward, gradient clipping, AdamW, LR schedule), run
in interleaved blocks (one torch thread) with and without the engine deciding after each step
(``Checkpointer.step(Progress(...), state)`` with rules/default.toml, a run
long enough that no save fires).  The block medians give the steps/s ratio;
timing the engine call inside the loop gives the same overhead with far less
noise.

*DDP.*  Two gloo ranks (torch.multiprocessing) drive
:class:`saverules.distributed.SyncedDecider` for 10,000 steps per case and
count its collectives (``SyncedDecider.collectives``) per 1000 steps, for a
step-only policy, the default policy (steps + on_signal) and a time+signal
policy (rules/preemptible.toml).  The training clock is injected
(``Progress.time = step * step_seconds``), so the counts follow the step time
the case names, not the speed of this machine.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from . import Row, median

NAME = "loop"
ROOT = Path(__file__).resolve().parent.parent
GOAL = 0.01
TOTAL = 10**6  # the run's length as the loop reports it: 5% of it is far beyond the measured steps

STEP_ONLY = """\
version = 1
[[rules]]
kind = "every_steps"
every = "5%"
[[rules]]
kind = "epoch_end"
[[rules]]
kind = "tail"
interval = "5%"
"""


# -- single process -------------------------------------------------------------


def _setup(batch_size: int = 16):
    import torch

    from saverules.minimind.model import MiniMindLM, config_for

    torch.manual_seed(0)
    cfg = config_for("tiny")
    model = MiniMindLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.1, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(8):
        ids = torch.randint(0, cfg.vocab_size, (batch_size, cfg.max_seq_len), generator=gen)
        batches.append((ids, ids.clone()))
    model.train()
    return model, opt, sched, batches


def _block(model, opt, sched, batches, start: int, n: int, ckpt=None, state=None):
    """Run n optimizer steps from step ``start``; (seconds, seconds inside the engine)."""
    import torch

    from saverules import Progress

    perf = time.perf_counter
    engine = 0.0
    step = start
    t0 = perf()
    for i in range(n):
        input_ids, labels = batches[i % len(batches)]
        _, loss = model(input_ids, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        step += 1
        if ckpt is not None:
            e0 = perf()
            decision = ckpt.step(Progress(step, TOTAL, 0, False, step >= TOTAL, ckpt.clock(), None, False), state)
            engine += perf() - e0
            if decision.save:
                raise AssertionError(f"the benchmark's run saved at step {step}; it must only decide")
    return perf() - t0, engine


def _single(quick: bool) -> list:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared 2-core machine, 2 intra-op threads make step times erratic
    try:
        return _single_run(quick)
    finally:
        torch.set_num_threads(threads)


def _single_run(quick: bool) -> list:
    import saverules
    from saverules.torch import Checkpointer

    block, rounds = (2, 1) if quick else (40, 12)
    model, opt, sched, batches = _setup()
    policy = saverules.load(ROOT / "rules" / "default.toml")
    with tempfile.TemporaryDirectory(prefix="saverules-bench-loop-") as tmp:
        ckpt = Checkpointer(policy, tmp)
        state = {"model": model, "optimizer": opt, "scheduler": sched}
        rates = {"without": [], "with": []}
        engine_per_step = []
        step_time = []
        step = 0
        _block(model, opt, sched, batches, step, block)  # warm-up
        for r in range(rounds):
            order = ["without", "with"] if r % 2 == 0 else ["with", "without"]
            for name in order:
                secs, engine = _block(model, opt, sched, batches, step, block,
                                      ckpt if name == "with" else None, state)
                step += block
                rates[name].append(block / secs)
                if name == "with":
                    engine_per_step.append(engine / block)
                    step_time.append(secs / block)
        ckpt.close()
        saved = ckpt.list()
    if list(saved):
        raise AssertionError("the loop benchmark wrote a checkpoint; it must only decide")
    without, with_ = median(rates["without"]), median(rates["with"])
    ab = without / with_ - 1.0
    direct = median(engine_per_step) / median(step_time)
    return [
        Row(NAME, "tiny preset, CPU: steps/s without the engine", without, "steps/s", samples=rates["without"],
            note="batch 16 x 128 tokens, one torch thread"),
        Row(NAME, "tiny preset, CPU: steps/s with the engine deciding", with_, "steps/s",
            ratio=with_ / without, vs="without", samples=rates["with"]),
        Row(NAME, "engine time per step (Checkpointer.step + Progress)", median(engine_per_step) * 1e6, "us",
            samples=[x * 1e6 for x in engine_per_step]),
        Row(NAME, "engine overhead, timed inside the loop", direct * 100, "% of step", goal=f"< {GOAL:.0%}",
            met=direct < GOAL, note="engine time per step / step time, same blocks"),
        Row(NAME, "engine overhead, from the steps/s medians", ab * 100, "% of step",
            note=f"{rounds} interleaved blocks of {block} steps per variant; block-to-block noise is "
                 f"larger than the overhead, so this figure can come out negative"),
    ]


# -- DDP -------------------------------------------------------------------------


def _cases(quick: bool):
    preempt = (ROOT / "rules" / "preemptible.toml").read_text()
    default = (ROOT / "rules" / "default.toml").read_text()
    times = [0.1] if quick else [0.01, 0.1, 1.0]
    cases = []
    for name, text in (("step-only", STEP_ONLY), ("default.toml (steps + signal)", default),
                       ("preemptible.toml (time + signal)", preempt)):
        for sec in (times if name != "step-only" else times[:1]):
            cases.append((name, text, sec))
    return cases


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str, steps: int, cases, collective_reps: int):
    import torch
    import torch.distributed as dist

    import saverules
    from saverules import Progress
    from saverules.distributed import _LEN, SyncedDecider

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = []
        for name, text, sec in cases:
            policy = saverules.loads(text, source=name)
            d = SyncedDecider(policy.compile(TOTAL))
            saves, first = [], None
            for step in range(1, steps + 1):
                if d(Progress(step, TOTAL, 0, False, None, step * sec, None, False)).save:
                    saves.append(step)
                if step == 1000:
                    first = d.collectives
            results.append({"case": name, "step_seconds": sec, "steps": steps, "collectives": d.collectives,
                            "syncs": d.syncs, "first_1000": first, "saves": saves})
        # the price of one sync: an all_reduce of SyncedDecider's vector
        t = torch.zeros(_LEN, dtype=torch.float64)
        dist.barrier()
        lat = []
        for _ in range(collective_reps):
            t0 = time.perf_counter()
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            lat.append(time.perf_counter() - t0)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"results": results, "allreduce_s": lat}, f)
    finally:
        dist.destroy_process_group()


def _ddp(quick: bool) -> list:
    import torch.multiprocessing as mp

    steps = 2000 if quick else 10_000
    cases = _cases(quick)
    with tempfile.TemporaryDirectory(prefix="saverules-bench-ddp-") as tmp:
        init = os.path.join(tmp, "init")
        mp.spawn(_ddp_worker, args=(2, init, tmp, steps, cases, 20 if quick else 500), nprocs=2, join=True)
        ranks = []
        for r in range(2):
            with open(os.path.join(tmp, f"rank{r}.json")) as f:
                ranks.append(json.load(f))
    lat = median(ranks[0]["allreduce_s"] + ranks[1]["allreduce_s"])
    rows = [Row(NAME, "DDP, 2 gloo ranks: one all_reduce of the sync vector", lat * 1e6, "us",
                note="the cost of one sync on this machine")]
    for r0, r1 in zip(ranks[0]["results"], ranks[1]["results"]):
        agree = r0["saves"] == r1["saves"] and r0["collectives"] == r1["collectives"]
        step_only = r0["case"] == "step-only"
        sec = r0["step_seconds"]
        # Steady state: steps 1001..N, after the ramp-up (the first sync measures the step
        # rate, and the interval at most doubles from one sync to the next).
        steady = (r0["collectives"] - r0["first_1000"]) * 1000 / (r0["steps"] - 1000)
        bound = 0 if step_only else 1000 * min(sec, 1.0) / 1.0  # one per sync_seconds (1 s) of training, at most one per step
        rows.append(Row(
            NAME, f"DDP collectives per 1000 steps: {r0['case']}, {sec:g} s/step", steady, "",
            goal="0" if step_only else f"<= {bound:g} (one per s of training)",
            met=agree and steady <= bound * 1.001,
            note=(f"steady state, steps 1001-{r0['steps']}; {r0['first_1000']} in the first 1000 steps (ramp-up); "
                  f"ranks {'agree' if agree else 'DISAGREE'} on every save ({len(r0['saves'])} saves); "
                  f"~{steady * lat * 1e3 / 1000:.3f} ms of collectives per step at the all_reduce cost above"),
        ))
    return rows


def run(quick: bool = False) -> list:
    return _single(quick) + _ddp(quick)
