"""The reference loop's --resume never starts over silently; extended runs keep one final."""
from __future__ import annotations

import json

from test_train import checkpoints, run_train, write_policy

EVERY_3_KEEP_1 = """
version = 1
[[rules]]
kind = "every_steps"
every = 3
[retention]
keep_last = 1
"""


def test_resume_with_only_damaged_checkpoints_exits_non_zero_and_says_why(tmp_path):
    rules = write_policy(tmp_path / "p.toml", every=1)
    assert run_train(tmp_path, "--rules", rules, "--max_steps", "3").returncode == 0
    found = checkpoints(tmp_path / "out")
    assert sorted(found) == [1, 2, 3]
    for d in found.values():  # the reproduction: every state.pt cut short
        with open(d / "state.pt", "r+b") as f:
            f.truncate(100)
    proc = run_train(tmp_path, "--rules", rules, "--max_steps", "3", "--resume")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert "holds 3 checkpoints and none of them can be resumed" in proc.stderr
    for name in ("step-00000001", "step-00000002", "step-00000003"):
        assert f"{name}: state.pt has 100 bytes" in proc.stderr
    assert "training" not in proc.stdout and "every trained step is covered" not in proc.stdout
    # Without --resume the run refuses too: the folder is not empty, though nothing in it is usable.
    again = run_train(tmp_path, "--rules", rules, "--max_steps", "3")
    assert again.returncode == 2 and "already holds checkpoints" in again.stderr
    assert sorted(checkpoints(tmp_path / "out")) == [1, 2, 3]  # nothing new was written


def test_an_extended_run_keeps_only_its_own_final_and_reports_epochs_consistently(tmp_path):
    rules = write_policy(tmp_path / "p.toml", text=EVERY_3_KEEP_1)
    first = run_train(tmp_path, "--rules", rules, "--max_steps", "6")
    assert first.returncode == 0, first.stderr
    assert sorted(checkpoints(tmp_path / "out")) == [6]
    second = run_train(tmp_path, "--rules", rules, "--max_steps", "9", "--resume")
    assert second.returncode == 0, second.stderr
    resumed = next(line for line in second.stdout.splitlines() if line.startswith("resumed"))
    log = next(line for line in second.stdout.splitlines() if line.startswith("step 9/9"))
    assert resumed.startswith("resumed from step 6 (epoch 1/1)"), resumed
    assert " epoch 1/1 " in log, log
    assert sorted(checkpoints(tmp_path / "out")) == [9]  # the first run's final was not pinned forever
    manifest = json.loads((checkpoints(tmp_path / "out")[9] / "manifest.json").read_text())
    assert manifest["final"] is True
