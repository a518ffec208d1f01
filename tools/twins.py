"""Count the same-named functions of two parts of the package (issue 17's "one set of parts").

    python tools/twins.py [FOLDER_A FOLDER_B]    # default: integrations store

Module-level functions only (methods share names such as ``state_dict`` by design); each
pair is printed with the modules that define it, then the count.  Exit status 0.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "saverules"


def functions(folder: str) -> dict[str, list[str]]:
    """Module-level function name -> the modules under ``saverules/folder`` that define it."""
    out: dict[str, list[str]] = {}
    for path in sorted((PACKAGE / folder).rglob("*.py")):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out.setdefault(node.name, []).append(path.relative_to(PACKAGE).as_posix())
    return out


def main(argv: list[str]) -> int:
    first, second = (argv + ["integrations", "store"][len(argv):])[:2]
    a, b = functions(first), functions(second)
    twins = sorted(set(a) & set(b))
    for name in twins:
        print(f"{name}: {', '.join(a[name])} <-> {', '.join(b[name])}")
    print(f"{len(twins)} same-named function pair{'s' if len(twins) != 1 else ''} between {first}/ and {second}/")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
