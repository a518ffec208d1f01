"""Real faults on the durable tier, against moto's S3 server: a SIGKILLed uploader, a server that stops.

* An uploading process is killed with SIGKILL at a random moment, 11 times (the last after one commit):
  the tier never shows a checkpoint without its marker, every listed one
  verifies, the next writer removes the leftovers, and a new node downloads
  the newest committed checkpoint bit for bit.
* The server stops in the middle of an upload and comes back: the upload is
  retried (one log line per retry) and completes; when it stays down, the
  failure is reported with the object's name once the retries are spent.
"""
from __future__ import annotations

import logging
import os
import random
import secrets
import signal
import subprocess
import sys
import threading
import time

import pytest
from remote_common import local_checkpoints, same_files
from s3_server import BUCKET
from store_common import REPO

from saverules.store.remote import MARKER, DurableTier
from saverules.store.remote.retry import Retries, RetriesExhausted

CHILD = str(REPO / "tests" / "helpers" / "remote_child.py")


def test_sigkill_during_uploads_never_leaves_a_checkpoint_without_its_marker(s3, tmp_path):
    [source] = local_checkpoints(tmp_path / "local", steps=(7,), size=3_000_000)  # 12 MB of tensors
    url = f"s3://{BUCKET}/killed-{secrets.token_hex(4)}"
    rng = random.Random(18)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with DurableTier(f"s3://{BUCKET}/timing-{secrets.token_hex(4)}") as probe:  # how long one upload takes here
        started = time.monotonic()
        probe.upload(source)
        one_upload = time.monotonic() - started
    saw_leftovers = 0
    for trial in range(11):
        child = subprocess.Popen([sys.executable, CHILD, "upload", url, str(source)], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, env=env, text=True, start_new_session=True)
        try:
            assert child.stdout.readline().strip() == "held", child.stderr.read()
            if trial == 10:  # the last run: one upload commits first, so that a new node has one to resume
                assert child.stdout.readline().startswith("committed "), child.stderr.read()
            time.sleep(rng.uniform(0.0, 2.5 * one_upload))
        finally:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            child.stdout.close()
            child.stderr.close()
        reader = DurableTier(url, writer=False)
        infos = reader.list(verify=True)
        assert all(i.verified is True for i in infos), (trial, [(i.name, i.error) for i in infos])
        for info in infos:
            assert reader.fs.exists(f"{reader.prefix(info.name)}/{MARKER}")
        saw_leftovers += bool(reader.leftovers())
        with DurableTier(url) as writer:  # the next writer: takes over the dead holder's lock, cleans up
            assert writer.lock.takeover is not None and "is dead" in writer.lock.takeover
            assert writer.leftovers() == []
            assert [i.name for i in writer.list()] == [i.name for i in infos], "clean-up touches no committed one"
    assert saw_leftovers, "no kill landed mid-upload: the trials did not test what they claim"
    with DurableTier(url) as tier:
        newest = tier.list()[-1]
        got = tier.download(newest.name, tmp_path / "new-node")
    assert same_files(got, source)


def test_the_server_stops_mid_upload_and_comes_back_the_upload_is_retried(s3, tmp_path, caplog):
    [source] = local_checkpoints(tmp_path / "local", steps=(3,), size=2_000_000)
    url = f"s3://{BUCKET}/outage-{secrets.token_hex(4)}"
    opts = {"config_kwargs": {"retries": {"max_attempts": 1}}}
    tier = DurableTier(url, opts, retries=Retries(attempts=8, first=0.25, longest=1.0))
    stopped = threading.Event()

    def outage(n: int) -> None:  # the first bytes read: the server goes down for 1.5 s
        if not stopped.is_set():
            stopped.set()
            s3.stop()
            threading.Timer(1.5, s3.start).start()

    caplog.set_level(logging.WARNING, logger="saverules.store")
    try:
        info = tier.upload(source, on_bytes=outage)
    finally:
        deadline = time.monotonic() + 10
        while s3._server is None and time.monotonic() < deadline:
            time.sleep(0.1)
    retries = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    assert retries and all(f"upload of {tier.root}/{source.name}/" in m for m in retries), retries
    assert info.step == 3
    [listed] = tier.list(verify=True)
    assert listed.verified is True
    tier.close()


def test_a_server_that_stays_down_is_reported_once_the_retries_are_spent(s3, tmp_path):
    [source] = local_checkpoints(tmp_path / "local", steps=(4,), size=1000)
    url = f"s3://{BUCKET}/down-{secrets.token_hex(4)}"
    opts = {"config_kwargs": {"retries": {"max_attempts": 1}}}
    tier = DurableTier(url, opts, retries=Retries(attempts=3, first=0.1, longest=0.2))
    s3.stop()
    try:
        with pytest.raises(RetriesExhausted, match=rf"of {tier.root}/{source.name}\S* failed 3 times; the "
                           "last time: Could not connect to the endpoint URL") as err:
            tier.upload(source)
        assert err.value.attempts == 3
    finally:
        s3.start()
    assert tier.list() == [], "nothing half-uploaded is visible"
    tier.upload(source)  # a later promotion tries again
    assert [i.step for i in tier.list(verify=True)] == [4]
    tier.close()
