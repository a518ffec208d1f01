"""saverules.engine.locate where the mutation sample of issue 17 found it unchecked (docs/testing.md)."""
from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from saverules import PolicyError, loads
from saverules.engine.locate import key_positions

if sys.version_info >= (3, 11):
    import tomllib
else:  # the loader reads TOML with tomli there too
    import tomli as tomllib


@contextmanager
def _within(seconds: float) -> Iterator[None]:
    """Fail, instead of hanging, when the block runs longer than ``seconds``."""
    def expired(signum: int, frame: object) -> None:
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _resolves(data: object, path: tuple[object, ...]) -> bool:
    for part in path:
        if isinstance(data, dict) and part in data:
            data = data[part]
        elif isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data):
            data = data[part]
        else:
            return False
    return True


@pytest.mark.parametrize("text", [
    '[[rules]]\nkind = "every_steps"\nevery = 5\n[[rules]]\nkind = "epoch_end"\n',
    'version = 1\n[[x]]\nb = 2\n[[x]]\n[[x.y]]\nc = 3\n',
    '[[durable.rules]]\nkind = "every_steps"\nevery = 50\n[run]\ntotal_steps = 9\n',
    'a = "x\\"y"\nb = 1\n',  # an escaped quote does not end a string
    'a = "x\\\\"\nb = "\\\\\\"q"\n',  # a quote after an even run of backslashes does
])
def test_every_position_names_a_path_of_the_document(text):
    # no key is read from inside a header or a string: the scanner resumes past the closing brackets and quotes
    positions = key_positions(text)
    data = tomllib.loads(text)
    assert [p for p in positions if not _resolves(data, p)] == []
    assert len(positions) >= text.count("=")  # the scan got through every key


def test_an_unknown_key_is_reported_on_its_own_line_after_an_array_table_header():
    # `es` is also the tail of the header `[[rules]]`: the error must point at line 4, where the key is
    text = 'version = 1\n[[rules]]\nkind = "every_steps"\nes = 5\nevery = 10\n'
    with pytest.raises(PolicyError) as e:
        loads(text, source="p.toml")
    assert "p.toml:4:1" in str(e.value)


def test_text_the_scanner_does_not_understand_ends_the_scan_with_what_it_found():
    # positions only sharpen diagnostics: on text it cannot follow (an array element that starts with `}`),
    # the scanner stops instead of looping
    with _within(10):
        assert key_positions("a = 1\nx = [}\nb = 2\n") == {("a",): (1, 1), ("x",): (2, 1), ("x", 0): (2, 6)}
