"""Ranks that load different policy files are stopped at once, on every rank, with both digests named."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import saverules

REPO = Path(__file__).resolve().parents[2]
CHILD = REPO / "tests" / "helpers" / "policy_mismatch_child.py"

EVERY = 'version = 1\n[[rules]]\nkind = "every_steps"\nevery = {n}\n'
SIGNAL = '[[rules]]\nkind = "on_signal"\n'


def _torchrun(tmp_path: Path, mode: str, first: str, second: str) -> subprocess.CompletedProcess:
    a, b = tmp_path / "rank0.toml", tmp_path / "rank1.toml"
    a.write_text(first)
    b.write_text(second)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(CHILD), mode,
           str(tmp_path / "store"), str(a), str(b)]
    # the timeout is the hang check
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)


@pytest.mark.parametrize("mode, first, second", [
    ("synced", EVERY.format(n=10), EVERY.format(n=7)),
    ("synced", EVERY.format(n=10) + SIGNAL, EVERY.format(n=10)),
    ("store", EVERY.format(n=10) + SIGNAL, EVERY.format(n=10)),
    ("dcp", EVERY.format(n=10) + '[storage]\nformat = "dcp"\n', EVERY.format(n=7) + '[storage]\nformat = "dcp"\n'),
])
def test_ranks_with_different_policies_fail_on_every_rank_naming_both(tmp_path, mode, first, second):
    proc = _torchrun(tmp_path, mode, first, second)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    d0, d1 = saverules.loads(first).digest[:12], saverules.loads(second).digest[:12]
    for rank in (0, 1):
        said = (tmp_path / f"store.rank{rank}").read_text()
        assert said.startswith("refused: saverules: the ranks of this job loaded different policies"), out
        assert f"rank 0: {tmp_path / 'rank0.toml'} (digest {d0})" in said
        assert f"rank 1: {tmp_path / 'rank1.toml'} (digest {d1})" in said


def test_ranks_with_identical_copies_of_a_policy_agree(tmp_path):
    proc = _torchrun(tmp_path, "store", EVERY.format(n=10), EVERY.format(n=10))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [(tmp_path / f"store.rank{r}").read_text() for r in (0, 1)] == ["agreed", "agreed"]
