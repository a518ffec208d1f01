"""DDP (format "pt", rank 0 writes) with a durable tier: a new node's resume is the same on every rank.

Rank 0 downloads the newest durable checkpoint into the (empty) local store
and a broadcast tells the other ranks, so that no rank reads the store before
the download is in place: both ranks resume the same step, from the durable
tier, with the same state.  Two real ranks (torchrun, gloo, CPU) and a
``file://`` durable tier, which every rank of one machine reaches.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHILD = ROOT / "tests" / "helpers" / "durable_ddp_child.py"

pytestmark = pytest.mark.slow


def launch(action: str, local: Path, url: str, out: Path) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(CHILD),
           action, str(local), url, str(out)]
    proc = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return [json.loads((out / f"{action}-rank{r}.json").read_text()) for r in range(2)]


def test_a_new_node_under_ddp_resumes_the_durable_checkpoint_on_every_rank(tmp_path):
    url = (tmp_path / "durable").as_uri()
    trained = launch("train", tmp_path / "node1", url, tmp_path)
    assert trained[0]["w"] == trained[1]["w"] == [10.0] * 4  # 1 + 2 + 3 + 4 on every rank
    resumed = launch("resume", tmp_path / "node2", url, tmp_path)
    for r in resumed:
        assert r["step"] == 4, r
        assert r["resumed_from"] == ["durable", "step-00000004"], r
        assert r["w"] == [10.0] * 4 and r["n"] == 4, r
    assert sorted(p.name for p in (tmp_path / "node2").iterdir() if p.name.startswith("step-")) == ["step-00000004"]
