"""Hashing while writing: large tensors are hashed behind the writer, and the digest is the file's."""
from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from store_common import (
    checkpoint_dirs,
    policy,
    tensors_equal,
)

from saverules import Progress
from saverules.store import digest, layout, writer
from saverules.torch import (
    Checkpointer,
)

# --------------------------------------------------------------------------
# Hashing while writing (large tensors are hashed behind the writer)
# --------------------------------------------------------------------------


def big_state(value: float = 1.0):
    """Tensors well above the 1 MiB chunk size, one storage shared by two views, and small ones."""
    torch.manual_seed(int(value))
    weight = torch.randn(768, 512)  # 1.5 MiB
    return {
        "model": {"w": weight, "w_t": weight.t(), "half": weight[:384], "small": torch.arange(10.0)},
        "extra": [torch.randn(300_000) * value, torch.zeros(2_000_000, dtype=torch.uint8)],
        "step": 3,
    }


def _file_digests(directory):
    import xxhash

    manifest = json.loads((directory / "manifest.json").read_text())
    for name, entry in manifest["files"].items():
        data = (directory / name).read_bytes()
        yield name, entry, len(data), xxhash.xxh3_128(data).hexdigest()


@pytest.mark.parametrize("fmt", ["torch", "safetensors"])
@pytest.mark.parametrize("async_save", [False, True])
def test_manifest_hash_of_large_tensors_is_the_hash_of_the_file(tmp_path, fmt, async_save):
    ck = Checkpointer(policy(fmt=fmt), tmp_path, async_save=async_save, verify="none")
    state = big_state(2.0)
    ck.save(Progress(1), state)
    ck.close()
    (directory,) = [tmp_path / d for d in checkpoint_dirs(tmp_path)]
    for name, entry, size, digest in _file_digests(directory):
        assert (entry["size"], entry["xxh3_128"]) == (size, digest), name
    back = {"model": None, "extra": None, "step": None}
    assert Checkpointer(policy(fmt=fmt), tmp_path).load_latest(back).step == 1
    assert tensors_equal(back["model"], state["model"]) and tensors_equal(back["extra"], state["extra"])


def test_writer_does_not_wait_for_the_hash_of_tensor_memory(tmp_path, monkeypatch):
    waits = []
    real_submit = digest.HASHER.submit

    def recording_submit(stream, data, wait=False):
        if data is not None:
            waits.append((memoryview(data).nbytes, wait))
        return real_submit(stream, data, wait)

    monkeypatch.setattr(digest.HASHER, "submit", recording_submit)
    Checkpointer(policy(), tmp_path, verify="hash").save(Progress(1), big_state())
    large = [w for n, w in waits if n >= digest.PARALLEL_HASH_MIN]
    assert len(large) >= 2 and not any(large)  # queued by reference, never waited for one by one
    assert Checkpointer(policy(), tmp_path).latest().verified is True


def test_a_chunk_from_foreign_memory_is_hashed_before_write_returns(tmp_path):
    buf = bytearray(os.urandom(3 << 20))
    expected = hashlib.sha256(bytes(buf) + b"tail").hexdigest()  # the digest this test asks for

    def producer(f):
        f.write(memoryview(buf))
        buf[:] = bytes(len(buf))  # the caller reuses its buffer as soon as write returns
        f.write(b"tail")

    entry = writer.write_file(str(tmp_path / "f.bin"), writer.Producer(producer, [torch.zeros(1 << 20)]), "sha256")
    assert entry == {"size": (3 << 20) + 4, "sha256": expected}


def test_a_failed_write_waits_for_the_queued_hashing_before_raising(tmp_path, monkeypatch):
    tensor = torch.randn(1 << 20)
    drained = []
    real_drain = writer.HashingFile.drain

    def recording_drain(self):
        real_drain(self)
        drained.append(self._stream.h.copy().hexdigest())

    def producer(f):
        f.write(memoryview(tensor.numpy()).cast("B"))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer.HashingFile, "drain", recording_drain)
    with pytest.raises(OSError, match="No space"):
        writer.write_file(str(tmp_path / "f.bin"), writer.Producer(producer, [tensor]), "sha256")
    # Before the error left _write_file, the tensor's queued chunk had been hashed (its memory may go now).
    assert drained == [hashlib.sha256(tensor.numpy().tobytes()).hexdigest()]


def test_fresh_files_are_reread_through_a_map_with_the_same_result(tmp_path, monkeypatch):
    path = tmp_path / "data.bin"
    data = os.urandom((2 << 20) + 5)
    path.write_bytes(data)
    expected = (len(data), hashlib.sha256(data).hexdigest())
    assert digest.hash_file(path) == expected
    mapped = []
    real = digest.hash_mapped
    monkeypatch.setattr(digest, "hash_mapped", lambda f, algo: mapped.append(1) or real(f, algo))
    assert digest.hash_file(path) == expected and not mapped  # a file outside a write in progress: plain reads
    monkeypatch.setattr(layout, "INFLIGHT", {str(tmp_path)})
    assert digest.hash_file(path) == expected and mapped == [1]
    (tmp_path / "empty").write_bytes(b"")
    assert digest.hash_file(tmp_path / "empty") == (0, hashlib.sha256(b"").hexdigest())


def test_write_back_of_large_chunks_is_started_in_order_without_gaps(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(writer, "_START_WRITEBACK", lambda fd, offset, n, flags: calls.append((offset, n, flags)))
    tensors = [torch.randn(1 << 18), torch.randn(3 << 18)]  # 1 MiB and 3 MiB

    def producer(f):
        f.write(b"header")
        for t in tensors:
            f.write(memoryview(t.numpy()).cast("B"))
        f.write(b"tail")

    entry = writer.write_file(str(tmp_path / "f.bin"), writer.Producer(producer, tensors))
    assert entry["size"] == (tmp_path / "f.bin").stat().st_size == 6 + (4 << 20) + 4
    assert [(o, n) for o, n, _ in calls] == [(0, 6 + (1 << 20)), (6 + (1 << 20), 3 << 20)]
    assert {flags for _, _, flags in calls} == {2}  # SYNC_FILE_RANGE_WRITE: start, do not wait
