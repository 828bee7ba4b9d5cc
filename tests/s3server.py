"""Fixtures for tests that need a real S3 server: moto's, in a thread on 127.0.0.1.

Load them with ``pytest_plugins = ["s3server"]`` in a test module. ``s3_endpoint`` starts
one server per test session (on a free port) and stops it at the end; ``aws_env`` points
boto3 at it with dummy credentials (and away from the developer's ``~/.aws``);
``s3_bucket`` makes a fresh bucket with a random name, so tests never share objects;
``s3_admin`` is a plain boto3 client of the server (to set up or tamper with objects);
``spare_s3_server`` starts a second server, for tests that stop it. Without moto
installed (``pip install "moto[server]"``) the tests that need it are skipped.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from moto.server import ThreadedMotoServer

#: The environment every test talking to the server runs with (besides AWS_ENDPOINT_URL).
DUMMY_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
}
#: Variables that would point boto3 elsewhere or add credentials.
CLEARED_AWS_ENV = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN",
                   "AWS_SECURITY_TOKEN", "AWS_REGION", "AWS_ENDPOINT_URL_S3",
                   "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE")


def start_moto() -> tuple[ThreadedMotoServer, str]:
    """A started moto server on 127.0.0.1 with a free port, and its endpoint URL."""
    pytest.importorskip("moto.server", reason='needs moto: pip install "moto[server]"')
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


def warm_up(endpoint: str) -> None:
    """Make the server import, now, every module it would otherwise import on its first S3
    request or its first moto-api call (about 90: the S3, IAM and STS backends). A module
    the server thread first imports during a test that uses ``pytester`` is dropped from
    ``sys.modules`` at that test's end (pytester restores its snapshot), and the next
    import makes a second copy beside the live one: moto then answers later requests with
    HTTP 500 (seen when the credentials check ran after a remote-tier test)."""
    import urllib.request

    client = s3_client(endpoint, aws_access_key_id="testing", aws_secret_access_key="testing")
    bucket = f"mlcjit-warm-up-{secrets.token_hex(6)}"
    client.create_bucket(Bucket=bucket)
    client.put_object(Bucket=bucket, Key="x", Body=b"x", IfNoneMatch="*")
    client.list_objects_v2(Bucket=bucket)
    client.delete_object(Bucket=bucket, Key="x")
    client.delete_bucket(Bucket=bucket)
    request = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", method="POST",
                                     data=b"inf", headers={"Content-Type": "text/plain"})
    with urllib.request.urlopen(request, timeout=30) as answer:  # no credentials check
        assert answer.status == 200


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """The endpoint URL of a moto S3 server running for the whole session (warmed up)."""
    werkzeug = logging.getLogger("werkzeug")
    level = werkzeug.level
    werkzeug.setLevel(logging.WARNING)  # not one log line per request
    server, endpoint = start_moto()
    try:
        warm_up(endpoint)
        yield endpoint
    finally:
        server.stop()
        werkzeug.setLevel(level)


@pytest.fixture
def aws_env(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Dummy credentials and ``AWS_ENDPOINT_URL`` set to the session's server (returned)."""
    for name in CLEARED_AWS_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in DUMMY_AWS_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    return s3_endpoint


def s3_client(endpoint: str, **session: str) -> Any:
    """A plain boto3 S3 client for ``endpoint`` (to set up or tamper with objects);
    ``session``: arguments of its ``boto3.session.Session`` (credentials)."""
    import boto3  # type: ignore[import-untyped]

    return boto3.session.Session(**session).client("s3", endpoint_url=endpoint,
                                                   region_name="us-east-1")


@pytest.fixture
def s3_admin(aws_env: str) -> Any:
    """A plain boto3 client of the session's server."""
    return s3_client(aws_env)


@pytest.fixture
def s3_bucket(s3_admin: Any) -> str:
    """The name of a new, empty bucket on the session's server."""
    name = f"mlcjit-test-{secrets.token_hex(6)}"
    s3_admin.create_bucket(Bucket=name)
    return name


@pytest.fixture
def spare_s3_server() -> Iterator[tuple[ThreadedMotoServer, str]]:
    """A second moto server of its own, and its endpoint; stopped at teardown if the test
    did not stop it."""
    server, endpoint = start_moto()
    try:
        yield server, endpoint
    finally:
        with contextlib.suppress(Exception):  # already stopped
            server.stop()
