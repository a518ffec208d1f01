"""What a user meets first: `import saverules` stays free of torch, and docs/checkpoints.md runs."""
from __future__ import annotations

import os
import subprocess
import sys

from store_common import (
    REPO,
    checkpoint_dirs,
)

from saverules.store import fs as store_fs

# --------------------------------------------------------------------------
# Import boundaries
# --------------------------------------------------------------------------


def test_importing_saverules_does_not_import_torch():
    code = "import sys, saverules; saverules.loads('version = 1'); assert 'torch' not in sys.modules, 'torch'"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


# --------------------------------------------------------------------------
# docs/checkpoints.md
# --------------------------------------------------------------------------


def test_the_examples_in_docs_checkpoints_run(tmp_path, monkeypatch):
    """The page's ```python blocks run in order, in one namespace (later ones use earlier names)."""
    import re

    text = (REPO / "docs" / "checkpoints.md").read_text()
    blocks = re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)
    assert len(blocks) >= 3
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(store_fs.fs, "fsync", store_fs.fs.fsync)  # put back even if an example fails half-way
    namespace = {"__name__": "__doc_example__"}
    for i, code in enumerate(blocks):
        exec(compile(code, f"docs/checkpoints.md[python block {i + 1}]", "exec"), namespace)
    assert checkpoint_dirs(tmp_path / "checkpoints") == ["step-00000150", "step-00000200"]
    assert checkpoint_dirs(tmp_path / "warn-demo") == ["step-00000011"]
    assert checkpoint_dirs(tmp_path / "checkpoints-async") == ["step-00000002", "step-00000004"]
    assert store_fs.fs.fsync.__self__ is store_fs.fs  # the example put the real fsync back
