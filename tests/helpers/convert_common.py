"""Running `python -m saverules.convert` in-process for the converter's tests."""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import saverules
from saverules import check, convert


def run_convert(tmp_path: Path, *argv: str) -> tuple[int, str, str, str]:
    """(exit status, policy text or "", report on stdout, stderr) of one conversion to a file."""
    out = tmp_path / f"policy-{len(list(tmp_path.glob('policy-*.toml')))}.toml"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = convert.main([*argv, "-o", str(out)])
    return rc, out.read_text() if out.exists() else "", stdout.getvalue(), stderr.getvalue()


def strict_check(path: Path) -> tuple[int, str]:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stdout):
        rc = check.main(["--strict", str(path)])
    return rc, stdout.getvalue()


def converted(tmp_path: Path, *argv: str) -> saverules.Policy:
    """The converted policy, after asserting the conversion succeeded and `check --strict` passes."""
    rc, text, report, err = run_convert(tmp_path, *argv)
    assert rc == 0, err
    path = tmp_path / "checked.toml"
    path.write_text(text)
    rc, said = strict_check(path)
    assert rc == 0, said + "\n" + text
    return saverules.loads(text)
