"""The reference loop resumed under a changed policy: one warning, and a summary that names every removal."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FAST = ["--max_seq_len", "32", "--batch_size", "4", "--deterministic", "--progress", "log", "--log_interval", "50",
        "--epochs", "3"]

KEEP_3 = """
version = 1
final = true
[[rules]]
kind = "every_steps"
every = 10
[retention]
keep_last = 3
"""

# a new rule first, the old rule second, and a smaller retention
KEEP_1 = """
version = 1
final = true
[[rules]]
kind = "improved"
metric = "accuracy"
mode = "max"
[[rules]]
kind = "every_steps"
every = 10
[retention]
keep_last = 1
"""


def _run(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAVERULES_TEST_")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "saverules.minimind.train", *FAST, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_resume_under_a_smaller_retention_names_the_earlier_runs_checkpoints_it_removed(tmp_path):
    from saverules.minimind.data import default_corpus, write_jsonl

    write_jsonl(tmp_path / "d.jsonl", default_corpus(200, seed=3))
    (tmp_path / "p1.toml").write_text(KEEP_3)
    (tmp_path / "p2.toml").write_text(KEEP_1)
    first = _run(tmp_path, "--rules", "p1.toml", "--data_path", "d.jsonl", "--max_steps", "60")
    assert first.returncode == 0, first.stderr
    assert "checkpoints in out/checkpoints (3):" in first.stdout
    second = _run(tmp_path, "--rules", "p2.toml", "--data_path", "d.jsonl", "--max_steps", "80", "--resume")
    assert second.returncode == 0, second.stderr
    # one warning the user sees, naming what continued and what starts fresh
    warning = [line for line in second.stderr.splitlines() if "was written under a different policy" in line]
    assert len(warning) == 1, second.stderr
    assert 'fresh: improved(metric="accuracy", mode="max")' in warning[0]
    assert "kept: final" in warning[0]
    out = second.stdout
    assert "trained steps 61-80 in this run; saved 70, 80" in out
    assert "removed by retention: step 70\n" in out
    assert "removed by retention: steps 40, 50, 60 saved by an earlier run" in out
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoints").glob("step-*")) == ["step-00000080"]
