"""A subprocess for the durable tier's tests: a second writer, or an uploader to be killed.

    python remote_child.py hold URL              take the lock, print "held", sleep
    python remote_child.py upload URL LOCAL_DIR   take the lock, upload LOCAL_DIR as step-1, step-2, ... forever,
                                                 printing "committed NAME" after each

A refused lock prints the error on stderr and exits 3.  Test fixture, not part of saverules.
"""
from __future__ import annotations

import sys
import time

from saverules.store.errors import StoreLockedError
from saverules.store.remote import DurableTier


def main() -> int:
    mode, url = sys.argv[1], sys.argv[2]
    try:
        tier = DurableTier(url)
    except StoreLockedError as exc:
        print(exc, file=sys.stderr, flush=True)
        return 3
    print("held", flush=True)
    if mode == "hold":
        time.sleep(600)
        return 0
    n = 0
    while True:
        n += 1
        name = f"step-{n:08d}"
        tier.upload(sys.argv[3], name)
        print(f"committed {name}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
