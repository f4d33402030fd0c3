"""Real servers on 127.0.0.1 for the object-store tests: an S3 API (moto) and a web server.

Nothing of fsspec is mocked: s3fs talks HTTP to moto's S3 server exactly as it would to AWS,
and fsspec's HTTP filesystem reads byte ranges from a real HTTP server.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import logging
import os
import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

#: Dummy credentials, in the environment variables botocore reads (the standard place).
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def s3_server() -> Iterator[str]:
    """Start moto's S3 server on a free port of 127.0.0.1; yield its endpoint URL.

    The credentials and ``AWS_ENDPOINT_URL`` are set in this process's environment for the
    duration, so that the driver, and worker processes started meanwhile, find the server
    where botocore looks; s3fs's cached filesystems are dropped at the start and the end.
    """
    from moto.server import ThreadedMotoServer
    from s3fs import S3FileSystem

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {name: os.environ.get(name) for name in [*CREDENTIALS, "AWS_ENDPOINT_URL"]}
    os.environ.update(CREDENTIALS, AWS_ENDPOINT_URL=endpoint)
    # s3fs keeps one filesystem per set of options: one made for an earlier server (another
    # test module's) would still talk to that server's port.
    S3FileSystem.clear_instance_cache()
    try:
        yield endpoint
    finally:
        S3FileSystem.clear_instance_cache()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        server.stop()


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Python's file server with ``Range`` requests (every real web server answers them)."""

    def log_message(self, *args) -> None:
        pass

    def send_head(self):
        found = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        path = Path(self.translate_path(self.path))
        if found is None or not path.is_file():
            return super().send_head()
        size = path.stat().st_size
        start = int(found.group(1))
        end = min(int(found.group(2) or size - 1), size - 1)
        handle = open(path, "rb")  # noqa: SIM115 (closed by the server after copyfile)
        handle.seek(start)
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        return _Limited(handle, end - start + 1)


class _Limited:
    """The first ``size`` bytes of a file, for ``copyfile``."""

    def __init__(self, handle, size: int) -> None:
        self.handle, self.left = handle, size

    def read(self, size: int = -1) -> bytes:
        size = self.left if size < 0 else min(size, self.left)
        data = self.handle.read(size)
        self.left -= len(data)
        return data

    def close(self) -> None:
        self.handle.close()


@contextlib.contextmanager
def http_server(folder: Path) -> Iterator[str]:
    """Serve ``folder`` over HTTP on 127.0.0.1 (with ranges); yield the base URL."""
    handler = functools.partial(_RangeHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
