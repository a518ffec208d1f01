"""Resuming the reference loop with a total the checkpoint already passed (issue 16, item 2).

``--max_steps 6`` after a step-10 checkpoint used to print "trained steps
11-10 in this run; saved nothing" and exit 0.
"""
from __future__ import annotations

from test_train import checkpoints, run_train, write_policy


def _manifests(out) -> dict:
    return {step: (d / "manifest.json").read_bytes() for step, d in checkpoints(out).items()}


def test_resume_with_a_smaller_total_says_so_and_exits_2_touching_nothing(tmp_path):
    rules = write_policy(tmp_path / "p.toml", every=5)
    assert run_train(tmp_path, "--rules", rules, "--max_steps", "10").returncode == 0
    before = _manifests(tmp_path / "out")
    assert sorted(before) == [5, 10]

    proc = run_train(tmp_path, "--rules", rules, "--max_steps", "6", "--resume")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert ("the checkpoint at step 10 is already past the 6 steps this run asks for (--max_steps 6); "
            "nothing was trained or saved") in proc.stderr
    assert "pass a --max_steps above 10" in proc.stderr
    assert "trained steps" not in proc.stdout
    assert _manifests(tmp_path / "out") == before


def test_resume_at_exactly_the_total_says_the_run_is_complete_and_exits_0(tmp_path):
    rules = write_policy(tmp_path / "p.toml", every=5)
    assert run_train(tmp_path, "--rules", rules, "--max_steps", "10").returncode == 0
    before = _manifests(tmp_path / "out")
    proc = run_train(tmp_path, "--rules", rules, "--max_steps", "10", "--resume")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "the checkpoint at step 10 already completes this run (10 steps, --max_steps 10); nothing to train" \
        in proc.stdout + proc.stderr
    assert "trained steps 11-10" not in proc.stdout
    assert _manifests(tmp_path / "out") == before
