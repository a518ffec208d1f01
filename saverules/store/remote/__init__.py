"""The durable tier: checkpoints on object storage (S3, GCS) or any fsspec file system.

* :mod:`.url` opens an fsspec URL (``s3://``, ``gs://``, ``file://``,
  ``memory://`` or a plain path) with storage options that never hold
  credentials;
* :mod:`.retry` runs one network operation with bounded retries and backoff;
* :mod:`.lease` is the tier's one-writer lock: a lock object written with a
  conditional write, renewed while its holder runs;
* :mod:`.transfer` streams a committed local checkpoint up (data objects, then
  the manifest, then the commit marker) and a durable one down, checking
  every digest while the bytes stream;
* :mod:`.tier` is :class:`DurableTier`: listing, verification, retention and
  the clean-up of a killed upload's leftovers.

Nothing here imports torch; see docs/tiers.md.
"""
from __future__ import annotations

from .lease import RemoteLock, RemoteLockedError
from .tier import DurableTier, RemoteInfo
from .transfer import MARKER, TransferError
from .url import open_url

__all__ = [
    "MARKER", "DurableTier", "RemoteInfo", "RemoteLock", "RemoteLockedError", "TransferError", "open_url",
]
