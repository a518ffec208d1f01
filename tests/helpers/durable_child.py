"""A process that drives a real two-tier Checkpointer, for the durable tier's fault tests (test fixture).

    python durable_child.py run URL LOCAL [--size N] [--durable-every N] [--steps N] [--step-sleep S] [--wait]
    python durable_child.py hold URL LOCAL

``run`` makes ``Checkpointer(POLICY, dir=LOCAL, durable=URL)``, resumes with
``load_latest`` and prints ``resumed TIER NAME STEP DIGEST`` (or ``fresh``),
then ``ready``; with ``--wait`` it waits for a line on stdin before training.
It then trains ``--steps`` steps (default: without end) after the resumed one:
the state at step s is :func:`weights` (s), saved through ``ckpt.step`` (the
local tier every step, the durable tier every ``--durable-every`` steps), and
prints ``saved STEP TIERS`` after each save.  ``hold`` takes both tiers'
locks, prints ``held`` and sleeps.  A refused lock prints the error on stderr
and exits 3.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import time

import torch

import saverules
from saverules import Progress
from saverules.store.errors import StoreLockedError
from saverules.torch import Checkpointer

POLICY = """
version = 1
final = false
[[rules]]
kind = "every_steps"
every = 1
[retention]
keep_last = 2
[durable]
[[durable.rules]]
kind = "every_steps"
every = {every}
[durable.retention]
keep_last = 3
"""


def weights(step: int, size: int) -> torch.Tensor:
    """The state's tensor at ``step``: a function of the step alone, so a resumed one can be checked bit for bit."""
    return torch.randn(size, generator=torch.Generator().manual_seed(1000 + step))


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["run", "hold"])
    p.add_argument("url")
    p.add_argument("local")
    p.add_argument("--size", type=int, default=1_000_000)
    p.add_argument("--durable-every", type=int, default=3)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--step-sleep", type=float, default=0.02)
    p.add_argument("--wait", action="store_true")
    args = p.parse_args()
    policy = saverules.loads(POLICY.format(every=args.durable_every))
    try:
        ckpt = Checkpointer(policy, dir=args.local, durable=args.url, on_error="warn")
    except StoreLockedError as exc:
        print(exc, file=sys.stderr, flush=True)
        return 3
    if args.mode == "hold":
        print("held", flush=True)
        time.sleep(600)
        return 0
    state = {"w": torch.zeros(args.size), "n": 0}
    resumed = ckpt.load_latest(state)
    if resumed is None:
        print("fresh", flush=True)
        start = 0
    else:
        start = int(state["n"])
        tier, name = ckpt.resumed_from or ("?", "?")
        print(f"resumed {tier} {name} {start} {digest(state['w'])}", flush=True)
    print("ready", flush=True)
    if args.wait:
        sys.stdin.readline()
    step = start
    while args.steps is None or step < start + args.steps:
        step += 1
        state["w"] = weights(step, args.size)
        state["n"] = step
        decision = ckpt.step(Progress(step), state)
        if decision.save:
            print(f"saved {step} {','.join(decision.tiers)}", flush=True)
        time.sleep(args.step_sleep)
    ckpt.close()
    print("closed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
