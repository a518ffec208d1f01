"""Kill one rank of a 2-rank sharded-save job at a random instant, many times (run by tests/store/test_dcp_faults.py).

    python tests/helpers/dcp_kill.py OUT_DIR TRIALS SEED

Each trial forks two ranks from this process (torch is imported once, so a
trial costs a fork, not an interpreter start).  They join a gloo process
group through a file rendezvous (what torchrun does for its workers, without
torchrun's agent, which would stop the surviving rank itself when one
dies), shard a small model with ``fully_shard``, and save a ``format = "dcp"``
checkpoint at every step; between saves every parameter and optimizer state
grows by exactly 1, locally (no collective), so the step a checkpoint holds
can be read off its tensors.  Each rank appends ``committed N`` to its log
once a save returned.

After a random delay the driver sends SIGKILL (or, in some trials, SIGSTOP:
a hung rank) to a random rank, waits for the survivor with a deadline, and
then inspects the store from a fresh single process: the newest checkpoint
must verify, load (resharded onto one process) and hold one consistent
step, no older than the last save any rank reported committed.  The result
of every trial is written to ``OUT_DIR/result.json``.
"""
from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
import traceback
from pathlib import Path

import torch
from store_common import policy_toml

torch.set_num_threads(1)

TIMEOUT = 5.0        # the commit timeout of the ranks (seconds)
DEADLINE = 30.0      # how long the survivor may take to exit after the kill

POLICY = policy_toml(1, final=False, dir="checkpoints", fmt="dcp")


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 64))


def _rank_main(rank: int, store: Path, rdv: Path, log: Path, async_save: bool) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from saverules import Progress, loads
    from saverules.torch import Checkpointer

    dist.init_process_group("gloo", init_method=f"file://{rdv}", rank=rank, world_size=2)
    model = _model()
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=0.0, weight_decay=0.0)
    model(torch.zeros(2, 64)).sum().backward()  # one real step creates the optimizer state
    opt.step()
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        for p in model.parameters():
            opt.state[p]["exp_avg"].zero_()
            opt.state[p]["exp_avg_sq"].zero_()
    ck = Checkpointer(loads(POLICY), dir=str(store), async_save=async_save, commit_timeout=TIMEOUT)
    state = {"model": model, "optimizer": opt, "step": 0}
    with open(log, "a", buffering=1) as f:
        f.write("ready\n")
        for step in range(1, 100000):
            with torch.no_grad():
                for p in model.parameters():  # "training": every element grows by 1 per step, on this rank alone
                    p.to_local().add_(1.0)
                    opt.state[p]["exp_avg"].to_local().add_(1.0)
            state["step"] = step
            ck.step(Progress(step), state)
            if async_save:
                ck.wait()
            f.write(f"committed {step}\n")
            os.fsync(f.fileno())


def _child(rank: int, store: Path, rdv: Path, log: Path, err: Path, async_save: bool) -> None:
    """A forked rank: run, record the error that ended it, and leave without returning into the driver."""
    code = 0
    try:
        _rank_main(rank, store, rdv, log, async_save)
    except BaseException as exc:  # what the surviving rank says is what the test checks
        err.write_text(f"{type(exc).__name__}: {exc}\n\n{traceback.format_exc()}")
        code = 3
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _committed(log: Path) -> list:
    try:
        lines = log.read_text().splitlines()
    except FileNotFoundError:
        return []
    return [int(x.split()[1]) for x in lines if x.startswith("committed ")]


def _ready(log: Path) -> bool:
    try:
        return log.read_text().startswith("ready")
    except FileNotFoundError:
        return False


def _wait(pid: int, deadline: float):
    """(exit status or None when still running at the deadline, seconds waited)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status, time.monotonic() - t0
        time.sleep(0.01)
    return None, time.monotonic() - t0


def _inspect(store: Path) -> dict:
    """The store as a fresh single process sees it."""
    import warnings

    from saverules import loads
    from saverules.torch import Checkpointer, scan

    out: dict = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ck = Checkpointer(loads(POLICY), dir=str(store))     # cleans up what the dead writer left
        out["hidden_after_open"] = sorted(p.name for p in store.iterdir() if p.name.startswith(".") and p.name not in (".saverules.lock", ".saverules"))  # the lock file and removal log stay
        infos = scan(store, verify=True)
        out["listed"] = [[i.name, i.step, bool(i.ok), i.error] for i in infos]
        model = _model()
        opt = torch.optim.AdamW(model.parameters(), lr=0.0, weight_decay=0.0)
        state = {"model": model, "optimizer": opt, "step": 0}
        init = {k: v.clone() for k, v in _model().state_dict().items()}
        got = ck.load_latest(state)
        out["loaded"] = got.step if got is not None else None
        if got is not None:
            s = got.step
            out["state_step"] = state["step"]
            expected = {k: v.clone() for k, v in init.items()}
            for _ in range(s):  # the same float additions the ranks made, element by element
                for v in expected.values():
                    v.add_(1.0)
            out["weights_match"] = all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
            exp_avg = [opt.state[p]["exp_avg"] for p in model.parameters()]
            out["exp_avg_match"] = all(torch.equal(t, torch.full_like(t, float(s))) for t in exp_avg)
            out["world_size"] = ck.latest().manifest.get("world_size")
    out["warnings"] = [str(w.message) for w in caught]
    return out


def trial(base: Path, i: int, rng: random.Random) -> dict:
    d = base / f"trial{i:03d}"
    d.mkdir(parents=True)
    store = d / "store"
    rdv = d / "rendezvous"
    async_save = i % 3 == 2
    stop = i % 6 == 5                     # a hung rank rather than a dead one
    victim = rng.randrange(2)
    delay = rng.uniform(0.0, 1.2)
    pids = []
    for rank in range(2):
        pid = os.fork()
        if pid == 0:
            try:
                _child(rank, store, rdv, d / f"rank{rank}.log", d / f"rank{rank}.err", async_save)
            finally:
                os._exit(70)  # never return into the driver
        pids.append(pid)
    res = {"trial": i, "victim": victim, "signal": "SIGSTOP" if stop else "SIGKILL", "async": async_save,
           "delay": round(delay, 3)}
    t0 = time.monotonic()
    while not all(_ready(d / f"rank{r}.log") for r in range(2)):
        if time.monotonic() - t0 > 120:
            res["error"] = "the ranks did not start"
            break
        time.sleep(0.01)
    time.sleep(delay)
    res["committed_before"] = max(_committed(d / "rank0.log") + _committed(d / "rank1.log"), default=0)
    os.kill(pids[victim], signal.SIGSTOP if stop else signal.SIGKILL)
    survivor = 1 - victim
    status, waited = _wait(pids[survivor], DEADLINE)
    res["survivor_waited"] = round(waited, 2)
    if status is None:
        res["survivor_hung"] = True
        os.kill(pids[survivor], signal.SIGKILL)
        os.waitpid(pids[survivor], 0)
    else:
        res["survivor_exit"] = os.waitstatus_to_exitcode(status)
    if stop:
        os.kill(pids[victim], signal.SIGKILL)
    os.waitpid(pids[victim], 0)
    err = d / f"rank{survivor}.err"
    res["survivor_error"] = err.read_text().split("\n\n")[0] if err.exists() else None
    res["committed_after"] = max(_committed(d / "rank0.log") + _committed(d / "rank1.log"), default=0)
    res.update(_inspect(store))
    return res


def main(argv) -> int:
    out, trials, seed = Path(argv[0]), int(argv[1]), int(argv[2])
    rng = random.Random(seed)
    results = []
    for i in range(trials):
        results.append(trial(out, i, rng))
        (out / "result.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
