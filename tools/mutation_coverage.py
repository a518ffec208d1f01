"""Which test runs which engine line: the coverage half of tools/mutation.py.

The mutation tool runs the unmutated tests once under ``coverage`` with one
*context* per test (its pytest node ID), so that each mutant is then run only
against the tests that execute its line. Two pieces live here:

- ``start()``, called from a ``sitecustomize`` that the tool puts on
  ``PYTHONPATH`` for that one run, starts coverage in *every* Python process:
  the pytest process and the subprocesses its tests start (``python -m
  saverules.check`` and the like). A subprocess records its lines under the
  node ID of the test that started it (read from the environment), so a test
  that checks the engine through a command is mapped like any other.
- A pytest plugin (``-p mutation_coverage``) that switches the context at each
  test and records each test's duration and outcome.

Lines run outside any test (imports, module-level code, test-module set-up)
are recorded under the empty context: a mutant on such a line may change every
test, so the tool runs all of them for it.
"""
from __future__ import annotations

import atexit
import json
import os
import time
from typing import Any

DATA = "SAVERULES_MUTATION_COVERAGE_DATA"  # the coverage data file (each process adds a suffix)
SOURCE = "SAVERULES_MUTATION_COVERAGE_SOURCE"  # the engine folder to measure
CONTEXT = "SAVERULES_MUTATION_CONTEXT"  # the node ID of the test running now
TIMES = "SAVERULES_MUTATION_TIMES"  # where the plugin writes each test's duration and outcome

_times: dict = {}


def start() -> None:
    """Start coverage in this process, if the mutation tool asked for it."""
    data = os.environ.get(DATA)
    if not data:
        return
    import coverage

    cov = coverage.Coverage(data_file=data, data_suffix=True, source=[os.environ[SOURCE]],
                            context=os.environ.get(CONTEXT, ""), config_file=False)
    cov.start()

    def save() -> None:
        cov.stop()
        cov.save()

    atexit.register(save)


def _current() -> Any:
    import coverage

    return coverage.Coverage.current()


def pytest_runtest_protocol(item: Any, nextitem: Any) -> Any:  # a hookwrapper: see the marker below
    cov = _current()
    os.environ[CONTEXT] = item.nodeid
    if cov is not None:
        cov.switch_context(item.nodeid)
    t0 = time.monotonic()
    yield
    _times.setdefault(item.nodeid, {})["seconds"] = round(time.monotonic() - t0, 3)
    os.environ[CONTEXT] = ""
    if cov is not None:
        cov.switch_context("")


pytest_runtest_protocol.hookwrapper = True  # type: ignore[attr-defined]


def pytest_runtest_logreport(report: Any) -> None:
    entry = _times.setdefault(report.nodeid, {})
    if report.failed or entry.get("outcome") != "failed":
        entry["outcome"] = report.outcome


def pytest_unconfigure(config: Any) -> None:
    path = os.environ.get(TIMES)
    if path:
        with open(path, "w") as f:
            json.dump(_times, f)
