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

import contextlib
import io
import json
import os
import queue
import threading
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
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
#: Bytes fetched per request while downloading (held in memory: at most three ranges at a time).
RANGE = 64 << 20
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


def _cat_two(fs: Any, first: str, second: str) -> tuple[bytes | BaseException, bytes | BaseException]:
    """The contents of two small objects, fetched at the same time; an exception in place of one that failed."""
    got: list[bytes | BaseException] = [b"", b""]

    def cat(i: int, path: str) -> None:
        try:
            got[i] = bytes(fs.cat_file(path))
        except Exception as exc:  # (raised by the caller, in order)
            got[i] = exc

    other = threading.Thread(target=cat, args=(1, second), name="saverules-download", daemon=True)
    other.start()
    cat(0, first)
    other.join()
    return got[0], got[1]


def read_remote_manifest(fs: Any, prefix: str, name: str) -> tuple[dict[str, Any], bytes]:
    """The checked manifest of the durable checkpoint at ``prefix`` and its raw bytes; raises Invalid."""
    raw, marker = _cat_two(fs, f"{prefix}/{MANIFEST}", f"{prefix}/{MARKER}")  # two requests at once
    if isinstance(raw, FileNotFoundError):
        raise Invalid(f"{MANIFEST} is missing") from None
    if isinstance(raw, BaseException):
        raise raw
    if len(raw) > MAX_MANIFEST_BYTES:
        raise Invalid(f"{MANIFEST} is too large")
    if isinstance(marker, FileNotFoundError):
        raise Invalid(f"{MARKER} is missing (an unfinished upload)") from None
    if isinstance(marker, BaseException):
        raise marker
    check_marker(marker, name, raw)
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise Invalid(f"{MANIFEST} is damaged ({exc})") from None
    return check_manifest(data), raw


def _chunks(read: Callable[[int], bytes]) -> Iterator[bytes]:
    """``read(CHUNK)`` until it returns nothing."""
    while True:
        chunk = read(CHUNK)
        if not chunk:
            return
        yield chunk


def _stream(chunks: Iterable[bytes], write: Callable[[bytes], Any], entry: Mapping[str, Any],
            on_bytes: Progress | None) -> tuple[int, str, str]:
    algo, expected = digest.entry_digest(entry)
    h = digest.new(algo)
    size = 0
    for chunk in chunks:
        h.update(chunk)
        write(chunk)
        size += len(chunk)
        if on_bytes is not None:
            on_bytes(len(chunk))
    return size, h.hexdigest(), algo


def fetch_ranges(fs: Any, path: str, size: int) -> Generator[bytes, None, None]:
    """The object at ``path``, expected to hold ``size`` bytes, in ranges of :data:`RANGE` bytes.

    Each range is one request (``fs.cat_file`` with a start and an end),
    fetched on a thread of its own while the caller uses the range before it.
    The last range asks for one byte more than ``size``, so that an object
    longer than the manifest says is seen as such; a shorter one ends early.
    """
    if size <= 0:
        yield bytes(fs.cat_file(path))
        return
    results: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()

    def fetch() -> None:
        try:
            for begin in range(0, size, RANGE):
                if stop.is_set():
                    return
                end = begin + RANGE if begin + RANGE < size else size + 1
                try:
                    data = bytes(fs.cat_file(path, start=begin, end=end))
                except Exception:
                    if begin and fs.size(path) <= begin:  # cut short at a range boundary: the object ends here
                        break
                    raise
                results.put((data, None))
                if len(data) < end - begin:  # the object ends here (shorter than the manifest says)
                    break
            results.put((None, None))
        except BaseException as exc:  # handed to the caller, which raises it
            results.put((None, exc))

    fetcher = threading.Thread(target=fetch, name="saverules-download", daemon=True)
    fetcher.start()
    try:
        while True:
            data, error = results.get()
            if error is not None:
                raise error
            if data is None:
                return
            yield data
    finally:
        stop.set()
        while fetcher.is_alive():  # a fetch waiting to hand over its range must not block forever
            try:
                results.get(timeout=0.05)
            except queue.Empty:
                pass
        fetcher.join()


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
                size, hexdigest, algo = _stream(_chunks(io.BytesIO(data).read), lambda b: None, entry, None)
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
                size, hexdigest, algo = _stream(_chunks(src.read), out.write, entry, count)
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
                size, hexdigest, algo = _stream(_chunks(src.read), lambda b: None, entry, on_bytes)
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

    Each object is fetched in ranges of :data:`RANGE` bytes (one request
    each, the next one in flight while the last is hashed, written and
    flushed to the disk), largest object first.
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
        for fname, entry in sorted(manifest["files"].items(), key=lambda kv: (-int(kv[1]["size"]), kv[0])):
            def get_one(fname: str = fname, entry: Mapping[str, Any] = entry) -> None:
                got = [0]

                def write(data: bytes, dst: Any) -> None:
                    dst.write(data)
                    dst.flush()
                    local_fs.fsync(dst.fileno())  # while the next range is fetched: the last fsync is short

                def counted(n: int) -> None:
                    got[0] += n
                    if on_bytes is not None:
                        on_bytes(n)

                try:
                    with open(tmp / fname, "wb") as dst, \
                            contextlib.closing(fetch_ranges(fs, f"{prefix}/{fname}", int(entry["size"]))) as ranges:
                        size, hexdigest, algo = _stream(ranges, lambda b: write(b, dst), entry, counted)
                        local_fs.fsync(dst.fileno())
                except BaseException:
                    if got[0] and on_bytes is not None:
                        on_bytes(-got[0])  # a retry fetches the file again
                    raise
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
