"""Mutation testing of the engine modules: does the test suite notice small faults?

Each *mutant* is the engine with one small change: a comparison flipped
(``<`` / ``<=``, ``==`` / ``!=``, ``is`` / ``is not``, ``in`` / ``not in``), an
arithmetic operator swapped, ``and`` / ``or`` swapped, a ``not`` dropped, an
integer constant moved by one, ``True`` / ``False`` swapped, ``min`` / ``max``
swapped.  Strings and docstrings are left alone.

First the unmutated tests run once under ``coverage``, with one context per
test (tools/mutation_coverage.py), subprocesses included: that maps each line
of the engine to the tests that run it, with each test's time.  Each mutant then
runs, in a copy of the repository, only the tests that run its line, fastest
first, stopping at the first failure.  A test that never runs a line cannot
notice a change to it, so this kills exactly what the whole list would; a line
run outside any test (imports, module-level code) gets every test.  A mutant is
*killed* when a test fails, *timeout* (counted as killed) when it runs past its
limit, 60 s plus 3x its covering tests' measured time, and *survived* when they
pass (or when no test runs its line at all: ``uncovered``).

    python tools/mutation.py --list                    # how many mutants, per module
    python tools/mutation.py --sample 150 --seed 1     # a uniform sample of them
    python tools/mutation.py --only ID [--only ID]     # chosen mutants (IDs as printed)
    python tools/mutation.py --sample 150 --seed 1 --json mutation.json --jobs 2
    python tools/mutation.py --survivors-of mutation.json --tests tests/engine/test_new.py   # after adding tests

IDs look like ``compile.py:254:17:Gt>GtE``: module, line and column of the changed node, and the change.  A
second mutant with the same node start and change (``a - b - 1`` holds two subtractions that start at ``a``) gets
``#2``, a third ``#3``.  The same ``--sample`` and
``--seed`` select the same mutants as long as the modules are unchanged.  A
mutant is run in a temporary copy of the repository, so the working tree is
never modified.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import queue
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENGINE = ROOT / "saverules" / "engine"
# Every module of the engine package is mutated: the list follows the folder, so a new module is never missed.
MODULES = sorted(p.stem for p in ENGINE.glob("*.py") if p.stem != "__init__")
# The engine's own tests (the folder, so a new test file is never missed) and the docs' examples. Each mutant
# runs only those of their tests that run its line (see the module's docstring).
TESTS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests" / "engine").glob("test_*.py")) + [
    "tests/test_docs.py"]
HYPOTHESIS_SEED = "20261201"  # every run sees the same generated examples

COMPARE_SWAPS = {
    ast.Lt: (ast.LtE, "<="), ast.LtE: (ast.Lt, "<"), ast.Gt: (ast.GtE, ">="), ast.GtE: (ast.Gt, ">"),
    ast.Eq: (ast.NotEq, "!="), ast.NotEq: (ast.Eq, "=="), ast.Is: (ast.IsNot, "is not"),
    ast.IsNot: (ast.Is, "is"), ast.In: (ast.NotIn, "not in"), ast.NotIn: (ast.In, "in"),
}
COMPARE_TEXT = {
    ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!=", ast.Is: "is",
    ast.IsNot: "is not", ast.In: "in", ast.NotIn: "not in",
}
BINOP_SWAPS = {
    ast.Add: ("+", "-"), ast.Sub: ("-", "+"), ast.Mult: ("*", "//"), ast.FloorDiv: ("//", "*"),
    ast.Div: ("/", "*"), ast.Mod: ("%", "//"), ast.Pow: ("**", "*"),
}
BOOL_SWAPS = {ast.And: ("and", "or"), ast.Or: ("or", "and")}


@dataclass
class Mutant:
    module: str
    line: int
    col: int
    op: str
    start: int  # byte offsets in the module's source
    end: int
    new: str
    # the lines whose coverage says which tests can notice the mutant: the changed node's own lines and the first
    # line of the statement that holds it
    lines: list = field(default_factory=list)
    # 0 for the first mutant with its line, column and operator; 1, 2, ... for the next ones, which differ only in
    # where the operator is (``a - b - 1``: both subtractions are nodes that start at ``a``)
    repeat: int = 0

    @property
    def id(self) -> str:
        return f"{self.module}.py:{self.line}:{self.col}:{self.op}" + (f"#{self.repeat + 1}" if self.repeat else "")


def _offsets(source: bytes):
    starts = [0]
    for i, b in enumerate(source):
        if b == 0x0A:
            starts.append(i + 1)
    return lambda line, col: starts[line - 1] + col


def _find(source: bytes, text: str, lo: int, hi: int) -> int:
    """The offset of the operator ``text`` in source[lo:hi] (a gap between two operands)."""
    gap = source[lo:hi].decode()
    words = text.split()
    for i in range(len(gap)):
        rest = gap[i:]
        if rest.startswith(words[0]) and (len(words) == 1 or rest[len(words[0]):].lstrip().startswith(words[1])):
            before = gap[i - 1] if i else " "
            after = rest[len(text)] if len(rest) > len(text) else " "
            if text.isalpha() or " " in text:
                if before.isalnum() or before == "_" or after.isalnum() or after == "_":
                    continue
            elif text in ("<", ">") and after == "=":
                continue
            elif text in ("*", "/") and (after == text or before == text):
                continue
            return lo + len(gap[:i].encode())
    raise ValueError(f"operator {text!r} not found in {gap!r}")


def _skipped_lines(source: bytes) -> set:
    return {i for i, line in enumerate(source.decode().splitlines(), 1) if "pragma: no mutate" in line}


def mutants_of(module: str) -> list:
    source = _source(module)
    tree = ast.parse(source)
    at = _offsets(source)
    skip = _skipped_lines(source)
    inside_strings = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):  # f-strings: their parts are formatting, not logic
            inside_strings.update(id(n) for n in ast.walk(node))
    statement_of = {}
    for stmt in ast.walk(tree):  # breadth first: an inner statement is met after the one that holds it
        if isinstance(stmt, ast.stmt):
            for child in ast.walk(stmt):
                statement_of[id(child)] = stmt.lineno
    out = []

    def add(node, op, start, end, new):
        if node.lineno not in skip:
            lines = sorted({statement_of.get(id(node), node.lineno), *range(node.lineno, node.end_lineno + 1)})
            out.append(Mutant(module, node.lineno, node.col_offset, op, start, end, new, lines))

    for node in ast.walk(tree):
        if id(node) in inside_strings:
            continue
        if isinstance(node, ast.Compare):
            left = node.left
            for op, right in zip(node.ops, node.comparators):
                swap = COMPARE_SWAPS.get(type(op))
                if swap:
                    text = COMPARE_TEXT[type(op)]
                    lo, hi = at(left.end_lineno, left.end_col_offset), at(right.lineno, right.col_offset)
                    pos = _find(source, text, lo, hi)
                    add(node, f"{type(op).__name__}>{swap[0].__name__}", pos, pos + len(text.encode()), swap[1])
                left = right
        elif isinstance(node, ast.BinOp) and type(node.op) in BINOP_SWAPS:
            text, new = BINOP_SWAPS[type(node.op)]
            lo, hi = at(node.left.end_lineno, node.left.end_col_offset), at(node.right.lineno, node.right.col_offset)
            pos = _find(source, text, lo, hi)
            add(node, f"{type(node.op).__name__}>{new}", pos, pos + len(text), new)
        elif isinstance(node, ast.AugAssign) and type(node.op) in BINOP_SWAPS:
            text, new = BINOP_SWAPS[type(node.op)]
            lo, hi = at(node.target.end_lineno, node.target.end_col_offset), at(node.value.lineno, node.value.col_offset)
            pos = _find(source, text + "=", lo, hi)
            add(node, f"Aug{type(node.op).__name__}>{new}", pos, pos + len(text), new)
        elif isinstance(node, ast.BoolOp):
            text, new = BOOL_SWAPS[type(node.op)]
            for left, right in zip(node.values, node.values[1:]):
                lo, hi = at(left.end_lineno, left.end_col_offset), at(right.lineno, right.col_offset)
                pos = _find(source, text, lo, hi)
                add(node, f"{text}>{new}", pos, pos + len(text), new)
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            start = at(node.lineno, node.col_offset)
            add(node, "drop-not", start, start + 3, "")
        elif isinstance(node, ast.Constant) and type(node.value) in (int, bool):
            start, end = at(node.lineno, node.col_offset), at(node.end_lineno, node.end_col_offset)
            if type(node.value) is bool:
                add(node, f"{node.value}>{not node.value}", start, end, str(not node.value))
            else:
                add(node, f"{node.value}>{node.value + 1}", start, end, str(node.value + 1))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("min", "max"):
            f = node.func
            start = at(f.lineno, f.col_offset)
            new = "max" if f.id == "min" else "min"
            add(node, f"{f.id}>{new}", start, start + 3, new)
    # Docstrings and other strings are never mutated; constants in annotations are rare enough to keep.
    out.sort(key=lambda m: (m.module, m.start, m.op))
    seen: dict = {}
    for m in out:  # every ID names one mutant, so --only and --survivors-of run the one that was listed
        base = m.id
        m.repeat = seen.get(base, 0)
        seen[base] = m.repeat + 1
    return out


def all_mutants() -> list:
    return [m for module in MODULES for m in mutants_of(module)]


#: The modules as they were when the mutants were listed: a run never reads the
#: working tree again, so editing it while mutants run changes nothing.
PRISTINE: dict = {}


def _source(module: str) -> bytes:
    if module not in PRISTINE:
        PRISTINE[module] = (ENGINE / f"{module}.py").read_bytes()
    return PRISTINE[module]


def apply(m: Mutant, root: Path) -> None:
    source = _source(m.module)
    (root / "saverules" / "engine" / f"{m.module}.py").write_bytes(source[: m.start] + m.new.encode() + source[m.end:])


def restore(m: Mutant, root: Path) -> None:
    (root / "saverules" / "engine" / f"{m.module}.py").write_bytes(_source(m.module))


def describe(m: Mutant) -> str:
    source = _source(m.module)
    line_start = source.rfind(b"\n", 0, m.start) + 1
    line_end = source.find(b"\n", m.end)
    before = source[line_start:line_end].decode().strip()
    after = (source[line_start: m.start] + m.new.encode() + source[m.end: line_end]).decode().strip()
    return f"{before}  ->  {after}"


def _env(root: Path, **extra: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(root), HYPOTHESIS_PROFILE="default", PYTHONDONTWRITEBYTECODE="1")
    env.update(extra)
    return env


def _pytest(tests: list) -> list:
    return [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
            f"--hypothesis-seed={HYPOTHESIS_SEED}", *tests]


def run_tests(root: Path, timeout: float, tests: list) -> tuple:
    shutil.rmtree(root / ".hypothesis", ignore_errors=True)  # no example database carried between mutants
    t0 = time.monotonic()
    try:
        proc = subprocess.run(_pytest(tests), cwd=root, env=_env(root), capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.monotonic() - t0, ""
    tail = (proc.stdout + proc.stderr).strip().splitlines()
    return ("survived" if proc.returncode == 0 else "killed"), time.monotonic() - t0, tail[-1] if tail else ""


@dataclass
class CoverageMap:
    """Which tests run each line of each engine module, and how long each test took unmutated."""

    seconds: dict  # node ID -> seconds
    lines: dict  # module -> {line: set of node IDs; "" is code run outside any test}

    def tests_for(self, m: Mutant) -> list | None:
        """The node IDs to run against ``m``, fastest first; every test if a line runs outside any test; None if no
        test runs its lines."""
        by_line = self.lines.get(m.module, {})
        ids: set = set()
        for line in m.lines:
            ids |= by_line.get(line, set())
        if not ids:
            return None
        if "" in ids:
            ids = set(self.seconds)
        return sorted(ids & set(self.seconds), key=lambda i: (self.seconds[i], i)) or None

    def limit(self, tests: list) -> float:
        return 60.0 + 3 * sum(self.seconds[t] for t in tests)


def coverage_map(root: Path, tests: list, work: Path) -> CoverageMap:
    """Run ``tests`` unmutated in ``root`` once under coverage, one context per test, subprocesses included."""
    import coverage

    site = work / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import mutation_coverage\nmutation_coverage.start()\n")
    data, times = work / "coverage.data", work / "times.json"
    engine = root / "saverules" / "engine"
    env = _env(root, SAVERULES_MUTATION_COVERAGE_DATA=str(data), SAVERULES_MUTATION_COVERAGE_SOURCE=str(engine),
               SAVERULES_MUTATION_TIMES=str(times), SAVERULES_MUTATION_CONTEXT="")
    env["PYTHONPATH"] = os.pathsep.join([str(root), str(root / "tools"), str(site)])
    shutil.rmtree(root / ".hypothesis", ignore_errors=True)
    proc = subprocess.run([*_pytest(tests), "-p", "mutation_coverage"], cwd=root, env=env, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()
        raise SystemExit(f"mutation: the unmutated tests fail ({tail[-1] if tail else proc.returncode}); fix them "
                         "first")
    seconds = {k: v["seconds"] for k, v in json.loads(times.read_text()).items() if "seconds" in v}
    cov = coverage.Coverage(data_file=str(data), config_file=False)
    cov.combine(data_paths=[str(work)], strict=True)
    measured = cov.get_data()
    lines: dict = {}
    for path in measured.measured_files():
        module = Path(path).stem
        if Path(path).parent != engine or module not in MODULES:
            continue
        lines[module] = {n: set(c) for n, c in measured.contexts_by_lineno(path).items()}
    return CoverageMap(seconds=seconds, lines=lines)


def summary(results: list) -> str:
    """One row per module: mutants, killed, timed out, survived, score."""
    rows = ["| module | mutants | killed | timed out | survived | score |", "|---|---|---|---|---|---|"]
    for module in sorted({r["module"] for r in results}) + [None]:
        mine = [r for r in results if module is None or r["module"] == module]
        killed = sum(r["status"] == "killed" for r in mine)
        timeout = sum(r["status"] == "timeout" for r in mine)
        survived = sum(r["status"] == "survived" for r in mine)
        score = 100 * (killed + timeout) / max(1, len(mine))
        name = "all" if module is None else f"{module}.py"
        rows.append(f"| {name} | {len(mine)} | {killed} | {timeout} | {survived} | {score:.1f}% |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--list", action="store_true", help="count the mutants per module and exit")
    ap.add_argument("--sample", type=int, help="run a uniform random sample of this many mutants")
    ap.add_argument("--seed", type=int, default=1, help="the sample's seed (default 1)")
    ap.add_argument("--only", action="append", default=[], help="run the mutant with this ID (repeatable)")
    ap.add_argument("--json", type=Path, help="write every result to this file")
    ap.add_argument("--timeout", type=float, default=None,
                    help="seconds per mutant (default: 60 plus 3x the measured time of the tests that run its line)")
    ap.add_argument("--tests", nargs="+", metavar="FILE",
                    help="run these test files instead of the engine's (for example only the tests added since a "
                         "run, against its survivors)")
    ap.add_argument("--survivors-of", type=Path, metavar="JSON",
                    help="run the mutants that survived in this earlier --json result")
    ap.add_argument("--jobs", type=int, default=1, help="mutants run at a time, each in its own copy (default 1)")
    args = ap.parse_args(argv)

    mutants = all_mutants()
    if args.list:
        for module in MODULES:
            print(f"{module + '.py':16s} {sum(m.module == module for m in mutants):5d}")
        print(f"{'total':16s} {len(mutants):5d}")
        return 0
    gone = []
    if args.survivors_of:
        earlier = json.loads(args.survivors_of.read_text())["results"]
        by_id = {m.id: m for m in mutants}
        for r in earlier:
            if r["status"] != "survived":
                continue
            if r["id"] in by_id:
                args.only.append(r["id"])
                continue
            # the module changed since: the same change of the same line, wherever that line is now
            same = [m for m in mutants if m.module == r["module"] and m.op == r["op"] and describe(m) == r["change"]]
            if len(same) == 1:
                args.only.append(same[0].id)
            else:
                gone.append(r)
        for r in gone:
            print(f"gone: {r['id']}  {r['change']}  (the line it mutated was changed or removed)")
    if args.only:
        by_id = {m.id: m for m in mutants}
        missing = [i for i in args.only if i not in by_id]
        if missing:
            print(f"mutation: no mutant with ID {missing[0]!r}; --list counts them", file=sys.stderr)
            return 2
        chosen = [by_id[i] for i in args.only]
    elif args.sample:
        # in the sample's random order: results that arrive first are a uniform sample too
        chosen = random.Random(args.seed).sample(mutants, min(args.sample, len(mutants)))
    else:
        chosen = mutants
    tests = args.tests or TESTS

    with tempfile.TemporaryDirectory(prefix="saverules-mutation-") as tmp:
        roots = []
        for j in range(max(1, args.jobs)):
            root = Path(tmp) / f"repo{j}"
            shutil.copytree(ROOT, root, ignore=shutil.ignore_patterns(
                ".git", "__pycache__", ".hypothesis", "mutants", "checkpoints", "out", "*.egg-info"))
            for module in MODULES:  # the copy holds the modules the mutants were made from
                (root / "saverules" / "engine" / f"{module}.py").write_bytes(_source(module))
            roots.append(root)
        t0 = time.monotonic()
        print(f"mapping lines to tests: {len(tests)} test files, unmutated, under coverage ...", flush=True)
        work = Path(tmp) / "coverage"
        work.mkdir()
        cover = coverage_map(roots[0], tests, work)
        print(f"mapped {len(cover.seconds)} tests in {time.monotonic() - t0:.0f} s; {len(chosen)} of {len(mutants)} "
              f"mutants, {len(roots)} at a time", flush=True)
        free: queue.Queue = queue.Queue()
        for root in roots:
            free.put(root)
        results = []
        lock = threading.Lock()

        def one(m: Mutant) -> None:
            selected = cover.tests_for(m)
            if selected is None:
                status, seconds, tail, limit = "survived", 0.0, "uncovered: no test runs this line", 0.0
            else:
                limit = args.timeout or cover.limit(selected)
                root = free.get()
                try:
                    apply(m, root)
                    try:
                        status, seconds, tail = run_tests(root, limit, selected)
                    finally:
                        restore(m, root)
                finally:
                    free.put(root)
                if status == "timeout":
                    tail = f"ran past its limit of {limit:.0f} s (counted as killed)"
            with lock:
                results.append(dict(asdict(m), id=m.id, status=status, seconds=round(seconds, 1),
                                    change=describe(m), tests=tail, ran=len(selected or []),
                                    limit=round(limit, 1)))
                print(f"[{len(results)}/{len(chosen)}] {status:8s} {seconds:5.0f} s  {len(selected or []):4d} tests  "
                      f"{m.id}  {describe(m)}", flush=True)
                if args.json:
                    args.json.write_text(json.dumps({"results": results}, indent=1))

        with ThreadPoolExecutor(len(roots)) as pool:
            list(pool.map(one, chosen))

    killed = sum(r["status"] != "survived" for r in results)
    print(f"\n{killed} of {len(results)} killed ({100 * killed / max(1, len(results)):.1f}%), "
          f"{sum(r['status'] == 'timeout' for r in results)} of them by a time-out; "
          f"{time.monotonic() - t0:.0f} s in all\n")
    print(summary(results))
    for r in results:
        if r["status"] == "survived":
            print(f"  survived: {r['id']}  {r['change']}  ({r['tests']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
