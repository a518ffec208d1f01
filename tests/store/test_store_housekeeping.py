"""Start-up housekeeping: what dead writers left behind is cleaned up, live ones are left alone."""
from __future__ import annotations

import os
import subprocess
import sys

import torch
from store_common import (
    checkpoint_dirs,
    hidden_entries,
    policy,
    small_state,
)

from saverules import Progress
from saverules.torch import (
    Checkpointer,
)

# --------------------------------------------------------------------------
# Start-up housekeeping
# --------------------------------------------------------------------------


def test_leftovers_of_dead_writers_are_cleaned_up(tmp_path):
    ck = Checkpointer(policy(), tmp_path)
    ck.save(Progress(2), small_state(2.0))
    ck.save(Progress(4), small_state(4.0))
    dead = _dead_pid()
    (tmp_path / f".tmp-step-00000006-{dead}-abcd1234").mkdir()
    (tmp_path / f".tmp-step-00000006-{dead}-abcd1234" / "state.pt").write_bytes(b"partial")
    (tmp_path / f".del-step-00000001-{dead}-00000000").mkdir()
    # A replacement interrupted after moving the old copy aside: it must come back.
    os.rename(tmp_path / "step-00000004", tmp_path / f".old-step-00000004-{dead}-11112222")
    # A replacement interrupted after the new copy went in: the old copy is dropped.
    (tmp_path / f".old-step-00000002-{dead}-33334444").mkdir()
    Checkpointer(policy(), tmp_path)
    assert hidden_entries(tmp_path) == []
    assert checkpoint_dirs(tmp_path) == ["step-00000002", "step-00000004"]
    state = small_state(0.0)
    assert Checkpointer(policy(), tmp_path).load_latest(state).step == 4
    assert torch.equal(state["model"].weight, torch.full((2, 3), 4.0))


def test_leftovers_of_live_processes_are_left_alone(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        name = f".tmp-step-00000006-{proc.pid}-abcd1234"
        (tmp_path / name).mkdir()
        Checkpointer(policy(), tmp_path)
        assert hidden_entries(tmp_path) == [name]
    finally:
        proc.kill()
        proc.wait()
    Checkpointer(policy(), tmp_path)
    assert hidden_entries(tmp_path) == []


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid
