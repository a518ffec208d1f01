"""Every ```python example in the engine's documentation runs as written."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = ["docs/rules.md", "docs/check.md", "docs/integrations.md", "docs/tiers.md"]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def examples():
    for page in PAGES:
        text = (REPO / page).read_text()
        for _i, match in enumerate(BLOCK.finditer(text)):
            line = text[: match.start()].count("\n") + 2
            yield pytest.param(page, line, match.group(1), id=f"{page}:{line}")


@pytest.mark.parametrize("page, line, code", list(examples()))
def test_example_runs(page, line, code, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    compiled = compile(code, f"{page}:{line}", "exec")
    exec(compiled, {"__name__": "__doc_example__", "tmp_path": tmp_path})


def test_every_rule_kind_has_a_section():
    from saverules.engine.rules import RULE_KINDS

    text = (REPO / "docs/rules.md").read_text()
    for kind in RULE_KINDS:
        assert re.search(rf"^## .*\b{kind}\b", text, re.M), f"docs/rules.md has no section for {kind}"
