"""``ls`` and a read-only resume while another process saves and prunes (issue 16, item 7).

A writer process saves every step with keep_last = 2, so retention removes
a checkpoint at every save.  A checkpoint that disappears while ``ls`` or a
read-only ``load_latest`` reads it is gone, not damaged: it must never be
reported as FAILED or warned about as "skipping".
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
from store_common import REPO

import saverules
from saverules.torch import Checkpointer, CheckpointWarning

WRITER = r"""
import sys, torch, saverules
from saverules import Progress
from saverules.torch import Checkpointer
policy = saverules.loads('''
version = 1
final = false
[[rules]]
kind = "every_steps"
every = 1
[retention]
keep_last = 2
[storage]
format = "tensors"
''')
ck = Checkpointer(policy, sys.argv[1])
model = torch.nn.Linear(64, 64)
step = 0
while True:
    step += 1
    ck.save(Progress(step, time=float(step)), {"model": model, "step": step})
    if step == 3:
        print("ready", flush=True)
"""

# the writer's own policy: a reader under another one would be told, once per load, that the policy changed
READER_POLICY = """
version = 1
final = false
[[rules]]
kind = "every_steps"
every = 1
[retention]
keep_last = 2
[storage]
format = "tensors"
"""


def test_ls_and_a_read_only_resume_never_call_a_pruned_checkpoint_failed(tmp_path):
    store = tmp_path / "store"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(store)], stdout=subprocess.PIPE, text=True,
                              env=env, start_new_session=True)
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
        outcomes = []
        for _ in range(12):
            proc = subprocess.run([sys.executable, "-m", "saverules.ls", str(store)], capture_output=True,
                                  text=True, env=env, timeout=120)
            outcomes.append((proc.returncode, proc.stdout + proc.stderr))
        loads = 0
        with warnings.catch_warnings():
            warnings.simplefilter("error", CheckpointWarning)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                reader = Checkpointer(saverules.loads(READER_POLICY), store, read_only=True)
                state = {"model": torch.nn.Linear(64, 64), "step": None}
                info = reader.load_latest(state)
                assert info is not None and state["step"] == info.step
                loads += 1
        assert writer.poll() is None, "the writer died"
    finally:
        os.killpg(writer.pid, signal.SIGKILL)
        writer.wait()
        if writer.stdout is not None:
            writer.stdout.close()
    bad = [out for rc, out in outcomes if rc != 0 or "FAILED" in out]
    assert not bad, bad[0]
    assert loads > 20
    assert len([p for p in Path(store).iterdir() if p.name.startswith("step-")]) <= 3
