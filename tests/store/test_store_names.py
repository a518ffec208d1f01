"""`check` accepts only names the store can write (issue 16, item 16).

The store writes a checkpoint as ``.tmp-<name>-<pid>-<8 hex>`` before it
renames it: a name is valid only if that temporary name fits in 255 bytes
at the largest pid.  A filesystem root is refused as a store's dir.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from store_common import REPO

import saverules
from saverules import Progress
from saverules.engine.policy import HIDDEN_NAME_BYTES
from saverules.store import layout
from saverules.torch import Checkpointer


def _policy_text(name: str, directory: str = "checkpoints") -> str:
    return (f'version = 1\nfinal = false\n[[rules]]\nkind = "every_steps"\nevery = 1\n'
            f'[storage]\ndir = "{directory}"\nname = "{name}"\n')


def check(tmp_path: Path, text: str) -> subprocess.CompletedProcess:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "saverules.check", str(path), "--total-steps", "10"],
                          capture_output=True, text=True, env=env, timeout=120)


def test_the_longest_name_check_accepts_is_one_the_store_writes(tmp_path):
    longest = "x" + "é" * 110 + "ab-{step:09d}"  # 1 + 220 + 2 + 1 + 9 = 233 bytes of UTF-8
    assert len(longest.replace("{step:09d}", "0" * 9).encode()) == 255 - HIDDEN_NAME_BYTES
    proc = check(tmp_path, _policy_text(longest))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    store = tmp_path / "store"
    ck = Checkpointer(saverules.loads(_policy_text(longest)), store)
    for s in (1, 2):
        ck.save(Progress(s, time=float(s)), {"model": torch.nn.Linear(2, 2)})
    ck.close()
    assert sorted(len(p.name.encode()) for p in store.iterdir() if p.name.startswith("x")) == [233, 233]


def test_a_245_byte_name_is_refused_by_check_with_its_line(tmp_path):
    proc = check(tmp_path, _policy_text("n" * 236 + "{step:09d}"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    out = proc.stdout + proc.stderr
    assert "policy.toml:8:" in out and "storage.name" in out and "renders to 245 bytes" in out, out
    assert "at most 233 bytes" in out and ".tmp-<name>-<pid>-<8 hex>" in out


def test_the_temporary_suffix_fits_the_engine_s_allowance_at_the_largest_pid():
    name = "step-00000001"
    here = layout.hidden_name(layout.TMP_PREFIX, name)
    pid = str(os.getpid())
    at_largest_pid = here.replace(f"-{pid}-", f"-{1 << 22}-")
    assert len(at_largest_pid.encode()) - len(name) == HIDDEN_NAME_BYTES
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    assert pid_max <= 1 << 22


def test_a_filesystem_root_is_refused_as_a_store(tmp_path):
    for root in ("/", "//"):
        proc = check(tmp_path, _policy_text("step-{step:08d}", root))
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        out = proc.stdout + proc.stderr
        assert "policy.toml:7:" in out and "filesystem root" in out and "storage.dir" in out, out
