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
from captures import fit

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
def s3_env() -> Iterator[dict[str, str]]:
    """A moto S3 server on 127.0.0.1 for the whole session, and the AWS environment
    variables pointing at it (set for this process and the subprocesses tests start)."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {**CREDENTIALS, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE"):
            patch.delenv(key, raising=False)
        try:
            yield env
        finally:
            server.stop()


def new_bucket(env: dict[str, str]) -> str:
    """``s3://<bucket>``: a new, empty bucket on the local server."""
    import s3fs

    name = f"lb-test-{os.getpid()}-{next(_buckets)}"
    fs = s3fs.S3FileSystem(endpoint_url=env["AWS_ENDPOINT_URL"], skip_instance_cache=True)
    fs.mkdir(name)
    return f"s3://{name}"


@pytest.fixture
def bucket(s3_env: dict[str, str]) -> str:
    """A new, empty bucket for this test."""
    return new_bucket(s3_env)


@pytest.fixture(scope="session")
def local_capture(tmp_path_factory):
    """The capture of :func:`captures.fit` into a local directory (the reference)."""
    from lightning_bergson import GradientStore

    path = tmp_path_factory.mktemp("local") / "grads.zarr"
    fit(path)
    return GradientStore.open(path)


@pytest.fixture(scope="session")
def remote_capture(s3_env):
    """The same capture into ``s3://<bucket>/run/grads.zarr`` on the local server."""
    from lightning_bergson import GradientStore

    url = f"{new_bucket(s3_env)}/run/grads.zarr"
    fit(url)
    return GradientStore.open(url)
