"""Without matplotlib, ``check --plot`` exits 2 and says what to install; ``check`` itself still works.

The environment really lacks matplotlib: a venv without the system's site packages,
into which pip installs the project (from a copy of its sources) and its one
dependency, pydantic.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
#: The venv's own site packages only: no PYTHONPATH leading back to a checkout with matplotlib beside it.
ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONUSERBASE")}


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("nompl")
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "saverules", src / "saverules", ignore=shutil.ignore_patterns("__pycache__"))
    env = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True, timeout=300)
    python = env / "bin" / "python"
    proc = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(src)],
                          capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return python


@pytest.mark.slow
def test_plot_without_matplotlib_exits_2_and_says_what_to_install(bare_python, tmp_path):
    probe = subprocess.run([str(bare_python), "-c", "import matplotlib"], capture_output=True, text=True,
                           cwd=tmp_path, timeout=120, env=ENV)
    assert probe.returncode == 1 and "No module named 'matplotlib'" in probe.stderr
    where = subprocess.run([str(bare_python), "-c", "import saverules; print(saverules.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path, timeout=120, env=ENV)
    assert where.returncode == 0 and str(tmp_path) not in where.stdout and str(REPO) not in where.stdout

    policy = str(REPO / "rules" / "default.toml")
    out = tmp_path / "schedule.png"
    proc = subprocess.run([str(bare_python), "-m", "saverules.check", policy, "--plot", str(out)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120, env=ENV)
    assert proc.returncode == 2, proc.stderr
    assert "--plot needs matplotlib, which is not installed: pip install 'saverules[plot]'" in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists() and proc.stdout == ""

    plain = subprocess.run([str(bare_python), "-m", "saverules.check", policy], capture_output=True, text=True,
                           cwd=tmp_path, timeout=120, env=ENV)
    assert plain.returncode == 0 and "30" in plain.stdout and "max gap  2,000 steps" in plain.stdout
