"""Helper for tests/store/test_store_faults.py: a training loop that saves until it is SIGKILLed.

Two ways to run it:

``python store_fault_child.py work DIR SEED MODE LOG``
    Resume from DIR (if it holds a checkpoint), then save on every step
    forever.  After each save is known to be committed, append
    ``committed <step>`` to LOG with a single unbuffered write.

``python store_fault_child.py serve``
    A fork server: it imports torch once, then for every line
    ``run DIR SEED MODE LOG`` read from stdin it forks a worker (as above),
    answers ``pid <n>``, waits for the worker to end and answers
    ``exit <n> <signal or -code>``.  Forking skips the second or so a fresh
    interpreter needs to import torch, so many kill trials fit in CI.

MODE is ``<sync|async>-<torch|safetensors>``.  The state is a pure function
of the step (weights filled with the step number), so whoever reads a
checkpoint can tell whether its files belong together.
"""
from __future__ import annotations

import os
import random
import sys
import time
import traceback

import torch
from store_common import policy_toml

import saverules
from saverules import Progress
from saverules.torch import Checkpointer

POLICY = policy_toml(1, final=False, keep_last=3)


def make_policy(fmt: str) -> saverules.Policy:
    return saverules.loads(POLICY + f'\n[storage]\nformat = "{fmt}"\n')


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(16, 8)
        self.head = torch.nn.Linear(8, 16, bias=False)
        self.head.weight = self.emb.weight  # tied, like a language model


def make_state():
    return {"model": Net(), "blob": torch.zeros(2048), "step_value": 0, "meta": {"steps": []}}


def fill(state, step: int) -> None:
    with torch.no_grad():
        for p in state["model"].parameters():
            p.fill_(float(step))
    state["blob"].fill_(float(step))
    state["step_value"] = step
    state["meta"] = {"steps": [step, step * 2]}


def check(state, step: int) -> None:
    """Raise if the restored state is not exactly the state saved at ``step``."""
    for p in state["model"].parameters():
        assert torch.all(p == float(step)), f"model weights do not belong to step {step}"
    assert torch.all(state["blob"] == float(step)), f"blob does not belong to step {step}"
    assert state["step_value"] == step, f"step_value {state['step_value']} != {step}"
    assert state["meta"] == {"steps": [step, step * 2]}, f"meta does not belong to step {step}"


def parse_mode(mode: str):
    sync, fmt = mode.split("-")
    assert sync in ("sync", "async") and fmt in ("tensors", "torch", "safetensors"), mode
    return sync == "async", fmt


def work(directory: str, seed: int, mode: str, log_path: str) -> None:
    torch.set_num_threads(1)
    rng = random.Random(seed)
    async_save, fmt = parse_mode(mode)
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def committed(step: int) -> None:
        os.write(log, f"committed {step}\n".encode())

    ckpt = Checkpointer(make_policy(fmt), directory, async_save=async_save, verify="hash")
    state = make_state()
    resumed = ckpt.load_latest(state)
    start = 1
    if resumed is not None:
        check(state, resumed.step)
        os.write(log, f"resumed {resumed.step}\n".encode())
        start = resumed.step + 1
        if rng.random() < 0.5:
            # Save the same step again: this replaces a checkpoint of the same name.
            ckpt.save(Progress(resumed.step, time=ckpt.clock()), state, reason="again")
            ckpt.wait()
            committed(resumed.step)
    previous = None
    for step in range(start, start + 100000):
        fill(state, step)
        decision = ckpt.step(Progress(step, time=ckpt.clock()), state)
        assert decision.save
        if async_save:
            # This save waited for the previous one: that one is committed now.
            if previous is not None:
                committed(previous)
            previous = step
        else:
            committed(step)
        if rng.random() < 0.3:
            time.sleep(rng.random() * 0.004)


def serve() -> None:
    for line in sys.stdin:
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "quit":
            return
        assert parts[0] == "run" and len(parts) == 5, line
        _, directory, seed, mode, log_path = parts
        pid = os.fork()
        if pid == 0:  # the worker
            code = 0
            try:
                err = os.open(log_path + ".err", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                os.dup2(err, 1)
                os.dup2(err, 2)
                sys.stdin.close()
                work(directory, int(seed), mode, log_path)
            except BaseException:
                traceback.print_exc()
                sys.stderr.flush()
                code = 3
            os._exit(code)
        print(f"pid {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            result = os.WTERMSIG(status)
        else:
            result = -os.WEXITSTATUS(status)
        print(f"exit {pid} {result}", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve()
    elif sys.argv[1] == "work":
        work(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5])
    else:
        raise SystemExit(f"usage: {sys.argv[0]} serve | work DIR SEED MODE LOG")
