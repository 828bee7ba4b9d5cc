"""Azurite, the Azure Storage emulator (npm package ``azurite``), as a test server.

Fixtures (load them with ``pytest_plugins = ["azurite"]`` in a test module):

* ``azurite``: an :class:`Azurite` blob server started on 127.0.0.1 (a free port), with its
  data in a temporary directory, one per test session, stopped at the end;
* ``azure_container``: a fresh container with a random name on it (tests never share
  objects), and :data:`ACCOUNT_ENV` plus ``AZURE_STORAGE_CONNECTION_STRING`` set.

The server is the one ``.ci/run`` installs (``npm ci --prefix tests/node``). Without it
(no node, or the packages not installed) the tests that need it are skipped, unless
``MLCJIT_REQUIRE_SERVERS=1`` (set by ``.ci/run``): then they fail, so CI never passes by
skipping them.

PYTEST_DONT_REWRITE: test modules import this module before pytest loads it as a plugin.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

#: Where .ci/run installs the npm packages the tests run.
NODE_DIR = Path(__file__).parent / "node"
#: Azurite's well-known development account (public; documented by Microsoft).
ACCOUNT = "devstoreaccount1"
ACCOUNT_KEY = ("Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/"
               "KBHBeksoGMGw==")


def require_servers() -> bool:
    """Whether a missing test server fails the test instead of skipping it (CI)."""
    return os.environ.get("MLCJIT_REQUIRE_SERVERS") == "1"


def missing(what: str) -> None:
    """Skip (or, under MLCJIT_REQUIRE_SERVERS=1, fail) for a test server that is missing."""
    message = f"{what}; install the test servers: npm ci --prefix tests/node"
    if require_servers():
        pytest.fail(message)
    pytest.skip(message)


def node_bin(name: str) -> Path:
    """An executable of the npm packages in tests/node (skips or fails when absent)."""
    path = NODE_DIR / "node_modules" / ".bin" / name
    if shutil.which("node") is None:
        missing("node is not installed")
    if not path.exists():
        missing(f"{path} is not installed")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Azurite:
    """A running Azurite blob service: its endpoint and connection string."""

    def __init__(self) -> None:
        self.data = Path(tempfile.mkdtemp(prefix="mlcjit-azurite-"))
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}/{ACCOUNT}"
        self.connection_string = (
            f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
            f"BlobEndpoint={self.endpoint};")
        self._log = open(self.data / "azurite.log", "wb")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            [str(node_bin("azurite-blob")), "--blobHost", "127.0.0.1", "--blobPort",
             str(self.port), "--location", str(self.data / "store"), "--skipApiVersionCheck",
             "--loose", "--silent"],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 60.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.process.poll() is not None:
                raise RuntimeError(f"azurite exited with {self.process.returncode}: "
                                   f"{(self.data / 'azurite.log').read_text(errors='replace')}")
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", self.port), timeout=1):
                return
            time.sleep(0.05)
        raise RuntimeError(f"azurite did not listen on port {self.port} within {timeout}s")

    def container(self) -> str:
        """A new, empty container with a random name."""
        from azure.storage.blob import BlobServiceClient

        name = f"t{secrets.token_hex(8)}"
        BlobServiceClient.from_connection_string(self.connection_string).create_container(name)
        return name

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()
        shutil.rmtree(self.data, ignore_errors=True)


@pytest.fixture(scope="session")
def azurite() -> Iterator[Azurite]:
    pytest.importorskip("azure.storage.blob",
                        reason='needs azure-storage-blob: pip install "pytest-mlcjit[azure]"')
    server = Azurite()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def azure_container(azurite: Azurite, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh container; AZURE_STORAGE_CONNECTION_STRING points at Azurite."""
    for name in ("AZURE_STORAGE_ACCOUNT", "AZURE_STORAGE_KEY", "AZURE_STORAGE_SAS_TOKEN",
                 "AZURE_STORAGE_ACCOUNT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite.connection_string)
    return azurite.container()
