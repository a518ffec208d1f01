"""``python -m saverules.export`` writes files like any other new file, and never into a checkpoint (issue 16).

Both outputs get mode 0644 less the umask (the .safetensors file used to be
0600), and an output inside a committed checkpoint's directory is refused.
"""
from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from store_common import REPO, policy

from saverules import Progress
from saverules.torch import Checkpointer, inspect_checkpoint


def a_store(directory: Path) -> Path:
    ck = Checkpointer(policy(fmt="tensors"), directory)
    ck.save(Progress(2, time=2.0), {"model": torch.nn.Linear(3, 2)})
    ck.close()
    return directory / "step-00000002"


def export(*args: str, umask: int = 0o022) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "saverules.export", *args], capture_output=True, text=True,
                          env=env, timeout=120, preexec_fn=lambda: os.umask(umask))


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_both_outputs_get_0644_less_the_umask(tmp_path, umask):
    a_store(tmp_path / "store")
    for name in ("model.safetensors", "model.pt"):
        out = tmp_path / name
        proc = export(str(tmp_path / "store"), str(out), umask=umask)
        assert proc.returncode == 0, proc.stderr
        assert stat.S_IMODE(out.stat().st_mode) == 0o644 & ~umask, (name, oct(out.stat().st_mode))


def test_an_output_inside_a_committed_checkpoint_is_refused(tmp_path):
    d = a_store(tmp_path / "store")
    before = sorted(p.name for p in d.iterdir())
    for name in ("model.safetensors", "model.pt"):
        proc = export(str(tmp_path / "store"), str(d / name))
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert f"would be written into the checkpoint directory {d}" in proc.stderr
        assert "write the export elsewhere" in proc.stderr
    assert sorted(p.name for p in d.iterdir()) == before
    assert inspect_checkpoint(d, tmp_path / "store").ok
