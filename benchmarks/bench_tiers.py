"""The durable tier's upload and download throughput against s3fs's own ``put`` and ``get`` of the same files.

A committed local checkpoint (one tensor of 64 MB, 4 MB with ``--quick``) is
uploaded to moto's standalone S3 server on 127.0.0.1, alternately by
:meth:`saverules.store.remote.DurableTier.upload` (each object hashed as it
streams and compared with the manifest, then the manifest, then the commit
marker) and by ``s3fs.S3FileSystem.put(dir, recursive=True)`` (the same files,
no check).  Then a committed durable checkpoint is downloaded, alternately by
:meth:`~saverules.store.remote.DurableTier.download` (the marker and manifest
checked, every object hashed as it streams in, fsynced, the directory renamed
into place) and by ``s3fs.S3FileSystem.get(prefix, dir, recursive=True)`` of
the same objects (no check, no fsync), each into a fresh directory.
Interleaved and repeated; the medians of the throughput are compared.  The server runs in this process, so both variants share its cost
equally; the figures say how much the checks and the commit cost, not what a
real object store sustains.

Then the training-thread stall of a save that is promoted to the durable tier
against the same save without a durable tier: ``Checkpointer.step`` on a step
the policy saves (synchronous, the same state), with ``durable=`` a moto
server in a process of its own (as a real endpoint is) and without; only the
call is timed.  Each sample is one fresh
Checkpointer (made and closed untimed, so each promotion's upload has finished
before the next sample starts and never competes with it), interleaved and
repeated; the medians and each round's ratio are reported.
"""
from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import Row, interleaved, median, timed

NAME = "tiers"
GOAL = 0.9
STALL_GOAL = 1.05  # a promoted save's stall / the same local save's stall
BUCKET = "saverules-bench"


def _server():
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            time.sleep(0.05)
    return server, port


def run(quick: bool = False) -> list:
    try:
        import s3fs
        import torch
    except ImportError as exc:
        return [Row(NAME, "upload throughput", None, "MB/s", note=f"{exc.name} is not installed: not measured")]
    import logging

    import saverules
    from saverules import Progress
    from saverules.store.remote import DurableTier
    from saverules.torch import Checkpointer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    size = (4 if quick else 64) << 20
    repeats = 2 if quick else 11  # the shared machine is noisy: more rounds, medians compared
    server, port = _server()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        try:
            fs.mkdir(BUCKET)
        except FileExistsError:
            pass
        with tempfile.TemporaryDirectory(prefix="saverules-tiers-bench-") as tmp:
            policy = saverules.loads('version = 1\n[[rules]]\nkind = "every_steps"\nevery = 1\n')
            with Checkpointer(policy, dir=Path(tmp) / "local") as ckpt:
                ckpt.save(Progress(1), {"w": torch.randn(size // 4)})
                local = Path(ckpt.list()[-1].path)
            total = sum(p.stat().st_size for p in local.iterdir())
            tier = DurableTier(f"s3://{BUCKET}/ours-{secrets.token_hex(4)}")
            theirs = f"{BUCKET}/theirs-{secrets.token_hex(4)}"

            def ours() -> float:
                return total / timed(lambda: tier.upload(local, f"c-{secrets.token_hex(4)}")) / 1e6

            def put() -> float:
                dest = f"{theirs}/c-{secrets.token_hex(4)}"
                return total / timed(lambda: fs.put(str(local), dest, recursive=True)) / 1e6

            samples = interleaved({"ours": ours, "put": put}, repeats)

            durable = "resume"
            tier.upload(local, durable)
            down = Path(tmp) / "down"
            down.mkdir()

            def download() -> float:
                d = Path(tempfile.mkdtemp(dir=down))
                took = timed(lambda: tier.download(durable, d))
                shutil.rmtree(d)
                return total / took / 1e6

            def get() -> float:
                d = Path(tempfile.mkdtemp(dir=down))
                took = timed(lambda: fs.get(f"{tier.prefix(durable)}/", f"{d}/", recursive=True))
                got = sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
                shutil.rmtree(d)
                if got < total:
                    raise RuntimeError(f"s3fs get fetched {got} bytes of {total}")
                return total / took / 1e6

            down_samples = interleaved({"download": download, "get": get}, repeats)
            tier.close()
            stall = _stall(Path(tmp), size, repeats + 4)
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    a, b = median(samples["ours"]), median(samples["put"])
    ratio = a / b
    c, d = median(down_samples["download"]), median(down_samples["get"])
    down_ratio = c / d
    return [
        Row(NAME, f"DurableTier.upload ({total / 1e6:.0f} MB, digests checked, committed)", a, "MB/s",
            samples=samples["ours"]),
        Row(NAME, f"s3fs put of the same files ({total / 1e6:.0f} MB)", b, "MB/s", samples=samples["put"]),
        Row(NAME, "upload throughput vs s3fs put", ratio, "x", ratio=ratio, vs="s3fs put", goal=f">= {GOAL}x",
            met=ratio >= GOAL),
        Row(NAME, f"DurableTier.download ({total / 1e6:.0f} MB, digests checked while streaming, fsynced)", c,
            "MB/s", samples=down_samples["download"]),
        Row(NAME, f"s3fs get of the same objects ({total / 1e6:.0f} MB)", d, "MB/s", samples=down_samples["get"]),
        Row(NAME, "download throughput vs s3fs get", down_ratio, "x", ratio=down_ratio, vs="s3fs get",
            goal=f">= {GOAL}x", met=down_ratio >= GOAL),
        *stall,
    ]


STALL_POLICY = """\
version = 1
final = false
[[rules]]
kind = "every_steps"
every = 1
[retention]
keep_last = 1
"""
DURABLE = """\
[durable]
final = false
[[durable.rules]]
kind = "every_steps"
every = 1
[durable.retention]
keep_last = 1
"""


def _server_process() -> tuple[subprocess.Popen, int]:
    """moto's server in a process of its own, as a real endpoint is: its work does not share this process."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc, port
        except OSError:
            time.sleep(0.1)
    proc.kill()
    proc.wait()
    raise RuntimeError(f"moto's server did not start on port {port}")


def _stall(tmp: Path, size: int, repeats: int) -> list:
    """The training thread's stall in ``Checkpointer.step`` for a save, with and without a promotion.

    The uploads go to a moto server in another process: in this one, its request handling would
    compete with the training thread for the interpreter, which a real object store does not.
    """
    import s3fs

    server, port = _server_process()
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{port}"
    try:
        s3fs.S3FileSystem.clear_instance_cache()
        s3fs.S3FileSystem(skip_instance_cache=True).mkdir(BUCKET)
        return _measure_stall(tmp, size, repeats, f"s3://{BUCKET}/stall-{secrets.token_hex(4)}")
    finally:
        server.kill()
        server.wait()
        if endpoint is None:
            os.environ.pop("AWS_ENDPOINT_URL", None)
        else:
            os.environ["AWS_ENDPOINT_URL"] = endpoint
        s3fs.S3FileSystem.clear_instance_cache()


def _measure_stall(tmp: Path, size: int, repeats: int, url: str) -> list:
    import torch

    import saverules
    from saverules import Progress
    from saverules.torch import Checkpointer

    plain, tiered = saverules.loads(STALL_POLICY), saverules.loads(STALL_POLICY + DURABLE)
    state = {"w": torch.randn(size // 4), "n": 0}
    steps = iter(range(1, 10_000))

    cpu: dict[str, list[float]] = {"local": [], "promoted": []}

    def one(variant: str, policy: saverules.Policy, where: Path, **durable: str) -> float:
        step = next(steps)
        state["n"] = step
        ckpt = Checkpointer(policy, dir=where, **durable)
        try:
            t0, c0 = time.perf_counter(), time.thread_time()
            decision = ckpt.step(Progress(step), state)
            stalled, busy = time.perf_counter() - t0, time.thread_time() - c0
        finally:
            ckpt.close()  # untimed: waits for the upload, so the next sample starts on a quiet machine
        assert decision.save, decision
        cpu[variant].append(busy)
        return stalled

    samples = interleaved({
        "local": lambda: one("local", plain, tmp / "stall-local"),
        "promoted": lambda: one("promoted", tiered, tmp / "stall-tiered", durable=url),
    }, repeats)
    for variant in cpu:  # the warm-up round's
        del cpu[variant][0]
    local, promoted = median(samples["local"]), median(samples["promoted"])
    ratio = promoted / local
    rounds = [p / q for p, q in zip(samples["promoted"], samples["local"])]
    cpu_local, cpu_promoted = median(cpu["local"]), median(cpu["promoted"])
    mb = size / 1e6
    return [
        Row(NAME, f"save stall, local tier only (sync, {mb:.0f} MB)", local, "s", samples=samples["local"]),
        Row(NAME, f"save stall, the same save promoted to the durable tier (sync, {mb:.0f} MB)", promoted, "s",
            samples=samples["promoted"]),
        Row(NAME, "stall of a promoted save vs the same local save", ratio, "x", ratio=ratio,
            vs="the local save", goal=f"<= {STALL_GOAL}x", met=ratio <= STALL_GOAL,
            note=f"per round {min(rounds):.3f}x to {max(rounds):.3f}x over {len(rounds)} rounds"),
        Row(NAME, "training thread's CPU time in the save, local tier only", cpu_local, "s", samples=cpu["local"]),
        Row(NAME, "training thread's CPU time in the save, promoted", cpu_promoted, "s", samples=cpu["promoted"],
            ratio=cpu_promoted / cpu_local, vs="local only",
            note="time.thread_time(): the work the promotion adds to the training thread, without the waits "
                 "a loaded machine adds to the wall time"),
    ]
