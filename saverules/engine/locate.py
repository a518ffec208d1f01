"""Where each key and array element of a TOML document starts.

``tomllib`` gives values but no positions, and diagnostics must name
``file:line:col``.  This scanner walks a document that ``tomllib`` has already
accepted and records the 1-based (line, col) of every key, table header and
array element, keyed by the same path pydantic reports in its errors:
``("rules", 2, "every")`` is the ``every`` key of the third ``[[rules]]``.
"""
from __future__ import annotations

from bisect import bisect_right

Path = tuple[object, ...]
_BARE = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


class _Scanner:
    def __init__(self, text: str):
        self.text = text
        self.i = 0
        self.positions: dict[Path, tuple[int, int]] = {}
        self.array_tables: dict[Path, int] = {}
        # start offset of every line, to turn offsets into (line, col)
        self.line_starts = [0] + [i + 1 for i, ch in enumerate(text) if ch == "\n"]

    # -- helpers --------------------------------------------------------------
    def where(self, offset: int) -> tuple[int, int]:
        line = bisect_right(self.line_starts, offset) - 1  # the last line starting at or before offset
        return line + 1, offset - self.line_starts[line] + 1

    def record(self, path: Path, offset: int) -> None:
        self.positions.setdefault(path, self.where(offset))

    def _advanced(self, start: int) -> None:
        """Stop on text this scanner does not understand rather than loop on it."""
        if self.i <= start or self.i > len(self.text):
            raise ValueError("scanner made no progress")

    def peek(self, n: int = 1) -> str:
        return self.text[self.i : self.i + n]

    def skip_blank(self, newlines: bool) -> None:
        text = self.text
        while self.i < len(text):
            ch = text[self.i]
            if ch in " \t\r" or (newlines and ch == "\n"):
                self.i += 1
            elif ch == "#":
                while self.i < len(text) and text[self.i] != "\n":
                    self.i += 1
            else:
                return

    # -- lexical pieces -------------------------------------------------------
    def string(self) -> str:
        text = self.text
        for quote in ('"""', "'''"):
            if text.startswith(quote, self.i):
                end = self.i + 3
                while True:
                    end = text.index(quote, end)
                    if quote == '"""' and _escaped(text, end):
                        end += 1
                        continue
                    break
                # a closing delimiter may be followed by up to two more quotes
                while text.startswith(quote[0], end + 3):
                    end += 1
                value = text[self.i + 3 : end]
                self.i = end + 3
                return value
        quote = text[self.i]
        end = self.i + 1
        while text[end] != quote or (quote == '"' and _escaped(text, end)):
            end += 1
        value = text[self.i + 1 : end]
        self.i = end + 1
        return value

    def key(self) -> tuple[tuple[str, int], ...]:
        """A dotted key: ((part, offset), ...)."""
        parts = []
        while True:
            self.skip_blank(newlines=False)
            start = self.i
            if self.peek() in ('"', "'"):
                parts.append((self.string(), start))
            else:
                while self.i < len(self.text) and self.text[self.i] in _BARE:
                    self.i += 1
                parts.append((self.text[start : self.i], start))
            self.skip_blank(newlines=False)
            if self.peek() != ".":
                return tuple(parts)
            self.i += 1

    def scalar(self) -> None:
        text = self.text
        while self.i < len(text) and text[self.i] not in ",]}\n#":
            self.i += 1

    # -- structure ------------------------------------------------------------
    def value(self, path: Path) -> None:
        self.skip_blank(newlines=False)
        ch = self.peek()
        if ch == "{":
            self.i += 1
            while True:
                self.skip_blank(newlines=False)
                if self.peek() == "}":
                    self.i += 1
                    return
                start = self.i
                self.keyval(path)
                self.skip_blank(newlines=False)
                if self.peek() == ",":
                    self.i += 1
                self._advanced(start)
        elif ch == "[":
            self.i += 1
            index = 0
            while True:
                self.skip_blank(newlines=True)
                if self.peek() == "]":
                    self.i += 1
                    return
                start = self.i
                self.record(path + (index,), self.i)
                self.value(path + (index,))
                self.skip_blank(newlines=True)
                if self.peek() == ",":
                    self.i += 1
                    index += 1
                self._advanced(start)
        elif ch in ('"', "'"):
            self.string()
        else:
            self.scalar()

    def keyval(self, table: Path) -> None:
        parts = self.key()
        path = table
        for name, offset in parts:
            path = path + (name,)
            self.record(path, offset)
        self.skip_blank(newlines=False)
        self.i += 1  # '='
        self.value(path)

    def resolve(self, parts) -> Path:
        """A header's path, with the current index of each array of tables inserted."""
        path: Path = ()
        for name, _ in parts:
            path = path + (name,)
            if path in self.array_tables:
                path = path + (self.array_tables[path],)
        return path

    def document(self) -> dict[Path, tuple[int, int]]:
        table: Path = ()
        text = self.text
        while True:
            self.skip_blank(newlines=True)
            if self.i >= len(text):
                return self.positions
            start = self.i
            if text.startswith("[[", self.i):
                self.i += 2
                parts = self.key()
                self.i += 2
                base = self.resolve(parts[:-1]) + (parts[-1][0],)
                index = self.array_tables.get(base, -1) + 1
                self.array_tables[base] = index
                self.record(base, start)
                table = base + (index,)
                self.record(table, start)
            elif text.startswith("[", self.i):
                self.i += 1
                parts = self.key()
                self.i += 1
                table = self.resolve(parts)
                self.record(table, start)
            else:
                self.keyval(table)


def _escaped(text: str, index: int) -> bool:
    """Whether the character at ``index`` is preceded by an odd number of backslashes."""
    count = 0
    while index - count - 1 >= 0 and text[index - count - 1] == "\\":
        count += 1
    return count % 2 == 1


def key_positions(text: str) -> dict[Path, tuple[int, int]]:
    """Positions of every key, header and array element in valid TOML ``text``.

    Never raises: on anything unexpected it returns what it found so far,
    since positions only sharpen diagnostics.
    """
    scanner = _Scanner(text)
    try:
        return scanner.document()
    except (IndexError, ValueError):
        return scanner.positions


def locate(positions: dict[Path, tuple[int, int]], loc: Path) -> tuple[int, int]:
    """The best position for an error at pydantic location ``loc``.

    Walks ``loc`` as deep as the document has it, skipping the union tags that
    pydantic inserts (``("rules", 0, "every_steps", "every")``).  Falls back to
    the enclosing table, then to the start of the document.
    """
    best = (1, 1)
    path: Path = ()
    for part in loc:
        candidate = path + (part,)
        if candidate in positions:
            path = candidate
            best = positions[path]
        elif any(key[: len(candidate)] == candidate for key in positions):
            path = candidate  # a table only implied by a deeper header, such as [[durable.rules]]
    return best
