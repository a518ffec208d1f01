"""The folders are the architecture: the engine is pure, and nothing below imports upwards."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "saverules"


def _imports(path: Path) -> list[str]:
    """Every module ``path`` imports, as absolute dotted names (relative imports resolved)."""
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append(mod)
            out += [f"{mod}.{a.name}" for a in node.names]
    return out


def test_the_engine_imports_nothing_outside_itself_and_no_torch():
    for path in sorted((PKG / "engine").glob("*.py")):
        for mod in _imports(path):
            top = mod.split(".")[0]
            assert top != "torch", f"{path.name} imports {mod}"
            if top == "saverules":
                assert mod.startswith("saverules.engine"), f"{path.name} imports {mod}: the engine must not import upwards"


def test_the_store_and_the_integrations_never_import_the_commands():
    commands = {"saverules.check", "saverules.ls", "saverules.export", "saverules.schema"}
    for sub in ("store", "integrations", "engine"):
        for path in sorted((PKG / sub).rglob("*.py")):
            hit = commands.intersection(_imports(path))
            assert not hit, f"{path.relative_to(REPO)} imports the command {hit}"


def test_importing_the_core_and_the_engine_imports_no_torch():
    code = (
        "import sys, importlib, pkgutil, saverules, saverules.engine\n"
        "for m in pkgutil.iter_modules(saverules.engine.__path__):\n"
        "    importlib.import_module('saverules.engine.' + m.name)\n"
        "import saverules.integrations, saverules.check, saverules.schema\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'lightning')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_the_import_paths_the_readme_shows_still_work():
    code = (
        "from saverules.torch import Checkpointer\n"
        "from saverules.transformers import SaverulesCallback, last_good_checkpoint\n"
        "from saverules.lightning import SaverulesCheckpoint\n"
        "from saverules.distributed import SyncedDecider\n"
        "import saverules.check, saverules.ls, saverules.export, saverules.schema, saverules.minimind.train\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_only_the_plot_module_imports_matplotlib_and_only_when_asked():
    for path in sorted(PKG.rglob("*.py")):
        if path.name == "plot.py" and path.parent == PKG:
            continue
        hit = [mod for mod in _imports(path) if mod.split(".")[0] == "matplotlib"]
        assert not hit, f"{path.relative_to(REPO)} imports {hit}: only saverules/plot.py may (saverules[plot])"
    code = (
        "import sys, importlib, pkgutil, saverules, saverules.engine\n"
        "for m in pkgutil.iter_modules(saverules.engine.__path__):\n"
        "    importlib.import_module('saverules.engine.' + m.name)\n"
        "import saverules.check, saverules.schema, saverules.plot\n"
        "saverules.check.main(['rules/default.toml'])\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'matplotlib'), file=sys.stderr)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip() == "[]", out.stderr


def test_test_modules_have_unique_names():
    """pytest imports test modules by their file name, so two folders must never hold the same one."""
    names = [p.name for p in (REPO / "tests").rglob("test_*.py")]
    assert sorted(names) == sorted(set(names)), sorted({n for n in names if names.count(n) > 1})
