"""A download fetches each object in ranges (one request each, the next in flight while the last is hashed and
written): bit for bit across many ranges, and an object longer, shorter (also cut at a range boundary) or
damaged in a middle range than its manifest says is named and leaves nothing behind."""
from __future__ import annotations

import secrets

import pytest
from remote_common import local_checkpoints, same_files
from s3_server import BUCKET

from saverules.store.remote import DurableTier, TransferError, transfer

FILE = "tensors.safetensors"


@pytest.fixture(params=["s3", "file"])
def url(request, tmp_path):
    if request.param == "s3":
        request.getfixturevalue("s3")
        return f"s3://{BUCKET}/ranges-{secrets.token_hex(4)}"
    return f"file://{tmp_path}/durable"


@pytest.fixture
def small_ranges(monkeypatch):
    monkeypatch.setattr(transfer, "RANGE", 64 << 10)  # the ~200 KB data file takes four ranges


def test_many_ranges_download_bit_for_bit_and_count_every_byte(url, tmp_path, small_ranges):
    [local] = local_checkpoints(tmp_path / "local", steps=(1,))
    assert (local / FILE).stat().st_size > 3 * transfer.RANGE
    counted: list[int] = []
    with DurableTier(url) as tier:
        tier.upload(local)
        got = tier.download(local.name, tmp_path / "node", on_bytes=counted.append)
    assert same_files(got, local)
    assert sum(counted) == sum(p.stat().st_size for p in local.iterdir() if p.name != "manifest.json")


def _rewrite(tier: DurableTier, name: str, change) -> int:
    obj = f"{tier.prefix(name)}/{FILE}"
    data = bytes(tier.fs.cat_file(obj))
    tier.fs.pipe_file(obj, change(bytearray(data)))
    return len(data)


@pytest.mark.parametrize("how, reason", [
    ("longer", r"has \d+ bytes, the manifest says \d+ \(truncated\?\)"),
    ("shorter", r"has \d+ bytes, the manifest says \d+ \(truncated\?\)"),
    ("boundary", r"has 131072 bytes, the manifest says \d+ \(truncated\?\)"),
    ("flipped", r"does not match its xxh3_128 digest \(damaged\)"),
])
def test_an_object_that_differs_from_its_manifest_is_named_and_nothing_stays(url, tmp_path, small_ranges, how,
                                                                             reason):
    [local] = local_checkpoints(tmp_path / "local", steps=(1,))
    changes = {
        "longer": lambda d: bytes(d) + b"extra",
        "shorter": lambda d: bytes(d[:-7]),
        "boundary": lambda d: bytes(d[:2 * transfer.RANGE]),  # ends exactly where the third range begins
        "flipped": lambda d: bytes(d[:transfer.RANGE + 5]) + bytes([d[transfer.RANGE + 5] ^ 1]) + bytes(d[transfer.RANGE + 6:]),
    }
    with DurableTier(url) as tier:
        tier.upload(local)
        _rewrite(tier, local.name, changes[how])
        with pytest.raises(TransferError, match=f"{FILE} {reason}; it was not downloaded"):
            tier.download(local.name, tmp_path / "node")
    assert not list((tmp_path / "node").iterdir()), "nothing half-downloaded stays behind"


def test_the_manifest_and_the_marker_are_read_together_and_a_missing_marker_is_named(url, tmp_path):
    [local] = local_checkpoints(tmp_path / "local", steps=(1,))
    with DurableTier(url) as tier:
        tier.upload(local)
        got, raw = transfer.read_remote_manifest(tier.fs, tier.prefix(local.name), local.name)
        assert raw == (local / "manifest.json").read_bytes() and got["step"] == 1
        tier.fs.rm_file(f"{tier.prefix(local.name)}/{transfer.MARKER}")
        with pytest.raises(TransferError, match=r"COMMITTED is missing \(an unfinished upload\)"):
            tier.download(local.name, tmp_path / "node")


def test_a_consumer_that_stops_early_leaves_no_fetch_waiting(url, tmp_path, small_ranges):
    [local] = local_checkpoints(tmp_path / "local", steps=(1,))
    with DurableTier(url) as tier:
        tier.upload(local)
        ranges = transfer.fetch_ranges(tier.fs, f"{tier.prefix(local.name)}/{FILE}", (local / FILE).stat().st_size)
        first = next(ranges)
        assert len(first) == transfer.RANGE
        ranges.close()  # the fetch thread is told to stop and drained: close returns
    import threading

    assert not [t for t in threading.enumerate() if t.name == "saverules-download"]
