"""Time to resume: process start to the end of the first training step after a resume, for the reference loop.

``python -m saverules.minimind.train --resume`` (``load_latest``, every
digest checked) against the same command resumed by a bare
``torch.load(weights_only=True)`` of the model's, optimizer's, scheduler's
and loop's state dicts (the loop's ``restore`` parameter), from the same step.
Each run is a fresh process of this interpreter (benchmarks/resume_driver.py);
the clock stops when it prints that the first step is done, and the process
then ends.  The two run interleaved, their order rotating each round.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import Row, median

NAME = "load"  # reported with the load rows (python -m benchmarks --only load)
ROOT = Path(__file__).resolve().parent.parent
SAVED_STEP = 2
#: (label, loop arguments): the small preset at 5 layers is the ~200 MB case of the load benchmark.
CASE = ("~200 MB (small, 5 layers, weights + AdamW)",
        ["--preset", "small", "--num_hidden_layers", "5", "--batch_size", "2", "--max_seq_len", "64"])
QUICK_CASE = ("tiny", ["--preset", "tiny", "--batch_size", "2", "--max_seq_len", "32"])


def _train(out: Path, args: list[str], extra: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "saverules.minimind.train", "--out_dir", str(out), "--progress", "none",
           "--device", "cpu", *args, *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})}, start_new_session=True)


#: The resumed runs save nothing (a save after the first step would be timed with it, and move the resume point).
NO_SAVES = """\
version = 1
final = false
[[rules]]
kind = "every_steps"
every = 1000000000
[storage]
dir = "checkpoints"
name = "step-{step:08d}"
"""


def _until_first_step(out: Path, args: list[str], variant: dict[str, str], rules: Path) -> float:
    """Seconds from starting a resumed run to its "first step done" line; the run then ends."""
    t0 = time.perf_counter()
    bare = ["--bare", variant["bare"]] if "bare" in variant else []
    cmd = [sys.executable, "-m", "benchmarks.resume_driver", *bare, "--", "--out_dir", str(out), "--progress", "none",
           "--device", "cpu", *args, "--resume", "--max_steps", str(SAVED_STEP + 5), "--rules", str(rules)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(f"first step done at step {SAVED_STEP + 1}"):
                return time.perf_counter() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    raise RuntimeError("the resumed loop exited before its first step:\n" + "".join(lines[-20:]))


def _bare_file(store: Path, target: Path) -> None:
    """The state dicts the bare peer loads, written with torch.save from the checkpoint the loop resumes."""
    import torch

    from saverules.store import formats, scan

    info = max((i for i in scan(store) if i.verified), key=lambda i: i.step)
    payload = formats.read(info, "cpu")
    objects = payload.objects
    torch.save({k: objects[k] for k in ("model", "optimizer", "scheduler", "loop")}, target)


def run(quick: bool = False) -> list:
    label, args = QUICK_CASE if quick else CASE
    rounds = 1 if quick else 3
    with tempfile.TemporaryDirectory(prefix="saverules-bench-", dir=os.environ.get("BENCH_TMPDIR")) as tmp:
        out = Path(tmp) / "run"
        first = _train(out, args, ["--max_steps", str(SAVED_STEP)])  # the default rules: the final step is saved
        text, _ = first.communicate()
        if first.returncode != 0:
            raise RuntimeError(f"the loop that writes the checkpoint failed:\n{text[-2000:]}")
        store = next(p.parent for p in out.rglob("manifest.json")).parent
        bare = Path(tmp) / "bare.pt"
        _bare_file(store, bare)
        rules = Path(tmp) / "no-saves.toml"
        rules.write_text(NO_SAVES)
        variants = {"load_latest": {}, "torch.load": {"bare": str(bare)}}
        res: dict[str, list[float]] = {k: [] for k in variants}
        load_at_start = os.getloadavg()[0]
        for r in range(rounds + 1):  # round 0 warms the page cache and the imports
            names = list(variants)[r % 2:] + list(variants)[:r % 2]
            for name in names:
                got = _until_first_step(out, args, variants[name], rules)
                if r > 0:
                    res[name].append(got)
        note = f"load average {load_at_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end; {rounds} rounds"
    mine, peer = median(res["load_latest"]), median(res["torch.load"])
    return [
        Row(NAME, f"{label}: start to first step, resumed by a bare torch.load", peer, "s",
            samples=res["torch.load"], note=note),
        Row(NAME, f"{label}: start to first step, resumed by load_latest (digests checked)", mine, "s",
            ratio=mine / peer, vs="bare torch.load", samples=res["load_latest"]),
    ]
