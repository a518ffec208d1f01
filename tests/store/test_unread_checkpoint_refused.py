"""A checkpoint whose manifest could not be read has no step: retention and resume refuse it by name."""
from __future__ import annotations

from pathlib import Path

import pytest

from saverules.store.manifest import CheckpointInfo, progress_of
from saverules.store.retain import retention_view


def _unread(tmp_path: Path) -> CheckpointInfo:
    return CheckpointInfo(path=tmp_path / "step-00000007", name="step-00000007",
                          error="manifest.json is not valid JSON")


def test_retention_names_the_checkpoint_it_cannot_judge(tmp_path: Path) -> None:
    bad = _unread(tmp_path)
    with pytest.raises(ValueError, match=r"step-00000007 has no valid manifest \(manifest.json is not valid JSON\)"):
        retention_view([bad])
    with pytest.raises(ValueError, match="step-00000007 has no valid manifest"):
        bad.as_checkpoint()


def test_resume_names_the_checkpoint_it_cannot_resume(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="step-00000007 has no valid manifest.*only a checkpoint that scan"):
        progress_of(_unread(tmp_path), 0.0)
