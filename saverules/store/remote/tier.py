"""A durable tier: the checkpoints under one fsspec URL, listed, verified, retained and written by one writer.

A durable checkpoint is the prefix ``ROOT/NAME/`` holding its data objects,
``manifest.json`` and the commit marker (:mod:`.transfer`).  Readers list
only prefixes with a marker; a writer, once it holds the lock
(:mod:`.lease`), removes every prefix without one: the leftovers of a killed
upload or of a deletion cut short (a deletion removes the marker first).
"""
from __future__ import annotations

import builtins
import os
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, log, warn
from ..manifest import CheckpointInfo, Invalid, info_from_manifest
from ..retain import retention_view
from ..verify import sort_key
from .lease import LOCK_OBJECT, RemoteLock
from .retry import DEFAULT, Retries, RetriesExhausted, retrying
from .transfer import MARKER, Progress, download, read_remote_manifest, upload, verify_remote
from .url import open_url

_UNREACHABLE = ("The durable tier cannot be written: check the URL, that the bucket exists, the credentials and "
                "endpoint in the environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...), and the network")

#: Every durable checkpoint as this module sees it is a CheckpointInfo whose ``path`` is the object prefix.
RemoteInfo = CheckpointInfo


class DurableTier:
    """The durable tier at ``url``.

    With ``writer=True`` (the default) the tier's lock is taken at once
    (:class:`RemoteLockedError` names another holder), an unreachable tier is
    a CheckpointError at once, and the leftovers of unfinished uploads are
    removed.  With ``writer=False`` nothing is written or removed.
    """

    def __init__(self, url: str, options: Mapping[str, Any] | None = None, *, writer: bool = True,
                 lease: float | None = None, retries: Retries = DEFAULT):
        self.url = url
        self.fs, self.root = open_url(url, options)
        self.retries = retries
        self.lock: RemoteLock | None = None
        self._warned: set[str] = set()
        if writer:
            try:
                self.fs.makedirs(self.root, exist_ok=True)
                self.lock = retrying(f"lock of {url}", RemoteLock(self.fs, self.root, lease).acquire,
                                     Retries(attempts=3, first=0.5))
            except CheckpointError as exc:
                if not isinstance(exc, RetriesExhausted):
                    raise
                raise CheckpointError(f"{exc}. {_UNREACHABLE}") from None
            except Exception as exc:
                raise CheckpointError(
                    f"saverules: the durable tier {url} cannot be written ({type(exc).__name__}: {exc}); check the "
                    "URL, that the bucket exists, the credentials and endpoint in the environment "
                    "(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...), and the network"
                ) from None
            self.clean()

    # -- what is there ---------------------------------------------------------------------------

    def _objects(self) -> dict[str, dict[str, int]]:
        """Every checkpoint prefix -> {object name: size}; hidden and root-level objects are left out."""
        self.fs.invalidate_cache()

        def find() -> Any:
            try:
                return self.fs.find(self.root, detail=True)
            except FileNotFoundError:
                return {}

        found = retrying(f"listing of {self.url}", find, self.retries)
        out: dict[str, dict[str, int]] = {}
        base = self.root.rstrip("/") + "/"
        for path, entry in found.items():
            rel = str(path)[len(base):] if str(path).startswith(base) else None
            if rel is None or "/" not in rel:
                continue
            name, fname = rel.split("/", 1)
            if name.startswith("."):
                continue
            out.setdefault(name, {})[fname] = int(entry.get("size") or 0)
        return out

    def names(self) -> list[str]:
        """The committed checkpoints' names (those with a marker), in listing order."""
        return sorted(n for n, files in self._objects().items() if MARKER in files)

    def leftovers(self) -> list[str]:
        """Prefixes without a marker: unfinished uploads or deletions (a reader never sees them)."""
        return sorted(n for n, files in self._objects().items() if MARKER not in files)

    def prefix(self, name: str) -> str:
        return f"{self.root}/{name}"

    def info(self, name: str, verify: bool = False, sizes: Mapping[str, int] | None = None) -> CheckpointInfo:
        """One durable checkpoint: manifest and marker, object sizes, and with ``verify`` every object's digest."""
        prefix = self.prefix(name)
        path = Path(prefix)
        try:
            manifest, _ = retrying(f"read of {prefix}/manifest.json",
                                   lambda: read_remote_manifest(self.fs, prefix, name), self.retries,
                                   permanent=(Invalid, FileNotFoundError))
        except Invalid as exc:
            return CheckpointInfo(path=path, name=name, verified=False, error=str(exc))
        root = Path(self.root)
        if sizes is None:
            sizes = self._objects().get(name, {})
        for fname, entry in manifest["files"].items():
            if fname not in sizes:
                return info_from_manifest(path, root, manifest, False, f"{fname} is missing")
            if sizes[fname] != entry["size"]:
                return info_from_manifest(path, root, manifest, False,
                                          f"{fname} has {sizes[fname]} bytes, the manifest says {entry['size']} "
                                          "(truncated?)")
        if not verify:
            return info_from_manifest(path, root, manifest, None, None)
        problem = retrying(f"verification of {prefix}", lambda: verify_remote(self.fs, prefix, manifest),
                           self.retries)
        return info_from_manifest(path, root, manifest, problem is None, problem)

    def list(self, verify: bool = False) -> builtins.list[CheckpointInfo]:
        """Every committed durable checkpoint, oldest first, with its verification status."""
        objects = self._objects()
        infos = [self.info(n, verify, files) for n, files in objects.items() if MARKER in files]
        infos.sort(key=sort_key)
        return infos

    # -- writing -------------------------------------------------------------------------------

    def _writing(self) -> RemoteLock:
        if self.lock is None:
            raise CheckpointError(f"saverules: the durable tier {self.url} was opened read-only")
        if self.lock.lost is not None:
            raise CheckpointError(f"saverules: this process no longer writes {self.url}: {self.lock.lost}")
        return self.lock

    def clean(self) -> builtins.list[str]:
        """Remove every prefix without a marker (a writer's job, under the lock); return their names."""
        self._writing()
        gone = self.leftovers()
        for name in gone:
            log.warning("saverules: removing %s, an unfinished upload or deletion (no %s)", self.prefix(name), MARKER)
            prefix = self.prefix(name)

            def remove(prefix: str = prefix) -> None:
                self.fs.rm(prefix, recursive=True)

            retrying(f"removal of {prefix}", remove, self.retries)
        return gone

    def upload(self, local: str | os.PathLike, name: str | None = None,
               on_bytes: Progress | None = None) -> CheckpointInfo:
        """Upload the committed local checkpoint directory ``local`` (as ``name``, default its own name)."""
        self._writing()
        local = Path(local)
        name = name or local.name
        manifest = upload(self.fs, self.root, local, name, retries=self.retries, on_bytes=on_bytes)
        return info_from_manifest(Path(self.prefix(name)), Path(self.root), manifest, None, None)

    def download(self, name: str, local_root: str | os.PathLike, on_bytes: Progress | None = None) -> Path:
        """Download ``name`` into ``local_root/name``, checking digests as the bytes stream in."""
        return download(self.fs, self.root, name, Path(local_root), retries=self.retries, on_bytes=on_bytes)

    def delete(self, name: str) -> None:
        """Delete a durable checkpoint: its marker first, so that a cut deletion leaves only leftovers."""
        self._writing()
        prefix = self.prefix(name)
        retrying(f"removal of {prefix}/{MARKER}", lambda: self._rm_marker(prefix), self.retries)
        retrying(f"removal of {prefix}", lambda: self.fs.rm(prefix, recursive=True), self.retries)

    def _rm_marker(self, prefix: str) -> None:
        try:
            self.fs.rm_file(f"{prefix}/{MARKER}")
        except FileNotFoundError:
            pass

    def retain(self, policy: Any, protected: Collection[str] = ()) -> builtins.list[str]:
        """Apply ``policy.retain`` to this tier; return the names deleted.

        Never deleted: the newest committed checkpoint, the names in
        ``protected``, and a checkpoint that does not check out (it is not
        counted, and left for you to inspect, with a warning).
        """
        self._writing()
        infos = self.list(verify=False)
        for info in infos:
            if not info.ok and info.name not in self._warned:
                self._warned.add(info.name)
                warn(f"saverules: durable checkpoint {self.prefix(info.name)} does not check out ({info.error}); "
                     "retention does not count it and leaves it in place")
        valid = [i for i in infos if i.ok and i.step is not None]
        if not valid:
            return []
        keep = policy.retain(retention_view(valid))
        if len(keep) != len(valid):
            raise CheckpointError(f"policy.retain returned {len(keep)} answers for {len(valid)} checkpoints")
        newest = valid[-1].name
        gone = []
        for info, k in zip(valid, keep):
            if k or info.name == newest or info.name in protected:
                continue
            self.delete(info.name)
            gone.append(info.name)
        return gone

    def close(self) -> None:
        """Let go of the lock (reading still works)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def __enter__(self) -> DurableTier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["DurableTier", "RemoteInfo", "LOCK_OBJECT"]
