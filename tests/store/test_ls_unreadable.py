"""``ls`` of a folder that holds something it cannot read: a clear note, never a traceback (issue 16, item 8).

The tests run as root here, which reads any folder: the ``ls`` child drops
the two capabilities that let root ignore permissions (CAP_DAC_OVERRIDE,
CAP_DAC_READ_SEARCH) before it starts, so a folder of mode 000 is as
unreadable to it as to any user.
"""
from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import torch
from store_common import REPO, policy

from saverules import Progress
from saverules.torch import Checkpointer

_PR_CAPBSET_DROP = 24
_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH = 1, 2


def _without_root_reading() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH):
        libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0)  # fails harmlessly when not root: then modes apply anyway


def ls(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "saverules.ls", *args], capture_output=True, text=True, env=env,
                          timeout=120, preexec_fn=_without_root_reading)


def a_store(directory: Path) -> None:
    ck = Checkpointer(policy(), directory)
    for s in (2, 4):
        ck.save(Progress(s, time=float(s)), {"model": torch.nn.Linear(2, 2)})
    ck.close()


def test_ls_run_dir_with_an_unreadable_subfolder_notes_it_and_lists_the_rest(tmp_path):
    run = tmp_path / "run"
    a_store(run / "checkpoints")
    locked = run / "locked"
    locked.mkdir()
    (locked / "inside").mkdir()
    locked.chmod(0)
    try:
        proc = ls(str(run))
    finally:
        locked.chmod(0o755)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "step-00000004" in proc.stdout
    assert f"{locked} (Permission denied)" in proc.stderr and "cannot be read" in proc.stderr


def test_ls_of_an_unreadable_store_is_a_clear_error(tmp_path):
    store = tmp_path / "store"
    a_store(store)
    store.chmod(0)
    try:
        proc = ls(str(store))
    finally:
        store.chmod(0o755)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 2 and f"cannot read {store}: Permission denied" in proc.stderr, proc.stderr


def test_ls_proc_1_gives_no_traceback():
    proc = ls("/proc/1")
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 0 and "0 checkpoints" in proc.stdout, proc.stdout + proc.stderr
