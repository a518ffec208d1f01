"""Moving one checkpoint between a local directory and a durable tier, digests checked as the bytes stream.

On object storage there is no rename, so a durable checkpoint ``ROOT/NAME/``
is committed in three steps:

1. every data object, each hashed while it streams and compared with the
   local manifest before the object is completed;
2. ``manifest.json``, byte for byte the local one (every object's size and
   digest);
3. the commit marker ``COMMITTED``, last: it names the checkpoint and holds
   the size and digest of the manifest.

A checkpoint without its marker is absent to every reader; what a killed
upload leaves is removed by the next writer (:meth:`DurableTier.clean`).
"""
from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .. import digest
from ..errors import CheckpointError
from ..fs import fs as local_fs
from ..layout import MANIFEST, OLD_PREFIX, TMP_PREFIX, hidden_name
from ..manifest import MAX_MANIFEST_BYTES, Invalid, check_manifest, read_manifest
from .retry import DEFAULT, Retries, retrying

MARKER = "COMMITTED"
MARKER_FORMAT = "saverules-commit"
#: Bytes read and written per chunk while streaming.
CHUNK = 8 << 20
#: The largest part of a multipart upload (and the largest file sent in one PUT); held in memory while sent.
PART = 256 << 20

Progress = Callable[[int], None]


class TransferError(CheckpointError):
    """An upload or download failed or did not match its digests; the message names the object and why."""


def marker_bytes(name: str, step: int, manifest_raw: bytes) -> bytes:
    algo = digest.DEFAULT
    h = digest.new(algo)
    h.update(manifest_raw)
    return json.dumps({
        "format": MARKER_FORMAT, "name": name, "step": step,
        "manifest": digest.make_entry(len(manifest_raw), algo, h.hexdigest()),
    }, sort_keys=True).encode("utf-8")


def check_marker(raw: bytes, name: str, manifest_raw: bytes) -> None:
    """Raise Invalid unless ``raw`` is the marker of ``name`` whose manifest is ``manifest_raw``."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise Invalid(f"{MARKER} is damaged") from None
    if not isinstance(data, dict) or data.get("format") != MARKER_FORMAT or data.get("name") != name:
        raise Invalid(f"{MARKER} is not this checkpoint's commit marker")
    entry = data.get("manifest")
    if not isinstance(entry, dict):
        raise Invalid(f"{MARKER} names no manifest")
    try:
        algo, expected = digest.entry_digest(entry)
    except KeyError:
        raise Invalid(f"{MARKER} names no manifest digest") from None
    h = digest.new(algo)
    h.update(manifest_raw)
    if entry.get("size") != len(manifest_raw) or h.hexdigest() != expected:
        raise Invalid(f"{MANIFEST} does not match the digest in {MARKER} (damaged or replaced)")


def read_remote_manifest(fs: Any, prefix: str, name: str) -> tuple[dict[str, Any], bytes]:
    """The checked manifest of the durable checkpoint at ``prefix`` and its raw bytes; raises Invalid."""
    try:
        raw = bytes(fs.cat_file(f"{prefix}/{MANIFEST}"))
    except FileNotFoundError:
        raise Invalid(f"{MANIFEST} is missing") from None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise Invalid(f"{MANIFEST} is too large")
    try:
        marker = bytes(fs.cat_file(f"{prefix}/{MARKER}"))
    except FileNotFoundError:
        raise Invalid(f"{MARKER} is missing (an unfinished upload)") from None
    check_marker(marker, name, raw)
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise Invalid(f"{MANIFEST} is damaged ({exc})") from None
    return check_manifest(data), raw


def _stream(read: Callable[[int], bytes], write: Callable[[bytes], Any], entry: Mapping[str, Any],
            on_bytes: Progress | None) -> tuple[int, str, str]:
    algo, expected = digest.entry_digest(entry)
    h = digest.new(algo)
    size = 0
    while True:
        chunk = read(CHUNK)
        if not chunk:
            break
        h.update(chunk)
        write(chunk)
        size += len(chunk)
        if on_bytes is not None:
            on_bytes(len(chunk))
    return size, h.hexdigest(), algo


def _mismatch(where: str, fname: str, entry: Mapping[str, Any], size: int, hexdigest: str, algo: str) -> str | None:
    if size != entry["size"]:
        return f"{where}/{fname} has {size} bytes, the manifest says {entry['size']} (truncated?)"
    if hexdigest != digest.entry_digest(entry)[1]:
        return f"{where}/{fname} does not match its {algo} digest (damaged)"
    return None


def upload(fs: Any, root: str, local: Path, name: str, *, retries: Retries = DEFAULT,
           on_bytes: Progress | None = None) -> dict[str, Any]:
    """Upload the committed local checkpoint ``local`` as ``ROOT/NAME``; return its manifest.

    Each object is hashed as it streams and compared with the local manifest
    before it is completed: a local file that changed since its commit fails
    the upload (TransferError) and nothing is committed.
    """
    try:
        manifest = read_manifest(local)
        manifest_raw = (local / MANIFEST).read_bytes()
    except (Invalid, OSError) as exc:
        raise TransferError(f"saverules: {local} is not a committed checkpoint ({exc}); nothing was uploaded") from None
    prefix = f"{root}/{name}"
    retrying(f"creation of {prefix}", lambda: fs.makedirs(prefix, exist_ok=True), retries)
    if fs.exists(f"{prefix}/{MARKER}"):  # re-committing a name: invisible while it is rewritten
        fs.rm_file(f"{prefix}/{MARKER}")
    for fname, entry in sorted(manifest["files"].items()):
        upload_file(fs, prefix, local, fname, entry, name, retries=retries, on_bytes=on_bytes)
    retrying(f"upload of {prefix}/{MANIFEST}", lambda: fs.pipe_file(f"{prefix}/{MANIFEST}", manifest_raw), retries)
    marker = marker_bytes(name, manifest["step"], manifest_raw)
    retrying(f"commit of {prefix}", lambda: fs.pipe_file(f"{prefix}/{MARKER}", marker), retries)
    return manifest


def upload_file(fs: Any, prefix: str, local: Path, fname: str, entry: Mapping[str, Any], name: str, *,
                retries: Retries = DEFAULT, on_bytes: Progress | None = None) -> None:
    """Upload ``local/fname`` as ``prefix/fname``, hashed as it streams and compared with its manifest ``entry``.

    A local file that changed since its commit is a TransferError (never
    retried) and the object is not completed.  ``name`` is the checkpoint's,
    for the error.
    """
    sent = [0]

    def count(n: int) -> None:
        sent[0] += n
        if on_bytes is not None:
            on_bytes(n)

    def put_one() -> None:
        if sent[0] and on_bytes is not None:
            on_bytes(-sent[0])  # a retry sends the file again
        sent[0] = 0
        with open(local / fname, "rb") as src:
            if int(entry["size"]) < PART:  # read and hashed once, then sent in one PUT, as s3fs's put does
                data = src.read(PART)
                size, hexdigest, algo = _stream(io.BytesIO(data).read, lambda b: None, entry, None)
                problem = _mismatch(str(local), fname, entry, size, hexdigest, algo)
                if problem is not None:
                    raise TransferError(f"saverules: {problem} since it was committed; the upload of {name} "
                                        "was abandoned")
                fs.pipe_file(f"{prefix}/{fname}", data)
                count(len(data))
                return
            # a larger file streams in parts of PART bytes, each hashed before it is sent
            out = fs.open(f"{prefix}/{fname}", "wb", block_size=PART)
            try:
                size, hexdigest, algo = _stream(src.read, out.write, entry, count)
                problem = _mismatch(str(local), fname, entry, size, hexdigest, algo)
                if problem is not None:
                    raise TransferError(f"saverules: {problem} since it was committed; the upload of {name} "
                                        "was abandoned")
            except BaseException:
                _discard(out)
                raise
            out.close()

    retrying(f"upload of {prefix}/{fname}", put_one, retries, permanent=(TransferError, FileNotFoundError))


def _discard(out: Any) -> None:
    """Abandon a remote file being written: S3 aborts its multipart upload and completes nothing; a backend
    that cannot discard closes it (the object stays invisible without its marker and is cleaned later)."""
    try:
        out.discard()
        out.closed = True
    except Exception:
        try:
            out.close()
        except Exception:
            pass


def verify_remote(fs: Any, prefix: str, manifest: Mapping[str, Any], on_bytes: Progress | None = None) -> str | None:
    """Re-read every object of a durable checkpoint; the reason it fails, or None."""
    for fname, entry in sorted(manifest["files"].items()):
        try:
            with fs.open(f"{prefix}/{fname}", "rb") as src:
                size, hexdigest, algo = _stream(src.read, lambda b: None, entry, on_bytes)
        except FileNotFoundError:
            return f"{fname} is missing"
        except CheckpointError as exc:
            return str(exc)
        problem = _mismatch(prefix.rsplit("/", 1)[-1], fname, entry, size, hexdigest, algo)
        if problem is not None:
            return problem.split("/", 1)[1]
    return None


def download(fs: Any, root: str, name: str, local_root: Path, *, retries: Retries = DEFAULT,
             on_bytes: Progress | None = None) -> Path:
    """Download the durable checkpoint ``ROOT/NAME`` into ``LOCAL_ROOT/NAME``; return that directory.

    The files go into a hidden temporary directory, each hashed as it
    streams in and compared with the manifest; the manifest goes in last and
    the directory is renamed into place (replacing a damaged local copy of the
    same name).  TransferError names the object that did not match.
    """
    prefix = f"{root}/{name}"
    try:
        manifest, manifest_raw = retrying(f"read of {prefix}/{MANIFEST}",
                                          lambda: read_remote_manifest(fs, prefix, name), retries,
                                          permanent=(Invalid, FileNotFoundError))
    except Invalid as exc:
        raise TransferError(f"saverules: durable checkpoint {prefix}: {exc}") from None
    local_root.mkdir(parents=True, exist_ok=True)
    tmp = local_root / hidden_name(TMP_PREFIX, name)
    local_fs.mkdir(str(tmp))
    try:
        for fname, entry in sorted(manifest["files"].items()):
            def get_one(fname: str = fname, entry: Mapping[str, Any] = entry) -> None:
                with fs.open(f"{prefix}/{fname}", "rb") as src, open(tmp / fname, "wb") as dst:
                    size, hexdigest, algo = _stream(src.read, dst.write, entry, on_bytes)
                    dst.flush()
                    local_fs.fsync(dst.fileno())
                problem = _mismatch(prefix, fname, entry, size, hexdigest, algo)
                if problem is not None:
                    raise TransferError(f"saverules: durable checkpoint {problem}; it was not downloaded")

            retrying(f"download of {prefix}/{fname}", get_one, retries,
                     permanent=(TransferError, FileNotFoundError))
        with open(tmp / MANIFEST, "xb") as f:
            f.write(manifest_raw)
            f.flush()
            local_fs.fsync(f.fileno())
        local_fs.fsync_dir(str(tmp))
        final = local_root / name
        if os.path.lexists(final):
            old = local_root / hidden_name(OLD_PREFIX, name)
            local_fs.rename(str(final), str(old))
            local_fs.rename(str(tmp), str(final))
            local_fs.rmtree(str(old))
        else:
            local_fs.rename(str(tmp), str(final))
        local_fs.fsync_dir(str(local_root))
        return final
    except BaseException:
        if tmp.exists():
            local_fs.rmtree(str(tmp))
        raise
