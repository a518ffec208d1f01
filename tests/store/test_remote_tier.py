"""The durable tier (saverules.store.remote) on moto's S3 server, file:// and memory://.

A committed local checkpoint is uploaded, listed, verified, downloaded bit for
bit, retained, and locked against a second writer; a checkpoint without its
commit marker is absent to readers and removed by the next writer.
"""
from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time

import pytest
import torch
from remote_common import local_checkpoints, same_files
from s3_server import BUCKET
from store_common import REPO, policy

import saverules
from saverules.store.errors import CheckpointError, StoreLockedError
from saverules.store.remote import MARKER, DurableTier, TransferError
from saverules.store.remote.lease import LOCK_OBJECT
from saverules.torch import Checkpointer

CHILD = str(REPO / "tests" / "helpers" / "remote_child.py")
#: Fail fast when the server is down: botocore's own retries would add seconds.
FAST = {"config_kwargs": {"retries": {"max_attempts": 1}}}


def test_upload_list_verify_download_bit_for_bit(url, tmp_path):
    local = local_checkpoints(tmp_path / "local")
    with DurableTier(url) as tier:
        sent = []
        for path in local:
            tier.upload(path, on_bytes=sent.append)
        assert sum(sent) == sum(p.stat().st_size for d in local for p in d.iterdir() if p.name != "manifest.json")
        infos = tier.list(verify=True)
        assert [i.step for i in infos] == [1, 2, 3]
        assert all(i.verified is True and i.error is None for i in infos)
        node = tmp_path / "new-node"
        got = tier.download(local[-1].name, node)
    assert same_files(got, local[-1])
    state = {"w": torch.zeros(50_000), "n": -1}
    with Checkpointer(policy(fmt="tensors"), dir=node, read_only=True) as ckpt:
        start = ckpt.load_latest(state)
    assert start.step == 3 and state["n"] == 3


def test_without_its_marker_a_checkpoint_is_absent_and_the_next_writer_removes_it(url, tmp_path):
    local = local_checkpoints(tmp_path / "local", steps=(1, 2))
    with DurableTier(url) as tier:
        for path in local:
            tier.upload(path)
        tier.fs.rm_file(f"{tier.prefix(local[-1].name)}/{MARKER}")
    reader = DurableTier(url, writer=False)
    assert [i.step for i in reader.list()] == [1]
    assert reader.leftovers() == [local[-1].name]
    with pytest.raises(TransferError, match="COMMITTED is missing"):
        reader.download(local[-1].name, tmp_path / "node")
    assert reader.leftovers() == [local[-1].name], "a reader never removes anything"
    with DurableTier(url) as writer:
        assert writer.leftovers() == []
        assert [i.step for i in writer.list()] == [1]


def test_a_flipped_byte_fails_verification_and_download_with_a_named_reason(url, tmp_path):
    local = local_checkpoints(tmp_path / "local", steps=(1,))
    with DurableTier(url) as tier:
        tier.upload(local[0])
        obj = f"{tier.prefix(local[0].name)}/tensors.safetensors"
        data = bytearray(tier.fs.cat_file(obj))
        data[len(data) // 2] ^= 0x01
        tier.fs.pipe_file(obj, bytes(data))
        [info] = tier.list(verify=True)
        assert info.verified is False
        assert info.error == "tensors.safetensors does not match its xxh3_128 digest (damaged)"
        with pytest.raises(TransferError, match=r"tensors.safetensors does not match its xxh3_128 digest"):
            tier.download(local[0].name, tmp_path / "node")
    assert not [p for p in (tmp_path / "node").iterdir()], "nothing half-downloaded stays behind"


def test_retention_keeps_its_set_the_newest_and_the_protected(url, tmp_path):
    local = local_checkpoints(tmp_path / "local", steps=(1, 2, 3, 4, 5), size=100)
    keep_last_2 = saverules.loads("version = 1\n[[rules]]\nkind = 'every_steps'\nevery = 1\n[retention]\nkeep_last = 2\n")
    with DurableTier(url) as tier:
        for path in local:
            tier.upload(path)
        gone = tier.retain(keep_last_2, protected={local[0].name})
        assert gone == [local[1].name, local[2].name]
        assert [i.step for i in tier.list()] == [1, 4, 5]
        assert tier.leftovers() == []


def test_credentials_in_the_storage_options_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="'secret', a credential.*AWS_SECRET_ACCESS_KEY"):
        DurableTier(f"file://{tmp_path}", {"secret": "x"})


def test_an_unreachable_tier_is_a_clear_error_at_once():
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    dead = f"http://127.0.0.1:{port.getsockname()[1]}"
    port.close()
    opts = dict(FAST, endpoint_url=dead, anon=True)
    started = time.monotonic()
    with pytest.raises(CheckpointError, match=r"durable tier s3://nowhere/run cannot be written .*Could not connect.*AWS_ENDPOINT_URL"):
        DurableTier("s3://nowhere/run", opts)
    assert time.monotonic() - started < 60


def _child(*args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, CHILD, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, text=True)


@pytest.mark.parametrize("backend", ["s3", "file"])  # memory:// lives inside one process: no second can see it
def test_a_second_writer_process_is_refused_and_names_the_holder(backend, request, tmp_path):
    if backend == "s3":
        request.getfixturevalue("s3")
        url = f"s3://{BUCKET}/second-{secrets.token_hex(4)}"
    else:
        url = f"file://{tmp_path}/durable"
    with DurableTier(url) as tier:
        child = _child("hold", url)
        out, err = child.communicate(timeout=120)
        assert child.returncode == 3, (out, err)
        assert f"is being written by pid {os.getpid()} on host {socket.gethostname()}, since " in err
        holder = json.loads(tier.fs.cat_file(f"{tier.root}/{LOCK_OBJECT}"))
        assert holder["since"] in err
    with pytest.raises(StoreLockedError):
        with DurableTier(url):
            DurableTier(url)


def test_a_dead_holder_on_this_host_is_taken_over_at_once(s3):
    url = f"s3://{BUCKET}/dead-{secrets.token_hex(4)}"
    child = _child("hold", url)
    assert child.stdout.readline().strip() == "held"
    child.kill()
    child.wait()
    with DurableTier(url) as tier:
        assert tier.lock.previous["pid"] == child.pid
        assert "is dead" in tier.lock.takeover


def test_a_holder_on_another_host_is_taken_over_only_when_its_lease_expired(s3):
    url = f"s3://{BUCKET}/lease-{secrets.token_hex(4)}"
    reader = DurableTier(url, writer=False)
    lock = f"{reader.root}/{LOCK_OBJECT}"
    other = {"pid": 7, "host": "gpu-node-9", "since": "2026-12-01T10:00:00+00:00", "lease": 60, "token": "t"}
    reader.fs.pipe_file(lock, json.dumps(dict(other, renewed=time.time())).encode())
    with pytest.raises(StoreLockedError, match="pid 7 on host gpu-node-9, since 2026-12-01T10:00:00"):
        DurableTier(url)
    reader.fs.pipe_file(lock, json.dumps(dict(other, renewed=time.time() - 120)).encode())
    with DurableTier(url) as tier:
        assert "lease of 60s expired" in tier.lock.takeover
        mine = json.loads(tier.fs.cat_file(lock))
        assert mine["pid"] == os.getpid() and mine["host"] == socket.gethostname()
    assert not reader.fs.exists(lock), "a writer that closes lets go of the lock"


def test_the_holder_renews_its_lease(s3, monkeypatch):
    monkeypatch.setenv("SAVERULES_LEASE_SECONDS", "1.5")
    url = f"s3://{BUCKET}/renew-{secrets.token_hex(4)}"
    with DurableTier(url) as tier:
        first = json.loads(tier.fs.cat_file(f"{tier.root}/{LOCK_OBJECT}"))["renewed"]
        time.sleep(1.5)
        tier.fs.invalidate_cache()
        later = json.loads(tier.fs.cat_file(f"{tier.root}/{LOCK_OBJECT}"))["renewed"]
        assert later > first


def test_a_file_larger_than_one_part_streams_in_parts_with_its_digest_checked(url, tmp_path, monkeypatch):
    from saverules.store.remote import transfer

    monkeypatch.setattr(transfer, "PART", 5 << 20)  # the smallest part S3 accepts; the file takes three
    [local] = local_checkpoints(tmp_path / "local", steps=(1,), size=3_000_000)
    with DurableTier(url) as tier:
        tier.upload(local)
        [info] = tier.list(verify=True)
        assert info.verified is True
        got = tier.download(info.name, tmp_path / "node")
    assert same_files(got, local)
