"""An S3-compatible server on 127.0.0.1 for the remote-store tests (moto's server).

One server per test session on a free port; every test gets its own bucket and the usual
AWS environment variables (credentials, region, ``AWS_ENDPOINT_URL``), so nothing leaves
the machine. The tests skip when ``moto[server]`` or ``s3fs`` is not installed
(``pip install -e ".[dev]"`` installs both).
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
from collections.abc import Iterator

import pytest

pytest.importorskip("s3fs", reason="remote stores need s3fs (pip install -e '.[dev]')")
moto_server = pytest.importorskip("moto.server", reason="needs moto[server] (the dev extra)")

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
_buckets = itertools.count()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """``http://127.0.0.1:<port>`` of a moto S3 server running for the whole session."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The AWS environment variables pointing at the local server (also for subprocesses)."""
    env = {**CREDENTIALS, "AWS_ENDPOINT_URL": s3_endpoint}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(key, raising=False)
    return env


@pytest.fixture
def bucket(s3_env: dict[str, str]) -> str:
    """``s3://<bucket>``: a new, empty bucket on the local server for this test."""
    import s3fs

    name = f"lb-test-{os.getpid()}-{next(_buckets)}"
    fs = s3fs.S3FileSystem(endpoint_url=s3_env["AWS_ENDPOINT_URL"], skip_instance_cache=True)
    fs.mkdir(name)
    return f"s3://{name}"
