"""The bounds of what saverules accepts, so that every input is answered in bounded time and memory.

Each limit is far above what a real policy or run needs; input beyond one is an
error that names the limit, never a hang.
"""
from __future__ import annotations

#: The longest run, and the largest step count a policy may name: 2^63 - 1, the
#: largest step a signed 64-bit counter (a training loop's, a checkpoint's) holds.
MAX_STEPS = (1 << 63) - 1

#: The largest policy file, in bytes.
MAX_FILE_BYTES = 1 << 20

#: How deep tables and arrays may nest inside each other in a policy file.  Each
#: level of ``not`` takes one, each level of ``all`` / ``any`` two (the table and
#: its ``rules`` array).
MAX_NESTING = 64

#: How many rules a policy may have, nested rules included.
MAX_RULES = 10_000

#: How many saves a simulation lists; beyond it the saves are counted, not listed.
SAVE_LIMIT = 10_000


def steps_text(n: int) -> str:
    """``MAX_STEPS`` as people read it."""
    return f"{n:,} (2^63-1)" if n == MAX_STEPS else f"{n:,}"
