"""Bounded retries with exponential backoff for one operation on a durable tier.

Each retry logs one line on the ``saverules.store`` logger (warning level)
with the attempt, the wait and the reason.  What cannot succeed by waiting (a
missing object, a refused conditional write, a digest that does not match)
is not retried.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import TypeVar

from ..errors import CheckpointError, log

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Retries:
    """``attempts`` tries in all; the n-th wait is ``first * 2**n`` seconds, at most ``longest``."""

    attempts: int = 6
    first: float = 0.5
    longest: float = 8.0

    def wait(self, retry: int) -> float:
        return min(self.longest, self.first * (2 ** retry))


DEFAULT = Retries()

class RetriesExhausted(CheckpointError):
    """An operation on a durable tier failed on every attempt; the message names it and the last reason."""

    def __init__(self, message: str, attempts: int, reason: str):
        super().__init__(message)
        self.attempts = attempts
        self.reason = reason


#: Exceptions that waiting cannot fix.
PERMANENT: tuple[type[BaseException], ...] = (FileNotFoundError, FileExistsError, PermissionError)


def retrying(what: str, fn: Callable[[], T], retries: Retries = DEFAULT,
             permanent: tuple[type[BaseException], ...] = PERMANENT,
             sleep: Callable[[float], None] = time.sleep) -> T:
    """``fn()``, retried on OSError (and the network errors of the backends) up to ``retries.attempts`` times."""
    for attempt in range(retries.attempts):
        try:
            return fn()
        except permanent:
            raise
        except Exception as exc:  # the backends raise OSError, ClientError, aiohttp errors...
            if not _transient(exc):
                raise
            if attempt + 1 >= retries.attempts:
                reason = _reason(exc)
                raise RetriesExhausted(
                    f"saverules: {what} failed {retries.attempts} times; the last time: {reason}",
                    retries.attempts, reason,
                ) from exc
            pause = retries.wait(attempt)
            log.warning("saverules: %s failed (%s); retry %d of %d in %.1fs", what, _reason(exc), attempt + 1,
                        retries.attempts - 1, pause)
            sleep(pause)
    raise AssertionError("unreachable")  # pragma: no cover


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, (OSError, TimeoutError, ConnectionError)):
        return True
    mod = type(exc).__module__.split(".")[0]
    return mod in ("botocore", "aiobotocore", "aiohttp", "urllib3", "requests", "google", "gcsfs", "s3fs")


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."
