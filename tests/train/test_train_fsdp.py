"""The reference loop with ``--fsdp``: FSDP2 over 2 gloo ranks, sharded checkpoints, resumed on 1 rank.

The resumed run keeps the global batch (2 ranks x 4 become 1 rank x 8), so
its loss must follow the same curve as a single process trained with
batches of 8 all along, saved and resumed at the same steps.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_train import env_for

REPO = Path(__file__).resolve().parents[2]

RULES = """
version = 1
[[rules]]
kind = "every_steps"
every = 3
[storage]
dir = "checkpoints"
"""

COMMON = ["--max_seq_len", "32", "--deterministic", "--progress", "log", "--log_interval", "3"]


def _run(cwd: Path, nproc, *args, timeout=240):
    if nproc is None:
        cmd = [sys.executable, "-m", "saverules.minimind.train"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "saverules.minimind.train"]
    proc = subprocess.run([*cmd, *COMMON, "--rules", str(cwd.parent / "rules.toml"), *args], cwd=cwd,
                          env=env_for({"OMP_NUM_THREADS": "1"}), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


def _losses(stdout: str) -> dict:
    return {int(m.group(1)): float(m.group(2)) for m in re.finditer(r"^step (\d+)/\d+ .* loss ([0-9.]+)", stdout, re.M)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("fsdp")
    (base / "rules.toml").write_text(RULES)
    sharded, plain = base / "sharded", base / "plain"
    sharded.mkdir()
    plain.mkdir()
    first = _run(sharded, 2, "--fsdp", "--batch_size", "4", "--max_steps", "6")
    second = _run(sharded, 1, "--fsdp", "--batch_size", "4", "--max_steps", "10", "--resume")
    ref1 = _run(plain, None, "--batch_size", "8", "--max_steps", "6")
    ref2 = _run(plain, None, "--batch_size", "8", "--max_steps", "10", "--resume")
    return sharded, first, second, ref1, ref2


def test_fsdp_run_saves_sharded_checkpoints_from_both_ranks(runs):
    sharded, first, _, _, _ = runs
    assert '--fsdp: saving with [storage].format = "dcp"' in first
    assert "x2" in first and "saved step 3" in first and "saved step 6: final" in first
    for step in (3, 6):
        m = json.loads((sharded / "out" / "checkpoints" / f"step-{step:08d}" / "manifest.json").read_text())
        assert m["storage_format"] == "dcp" and m["world_size"] == 2
        ranks = {e["rank"] for e in m["files"].values()}
        assert ranks == {0, 1}
        mesh = m["format_metadata"]["sharding"]["meshes"][0]
        assert mesh["shape"] == [2] and mesh["tensors"] > 0


def test_resume_on_another_number_of_ranks_continues_the_same_training(runs):
    sharded, first, second, ref1, ref2 = runs
    assert "trained on 2 rank(s) with 4 per rank; 1 rank(s) take 8 each (the same global batch of 8)" in second
    assert "resumed from step 6" in second and "saved step 9" in second and "saved step 10: final" in second
    m = json.loads((sharded / "out" / "checkpoints" / "step-00000010" / "manifest.json").read_text())
    assert m["world_size"] == 1
    # On 2 ranks the loop logs rank 0's own loss (half the batch), so compare the resumed steps: the
    # whole batch on one rank, after 6 steps of sharded training, a save on 2 ranks and a load on 1.
    assert sorted(_losses(first)) == sorted(_losses(ref1)) == [3, 6]
    got, want = _losses(second), _losses(ref2)
    assert sorted(got) == sorted(want) == [9, 10]
    for step in want:  # the same samples, weights and optimizer state; only the order of float sums differs
        assert got[step] == pytest.approx(want[step], rel=1e-4, abs=1e-4), (step, got, want)


def test_resume_refuses_a_number_of_ranks_that_cannot_split_the_global_batch():
    from saverules.minimind.train import UsageError, regrouped_batch

    assert regrouped_batch({"batch_size": 4, "world_size": 2}, 4) == 2
    with pytest.raises(UsageError, match="global batch of 8 .* which 3 ranks cannot split evenly"):
        regrouped_batch({"batch_size": 4, "world_size": 2}, 3)
