"""The Promoter (saverules.store.remote.promote): one upload at a time, the one-slot queue, failures, drain.

The uploads go to a real memory:// durable tier.  An upload is held back by a
strategy that waits for the test before it calls the tier's own upload (the
strategy is the Promoter's documented seam; a sharded store plugs in there).
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest
from remote_common import local_checkpoints
from tier_common import memory_url

from saverules.store.remote import DurableTier
from saverules.store.remote.promote import Promoter, Promotion, PromotionError
from saverules.store.remote.retry import Retries


class Gated:
    """An upload strategy that waits at a gate before uploading with the tier, and records what it uploaded."""

    def __init__(self, tier: DurableTier) -> None:
        self.tier = tier
        self.gate = threading.Event()
        self.started = threading.Event()
        self.uploaded: list[str] = []

    def __call__(self, path: Path, name: str, on_bytes) -> None:
        self.started.set()
        assert self.gate.wait(60), "the test never opened the gate"
        self.tier.upload(path, name, on_bytes=on_bytes)
        self.uploaded.append(name)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return local_checkpoints(tmp_path_factory.mktemp("local"), steps=(1, 2, 3, 4, 5), size=2_000)


def promotion(path: Path, **kw) -> Promotion:
    step = int(path.name.split("-")[-1])
    size = sum(p.stat().st_size for p in path.iterdir())
    return Promotion(name=path.name, step=step, path=path, reasons=("every_steps(every=1)",), size=size, **kw)


def test_a_newer_promotion_replaces_the_queued_one_and_the_log_names_both(ckpts, caplog):
    tier = DurableTier(memory_url())
    up = Gated(tier)
    p = Promoter(tier, up)
    try:
        p.enqueue(promotion(ckpts[0]))
        assert up.started.wait(30)
        p.enqueue(promotion(ckpts[1]))
        with caplog.at_level(logging.WARNING, logger="saverules.store"):
            replaced = p.enqueue(promotion(ckpts[2]))
        assert [r.step for r in replaced] == [2]
        assert "promotion of step 3" in caplog.text and "step 2" in caplog.text
        assert p.pending() == {ckpts[0].name, ckpts[2].name}
        assert p.drain(0.3, bar=False) is False  # the upload is held: not drained
        up.gate.set()
        assert p.drain(60, bar=False)
        assert up.uploaded == [ckpts[0].name, ckpts[2].name]
        assert tier.names() == [ckpts[0].name, ckpts[2].name]
        assert p.pending() == set()
        assert p.failures() == []
    finally:
        up.gate.set()
        p.close()
        tier.close()


@pytest.mark.parametrize("kind", ["signal", "final"])
def test_a_final_or_signal_promotion_is_never_replaced(ckpts, caplog, kind):
    tier = DurableTier(memory_url())
    up = Gated(tier)
    p = Promoter(tier, up)
    try:
        p.enqueue(promotion(ckpts[0]))
        assert up.started.wait(30)
        p.enqueue(promotion(ckpts[1], **{kind: True}))
        with caplog.at_level(logging.WARNING, logger="saverules.store"):
            replaced = p.enqueue(promotion(ckpts[2]))
            replaced += p.enqueue(promotion(ckpts[3]))  # replaces step 3, never step 2
        assert [r.step for r in replaced] == [3]
        assert "waits behind the queued promotion of step 2" in caplog.text
        assert ("the final save" if kind == "final" else "a signal save") in caplog.text
        assert p.pending() == {ckpts[0].name, ckpts[1].name, ckpts[3].name}
        up.gate.set()
        assert p.drain(60, bar=False)
        assert up.uploaded == [ckpts[0].name, ckpts[1].name, ckpts[3].name]
    finally:
        up.gate.set()
        p.close()
        tier.close()


def test_a_failing_upload_is_retried_with_a_log_line_each_time_then_kept_for_the_next_step(ckpts, caplog):
    tier = DurableTier(memory_url())
    calls: list[str] = []

    def refused(path: Path, name: str, on_bytes) -> None:
        calls.append(name)
        raise ConnectionError("the endpoint refused the connection")

    done: list[tuple[str, bool]] = []
    p = Promoter(tier, refused, Retries(attempts=3, first=0.01, longest=0.02),
                 on_done=lambda prom, err, secs: done.append((prom.name, err is None)))
    try:
        with caplog.at_level(logging.WARNING, logger="saverules.store"):
            p.enqueue(promotion(ckpts[0]))
            assert p.drain(60, bar=False)
        assert calls == [ckpts[0].name] * 3
        assert caplog.text.count("retry ") == 2  # one line per retry
        [failure] = p.failures()
        assert isinstance(failure, PromotionError)
        assert failure.promotion.step == 1
        assert "the endpoint refused the connection" in str(failure) and ckpts[0].name in str(failure)
        assert p.failures() == []  # taken once
        assert done == [(ckpts[0].name, False)]
        assert not p.reached(ckpts[0].name)
        assert tier.names() == []
    finally:
        p.close()
        tier.close()


def test_a_damaged_local_file_is_not_retried_and_nothing_is_committed(ckpts, tmp_path):
    import shutil

    copy = tmp_path / ckpts[4].name
    shutil.copytree(ckpts[4], copy)
    victim = next(f for f in copy.iterdir() if f.name != "manifest.json")
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    tier = DurableTier(memory_url())
    p = Promoter(tier, retries=Retries(attempts=3, first=0.01))
    try:
        p.enqueue(promotion(copy))
        assert p.drain(60, bar=False)
        [failure] = p.failures()
        assert "since it was committed" in str(failure) and victim.name in str(failure)
        assert tier.names() == []
    finally:
        p.close()
        tier.close()


def test_drain_shows_a_bar_in_bytes(ckpts, capsys):
    tier = DurableTier(memory_url())
    up = Gated(tier)
    p = Promoter(tier, up)
    try:
        p.enqueue(promotion(ckpts[0]))
        assert up.started.wait(30)
        threading.Timer(0.5, up.gate.set).start()
        assert p.drain(60)
        err = capsys.readouterr().err
        assert "saverules: uploading" in err and "B" in err
    finally:
        up.gate.set()
        p.close()
        tier.close()
