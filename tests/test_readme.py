"""The README's two set-up commands are the ones CI runs, and the documents it links exist."""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def bash_blocks(text: str):
    return [b.strip() for b in re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M)]


def test_ci_runs_the_readme_commands():
    readme = (REPO / "README.md").read_text()
    setup = readme.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    commands = bash_blocks(setup)
    assert len(commands) == 2, "the Set-up section holds exactly two commands"
    assert "python -m saverules.check rules/default.toml" in commands[0]
    assert "python -m pytest" in commands[1] and "torch==2.13.0" in commands[1]
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    for command in commands:
        assert command in ci, f".ci/run does not run the README command: {command}"


def test_linked_documents_exist():
    readme = (REPO / "README.md").read_text()
    for target in re.findall(r"\]\(([^)#]+)\)", readme):
        if "://" not in target:
            assert (REPO / target).exists(), f"README links to missing {target}"
