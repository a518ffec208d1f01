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
"""
from __future__ import annotations

import os
import secrets
import shutil
import socket
import tempfile
import time
from pathlib import Path

from . import Row, interleaved, median, timed

NAME = "tiers"
GOAL = 0.9
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
    repeats = 2 if quick else 7
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
    ]
