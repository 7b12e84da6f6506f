"""A real S3-compatible server on loopback for the ``object_store`` tests: moto's server (moto[server]), started
in the pytest process and talked to through the real client (s3fs / botocore) by every process of a test.

The client finds it the standard way, through the environment (``AWS_ENDPOINT_URL_S3`` and the usual
credentials), never through a run YAML. Its objects live in this process's memory: ``stop()`` closes the
listening socket (clients get "connection refused", as from a store that is down) and ``start()`` listens
again on the same port with the same objects, as a durable store that came back.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from ds_face.runtime.spawn import free_port

logging.getLogger("werkzeug").setLevel(logging.ERROR)  # the server logs every request: thousands of lines


class S3Server:
    def __init__(self):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.bucket = f"faces-{self.port}"  # moto's objects live in this process: one bucket per server
        self.server = None
        self.env = {"AWS_ENDPOINT_URL_S3": self.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                    "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}

    def start(self) -> None:
        from moto.server import ThreadedMotoServer
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def filesystem(self):
        """A fresh s3fs client (no cached instance: a test may have changed the server since)."""
        import s3fs
        return s3fs.S3FileSystem(endpoint_url=self.endpoint, key="testing", secret="testing",
                                 skip_instance_cache=True)

    def url(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix}"

    def upload(self, directory: str | os.PathLike, prefix: str) -> str:
        """Every file of ``directory`` (flat, as data_prep writes a dataset) under ``prefix``; its URL."""
        fs = self.filesystem()
        for path in sorted(Path(directory).iterdir()):
            if path.is_file():
                fs.put_file(str(path), f"{self.bucket}/{prefix}/{path.name}")
        return self.url(prefix)


def serve(monkeypatch) -> S3Server:
    """A started server with its bucket, its environment set for this process and the ranks it starts."""
    server = S3Server()
    for key, value in server.env.items():
        monkeypatch.setenv(key, value)
    server.start()
    server.filesystem().mkdir(server.bucket)
    return server
