"""Real servers, and real refusals, for the remote tests.

Fixtures (load them with ``pytest_plugins = ["s3server"]`` in a test module):

* ``s3_endpoint``: moto's S3 server in a thread on 127.0.0.1 (a free port), one per test
  session, warmed up, stopped at the end;
* ``aws_env``: dummy credentials and ``AWS_ENDPOINT_URL`` pointing boto3 at it (and away
  from the developer's ``~/.aws``);
* ``s3_bucket``: a fresh bucket with a random name, so tests never share objects;
  ``s3_admin``: a plain boto3 client of the server (to set up or tamper with objects);
* ``moto_auth``: makes the server check credentials, as AWS does (the dummy ones are then
  refused for real: ``InvalidAccessKeyId``);
* ``spare_s3_server``: a second door to the same storage (moto's state belongs to the
  process, so a bucket made through one server is seen through the other) that a test may
  stop and start again on the same port: a remote that goes down and comes back.

Classes and functions to import: :class:`Backdoor` (a remote's raw objects, behind its
back), :class:`ErrorServer` (answers as a failing S3 does, with S3's own XML error
documents, and counts requests), :class:`StallingServer` (accepts and never answers; tells
who hung up), :func:`closed_port` and :func:`permissions_enforced` (file permissions
refuse this thread for real, even as root).

Without moto installed (``pip install "moto[server]"``) the tests that need it are skipped.

PYTEST_DONT_REWRITE: test modules import this module before pytest loads it as their
plugin, so pytest must not expect to rewrite its asserts (it would warn, an error here).
"""

from __future__ import annotations

import contextlib
import ctypes
import http.server
import json
import logging
import os
import secrets
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from pytest_mlcjit.cache.store.remote import parse_remote_url

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


# -- moto ---------------------------------------------------------------------------------------
def start_moto(port: int = 0) -> tuple[ThreadedMotoServer, str]:
    """A started moto server on 127.0.0.1 (``port``, else a free one), and its endpoint."""
    pytest.importorskip("moto.server", reason='needs moto: pip install "moto[server]"')
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


def set_moto_auth(endpoint: str, count: str) -> None:
    """moto's /moto-api/reset-auth: check credentials after ``count`` more requests
    (``"0"``: from now on, as AWS does; ``"inf"``: never, moto's default)."""
    import urllib.request

    request = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", method="POST",
                                     data=count.encode(), headers={"Content-Type": "text/plain"})
    with urllib.request.urlopen(request, timeout=30) as answer:  # no credentials check
        assert answer.status == 200


def warm_up(endpoint: str) -> None:
    """Make the server import, now, every module it would otherwise import on its first S3
    request or its first moto-api call (about 90: the S3, IAM and STS backends). A module
    the server thread first imports during a test that uses ``pytester`` is dropped from
    ``sys.modules`` at that test's end (pytester restores its snapshot), and the next
    import makes a second copy beside the live one: moto then answers later requests with
    HTTP 500 (seen when the credentials check ran after a remote-tier test)."""
    client = s3_client(endpoint)
    bucket = f"mlcjit-warm-up-{secrets.token_hex(6)}"
    client.create_bucket(Bucket=bucket)
    client.put_object(Bucket=bucket, Key="x", Body=b"x", IfNoneMatch="*")
    client.list_objects_v2(Bucket=bucket)
    warm_up_iam(endpoint, bucket)
    client.delete_object(Bucket=bucket, Key="x")
    client.delete_bucket(Bucket=bucket)
    set_moto_auth(endpoint, "inf")


def read_only_user(endpoint: str, bucket: str) -> dict[str, str]:
    """A new IAM user of the server who may list and get ``bucket``'s objects and nothing
    else (checked once credentials are: :func:`set_moto_auth`); its access key."""
    import boto3  # type: ignore[import-untyped]

    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1",
                       aws_access_key_id=DUMMY_AWS_ENV["AWS_ACCESS_KEY_ID"],
                       aws_secret_access_key=DUMMY_AWS_ENV["AWS_SECRET_ACCESS_KEY"])
    user = f"reader-{bucket}"
    iam.create_user(UserName=user)
    iam.put_user_policy(UserName=user, PolicyName="read-only", PolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{
            "Effect": "Allow", "Action": ["s3:Get*", "s3:List*"],
            "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"]}]}))
    key: dict[str, str] = iam.create_access_key(UserName=user)["AccessKey"]
    return key


def warm_up_iam(endpoint: str, bucket: str) -> None:
    """The IAM backend and the policy checks, imported now (see :func:`warm_up`): a
    read-only user reads and is refused a write."""
    import boto3
    from botocore.exceptions import ClientError  # type: ignore[import-untyped]

    key = read_only_user(endpoint, bucket)
    reader = boto3.session.Session(aws_access_key_id=key["AccessKeyId"],
                                   aws_secret_access_key=key["SecretAccessKey"]).client(
        "s3", endpoint_url=endpoint, region_name="us-east-1")
    set_moto_auth(endpoint, "0")
    try:
        reader.list_objects_v2(Bucket=bucket)
        reader.get_object(Bucket=bucket, Key="x")["Body"].read()
        with contextlib.suppress(ClientError):
            reader.head_object(Bucket=bucket, Key="absent")
        with contextlib.suppress(ClientError):
            reader.put_object(Bucket=bucket, Key="y", Body=b"y")
    finally:
        set_moto_auth(endpoint, "inf")


def s3_client(endpoint: str) -> Any:
    """A plain boto3 S3 client for ``endpoint`` with the dummy credentials (to set up or
    tamper with objects)."""
    import boto3

    session = boto3.session.Session(aws_access_key_id=DUMMY_AWS_ENV["AWS_ACCESS_KEY_ID"],
                                    aws_secret_access_key=DUMMY_AWS_ENV["AWS_SECRET_ACCESS_KEY"])
    return session.client("s3", endpoint_url=endpoint, region_name="us-east-1")


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


@pytest.fixture(scope="session")
def _s3_admin_client(s3_endpoint: str) -> Any:
    """One admin client for the session: making a boto3 client parses S3's whole service
    model (a few tenths of a second of CPU each time)."""
    return s3_client(s3_endpoint)


@pytest.fixture
def s3_admin(aws_env: str, _s3_admin_client: Any) -> Any:
    """A plain boto3 client of the session's server."""
    return _s3_admin_client


@pytest.fixture
def s3_bucket(s3_admin: Any) -> str:
    """The name of a new, empty bucket on the session's server."""
    name = f"mlcjit-test-{secrets.token_hex(6)}"
    s3_admin.create_bucket(Bucket=name)
    return name


class MotoAuth:
    """Switches the session's moto server between checking credentials, as AWS does (the
    dummy ones are then unknown: ``InvalidAccessKeyId``), and not checking (its default)."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint

    def on(self) -> None:
        set_moto_auth(self.endpoint, "0")

    def off(self) -> None:
        set_moto_auth(self.endpoint, "inf")


@pytest.fixture
def moto_auth(aws_env: str) -> Iterator[MotoAuth]:
    """:class:`MotoAuth` for the session's server; checks are off again at teardown."""
    auth = MotoAuth(aws_env)
    try:
        yield auth
    finally:
        auth.off()


class SpareServer:
    """A moto server of its own on a fixed port, serving the same storage as the session's
    (moto keeps its state per process): :meth:`stop` it and the remote is down (connections
    refused), :meth:`start` it again and the remote is back, with everything it held."""

    def __init__(self) -> None:
        self.server, self.endpoint = start_moto()
        self.port = self.server.get_host_and_port()[1]
        self.running = True

    def stop(self) -> None:
        self.server.stop()
        self.running = False

    def start(self) -> None:
        self.server, endpoint = start_moto(self.port)
        assert endpoint == self.endpoint
        self.running = True


@pytest.fixture
def spare_s3_server(s3_endpoint: str) -> Iterator[SpareServer]:
    """A second moto server (:class:`SpareServer`); stopped at teardown if still running."""
    spare = SpareServer()
    try:
        yield spare
    finally:
        if spare.running:
            spare.stop()


# -- a remote's raw objects -------------------------------------------------------------------
class Backdoor:
    """Reads and writes a remote's raw objects behind its back (to tamper with them, or to
    see from the outside what the remote holds): an S3 bucket prefix through ``s3`` (a
    boto3 client) or a directory (``s3`` None)."""

    def __init__(self, url: str, s3: Any) -> None:
        self.url = url
        self.s3 = s3
        parsed = parse_remote_url(url)
        self.bucket, self.prefix, self.path = parsed.bucket, parsed.prefix, parsed.path

    def write(self, name: str, data: bytes) -> None:
        if self.s3 is None:
            path = Path(self.path, name)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        else:
            self.s3.put_object(Bucket=self.bucket, Key=self.prefix + name, Body=data)

    def read(self, name: str) -> bytes:
        if self.s3 is None:
            return Path(self.path, name).read_bytes()
        body = self.s3.get_object(Bucket=self.bucket, Key=self.prefix + name)["Body"]
        with body:
            data: bytes = body.read()
        return data

    def delete(self, name: str) -> None:
        if self.s3 is None:
            Path(self.path, name).unlink()
        else:
            self.s3.delete_object(Bucket=self.bucket, Key=self.prefix + name)

    def names(self) -> set[str]:
        """Every object's name under the remote's root (temp files included)."""
        if self.s3 is None:
            root = Path(self.path)
            return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
        listing = self.s3.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix)
        return {obj["Key"][len(self.prefix):] for obj in listing.get("Contents", ())}

    def snapshot(self) -> dict[str, bytes]:
        """Every object and its bytes."""
        return {name: self.read(name) for name in self.names()}


# -- servers that fail ------------------------------------------------------------------------
class ErrorServer:
    """An HTTP server on 127.0.0.1 that answers as a failing S3 does: every request gets
    :attr:`status` with S3's XML error document for :attr:`code` (no document when it is
    None: an answer from a proxy), except HEAD, answered 404 without a body (S3's "no such
    object"), so that an upload goes on to its PUT. boto3 parses these answers as it
    parses AWS's. ``requests`` records each request, ``"METHOD /path?query"``; set
    ``status`` and ``code`` to change the answer."""

    def __init__(self, status: int, code: str | None) -> None:
        self.status, self.code = status, code
        self.requests: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # answers "Expect: 100-continue", as S3 does

            def _answer(self) -> None:
                server.requests.append(f"{self.command} {self.path}")
                length = int(self.headers.get("Content-Length") or 0)
                if length and self.command != "HEAD":
                    self.rfile.read(length)
                body = b""
                answer, code = server.status, server.code
                if self.command == "HEAD":
                    answer = 404
                elif code is not None:
                    body = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>'
                            + code.encode() + b"</Code><Message>from the server</Message>"
                            b"<RequestId>4442587FB7D0A2F9</RequestId></Error>")
                self.send_response(answer)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _answer

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.01,),
                                       daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.thread.join()
        self.httpd.server_close()


class StallingServer:
    """A TCP server on 127.0.0.1 that accepts connections and never finishes an answer:
    after a request's headers it sends ``reply`` (if any), then waits for the client to
    hang up, at most ``patience`` seconds. ``accepted`` counts the connections,
    ``hangups`` records who closed each one, once it is closed: ``"client"`` (its timeout
    fired first) or ``"server"`` (the patience ran out first). With a patience between a
    client's configured timeout and its default, "client" shows that the configured
    timeout was the one applied, whatever the machine's speed."""

    def __init__(self, reply: bytes = b"", *, patience: float = 20.0) -> None:
        self.reply = reply
        self.patience = patience
        self.accepted = 0
        self.hangups: list[str] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.endpoint = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._serve, daemon=True)]
        self.threads[0].start()

    def settled(self) -> bool:
        """Whether every connection accepted so far is closed (and recorded)."""
        return len(self.hangups) == self.accepted

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.accepted += 1
            thread = threading.Thread(target=self._hold, args=(conn,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _hold(self, conn: socket.socket) -> None:
        deadline = time.monotonic() + self.patience
        conn.settimeout(0.05)
        with conn:
            request = b""
            who = "server"
            while not self.stopping.is_set() and time.monotonic() < deadline:
                try:
                    data = conn.recv(65536)
                except TimeoutError:
                    continue
                except OSError:  # reset by the client
                    who = "client"
                    break
                if not data:
                    who = "client"
                    break
                if b"\r\n\r\n" not in request:
                    request += data
                    if b"\r\n\r\n" in request and self.reply:
                        conn.sendall(self.reply)
            self.hangups.append(who)

    def close(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join()
        self.sock.close()


def closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens (connections are refused)."""
    with socket.create_server(("127.0.0.1", 0)) as sock:
        port: int = sock.getsockname()[1]
    return port


# -- file permissions, enforced for real --------------------------------------------------------
_CAP_VERSION_3 = 0x20080522
#: CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH: what lets root ignore file permissions.
_DAC_CAPS = (1 << 1) | (1 << 2)


class _CapHeader(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class _CapData(ctypes.Structure):
    _fields_ = (("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32))


@contextlib.contextmanager
def permissions_enforced() -> Iterator[None]:
    """File permissions refuse this thread inside the block, as they refuse an
    unprivileged user. Another user needs nothing; as root (who bypasses them), the two
    capabilities that bypass them are lowered from this thread's effective set for the
    block (capset(2): capabilities are per thread, so the rest of the process keeps
    them) and raised again after. Skips the test where that cannot be done."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        yield
        return
    if not sys.platform.startswith("linux"):
        pytest.skip("file permissions do not bind root here (capabilities are Linux's)")
    libc = ctypes.CDLL(None, use_errno=True)
    header = _CapHeader(_CAP_VERSION_3, 0)
    saved = (_CapData * 2)()
    if libc.capget(ctypes.byref(header), saved) != 0:
        pytest.skip(f"capget failed: {os.strerror(ctypes.get_errno())}")
    lowered = (_CapData * 2)()
    ctypes.memmove(lowered, saved, ctypes.sizeof(saved))
    lowered[0].effective &= ~_DAC_CAPS
    if libc.capset(ctypes.byref(header), lowered) != 0:
        pytest.skip(f"capset failed: {os.strerror(ctypes.get_errno())}")
    try:
        yield
    finally:
        assert libc.capset(ctypes.byref(header), saved) == 0, "capabilities not restored"
