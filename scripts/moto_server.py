"""A local S3 API server (moto's standalone server, what s3fs tests itself against), for the
object-storage tests and scripts/bench_sources.py."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from typing import Iterator


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """Start the server on a free 127.0.0.1 port, wait until it accepts connections, yield its
    endpoint URL, and stop it on exit."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait()
