"""The store warns before a save fails for want of space (issue 16, item 15).

A real 40 MiB tmpfs holds a store of 14 MB checkpoints with keep_last = 2:
the third save needs 42 MB (it is written before retention prunes), so it
fails.  The store must say so after the second save, with the numbers, and
`check` must say that the policy needs 42 MB.
"""
from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from store_common import REPO

import saverules
from saverules import Progress
from saverules.torch import Checkpointer, CheckpointWarning

POLICY = """
version = 1
final = false
[run]
total_steps = 6
checkpoint_size = "14MB"
[[rules]]
kind = "every_steps"
every = 1
[retention]
keep_last = 2
[storage]
format = "tensors"
"""


@pytest.fixture
def disk_40m(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mnt)], capture_output=True,
                          text=True)
    assert proc.returncode == 0, f"this test mounts a 40 MiB tmpfs (it runs as root): {proc.stderr}"
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_check_says_keep_last_2_of_14mb_needs_42mb(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text(POLICY)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "saverules.check", str(path)], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "at most 42MB at once" in proc.stdout and "3 on disk while the next is written" in proc.stdout


def test_the_store_warns_with_the_numbers_before_the_save_that_cannot_fit(disk_40m: Path):
    store = disk_40m / "store"
    ck = Checkpointer(saverules.loads(POLICY), store, on_error="warn")
    state = {"w": torch.zeros(3_500_000)}  # 14 MB of float32
    heard: list[list[str]] = []
    for step in (1, 2, 3):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", CheckpointWarning)
            ck.save(Progress(step, time=float(step)), state)
        heard.append([str(w.message) for w in caught if issubclass(w.category, CheckpointWarning)])
    ck.close()
    assert heard[0] == []
    assert len(heard[1]) == 1, heard[1]
    early = heard[1][0]
    assert str(store) in early and "the next save needs about 13.4 MiB" in early and "free" in early
    assert "step 2's checkpoint" in early and "keep fewer" in early
    free_mib = float(early.split(" has ")[1].split(" MiB free")[0])
    assert free_mib < 13.4
    # the save it warned about does fail (a full disk, reported as on_error="warn" says), and it is not repeated
    assert any("No space left on device" in m or "ENOSPC" in m for m in heard[2]), heard[2]
    assert not any("the next save needs about" in m for m in heard[2])
    assert sorted(p.name for p in store.iterdir() if p.name.startswith("step-")) == [
        "step-00000001", "step-00000002"]
