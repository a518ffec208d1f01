"""The writer's index of its store: retention stays right when another process removes or damages a checkpoint."""
from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from store_common import EVERY_1_KEEP_2, checkpoint_dirs, policy

from saverules import Progress
from saverules.torch import Checkpointer, CheckpointWarning

REMOVE = "import shutil, sys; shutil.rmtree(sys.argv[1])"
DAMAGE = """
import sys
path = sys.argv[1]
with open(path, "r+b") as f:
    f.seek(-1, 2)
    last = f.read(1)
    f.seek(-1, 2)
    f.write(bytes([last[0] ^ 0xFF]))
"""


def _other_process(code: str, path: Path) -> None:
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, timeout=60)


def _saved(ck: Checkpointer, steps) -> None:
    for step in steps:
        ck.step(Progress(step), {"w": torch.full((8,), float(step))})


@pytest.mark.parametrize("verify", ["hash", "none"])
def test_a_checkpoint_another_process_removed_is_not_counted(tmp_path: Path, verify: str) -> None:
    with Checkpointer(policy(EVERY_1_KEEP_2), dir=tmp_path, verify=verify) as ck:
        _saved(ck, [1, 2, 3])  # the index is built; the store holds 2 and 3
        assert checkpoint_dirs(tmp_path) == ["step-00000002", "step-00000003"]
        _other_process(REMOVE, tmp_path / "step-00000003")
        _saved(ck, [4])  # a plan from a stale index would delete step 2 and leave step 4 alone
        assert checkpoint_dirs(tmp_path) == ["step-00000002", "step-00000004"]
        _saved(ck, [5])
        assert checkpoint_dirs(tmp_path) == ["step-00000004", "step-00000005"]
        _other_process(REMOVE, tmp_path / "step-00000004")  # the one retention is about to delete
        _saved(ck, [6])
        assert checkpoint_dirs(tmp_path) == ["step-00000005", "step-00000006"]


def test_a_checkpoint_another_process_damaged_is_never_counted_for_a_good_one(tmp_path: Path) -> None:
    with Checkpointer(policy(EVERY_1_KEEP_2), dir=tmp_path) as ck:
        _saved(ck, [1, 2, 3])
        files = sorted(p for p in (tmp_path / "step-00000003").iterdir() if p.name != "manifest.json")
        _other_process(DAMAGE, max(files, key=lambda p: p.stat().st_size))  # same size, one byte flipped
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _saved(ck, [4])
        # Step 3 no longer counts: step 2 stays beside step 4, and the damaged one is left for inspection.
        assert checkpoint_dirs(tmp_path) == ["step-00000002", "step-00000003", "step-00000004"]
        assert any(isinstance(w.message, CheckpointWarning) and "step-00000003" in str(w.message)
                   and "failed verification" in str(w.message) for w in caught)
        _saved(ck, [5])
        assert checkpoint_dirs(tmp_path) == ["step-00000003", "step-00000004", "step-00000005"]
        assert [i.step for i in ck.list() if i.ok] == [4, 5]


def test_without_a_retention_table_nothing_is_deleted_and_the_store_is_read_once(tmp_path: Path) -> None:
    with Checkpointer(policy(EVERY_1_KEEP_2.split("[retention]")[0]), dir=tmp_path) as ck:
        _saved(ck, range(1, 6))
        assert len(checkpoint_dirs(tmp_path)) == 5
        assert [i.step for i in ck._retainer.index.good()] == [1, 2, 3, 4, 5]
