"""moto's standalone S3 server on 127.0.0.1, for the durable tier's tests.

s3fs reaches it through ``AWS_ENDPOINT_URL``, exactly as it would reach AWS
(botocore reads that variable); the credentials are moto's dummies.  The
variables are set in ``os.environ``, so subprocesses started by a test reach
the same server.  Test fixtures, not part of saverules.
"""
from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

BUCKET = "saverules-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class S3Server:
    """One moto server; :meth:`stop` and :meth:`start` again on the same port keep the buckets (moto's state
    lives in this process)."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server = None

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"moto server did not start on port {self.port}")

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }


@contextmanager
def s3_server(bucket: str = BUCKET) -> Iterator[S3Server]:
    """A running server with ``bucket`` created and the AWS variables set; everything undone after."""
    server = S3Server()
    server.start()
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    try:
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        try:
            s3fs.S3FileSystem(skip_instance_cache=True).mkdir(bucket)
        except FileExistsError:  # moto's state is per process: an earlier server of this process made it
            pass
        yield server
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
