"""The Azure Blob Storage remote (``az://CONTAINER[/PREFIX]``,
pytest_mlcjit/cache/store/remote/azure.py).

Against Azurite, the Azure Storage emulator (tests/azurite.py, the ``servers`` tier: it
starts node): the storage interface (publish, list, download, verify, prune, the
create-only race, a tampered blob, a planted blob that must not count as present, a
reused blob touched rather than rewritten, refused credentials, a missing container, a
server that trickles) and the plugin end to end (machine A uploads, machine B compiles
nothing; two machines cold at once; READONLY writes nothing). What the container holds is
read with the Azure SDK directly, never through the adapter; compiles are counted by the
factory. Bad input needs no server (default tier): malformed URLs, missing credentials or
SDK, and secrets that must never reach a message.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

with contextlib.suppress(ImportError):  # before any pytester snapshot (see conftest.py)
    import azure.storage.blob  # noqa: F401
    import requests  # noqa: F401
from azurite import ACCOUNT, ACCOUNT_KEY, Azurite, free_port
from test_remote_store import ENTRY, ENTRY2, KEY, dest_in, make_library, publish_at_once
from trickle import TrickleProxy

from conftest import Project, run_cli, wait_until
from pytest_mlcjit.cache.store.remote import open_remote, parse_remote_url
from pytest_mlcjit.cache.store.remote.azure import EXTRA_HINT, AzureRemote, require_azure
from pytest_mlcjit.errors import (
    RemoteAuthError,
    RemoteConfigError,
    RemoteError,
    RemoteIntegrityError,
    RemoteUnavailableError,
)

pytest_plugins = ["azurite"]

CONFIGS = [{"hidden": 4}, {"hidden": 6}]
AZURE_ENV = ("AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_ACCOUNT", "AZURE_STORAGE_KEY",
             "AZURE_STORAGE_SAS_TOKEN", "AZURE_STORAGE_ACCOUNT_URL")
servers = pytest.mark.servers


# -- helpers ----------------------------------------------------------------------------------
class Container:
    """A container of Azurite, read and written with the plain SDK (a backdoor)."""

    def __init__(self, azurite: Azurite, name: str) -> None:
        from azure.storage.blob import BlobServiceClient

        self.name = name
        self.client = BlobServiceClient.from_connection_string(
            azurite.connection_string).get_container_client(name)

    def blobs(self) -> dict[str, str]:
        """Every blob's name -> its ETag (any write changes it)."""
        return {b.name: b.etag for b in self.client.list_blobs()}

    def read(self, name: str) -> bytes:
        data: bytes = self.client.get_blob_client(name).download_blob().readall()
        return data

    def write(self, name: str, data: bytes, **kwargs: Any) -> None:
        self.client.get_blob_client(name).upload_blob(data, overwrite=True, **kwargs)

    def properties(self, name: str) -> Any:
        return self.client.get_blob_client(name).get_blob_properties()

    def manifests(self) -> dict[str, list[str]]:
        """Key digest -> the manifests stored for it (under the prefix ``ci/``)."""
        found: dict[str, list[str]] = {}
        for name in self.blobs():
            parts = name.split("/")
            if parts[:2] == ["ci", "entries"]:
                found.setdefault(parts[2], []).append(parts[3])
        return found


@pytest.fixture
def container(azurite: Azurite, azure_container: str) -> Container:
    return Container(azurite, azure_container)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No Azure variable set (whatever the developer's shell has)."""
    for name in AZURE_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


# -- bad input (no server) --------------------------------------------------------------------
@pytest.mark.parametrize(("url", "why"), [
    ("az://", "names no container"),
    ("az://ab", "not a valid container name"),
    ("az://Upper-case", "not a valid container name"),
    ("az://double--hyphen", "not a valid container name"),
    ("az://-leading", "not a valid container name"),
    ("az://trailing-", "not a valid container name"),
    ("az://under_score", "not a valid container name"),
    ("az://" + "c" * 64, "not a valid container name"),
    ("az://cont:10000/x", "not a valid container name"),
    ("az://cont/a/../b", "'..' segments"),
    ("az://cont/a//b", "empty"),
])
def test_a_malformed_az_url_names_the_value_and_the_valid_form(url: str, why: str) -> None:
    with pytest.raises(RemoteConfigError) as info:
        parse_remote_url(url)
    message = str(info.value)
    assert repr(url) in message, message
    assert why in message, message
    assert "az://CONTAINER[/PREFIX]" in message, message


def test_credentials_never_go_in_an_az_url_and_are_never_shown() -> None:
    for url, secret in [("az://account:S3CRETKEY@cont/x", "S3CRETKEY"),
                        ("az://cont/x?sv=2024-01-01&sp=r&sig=S3CRETSIG", "S3CRETSIG")]:
        with pytest.raises(RemoteConfigError) as info:
            parse_remote_url(url)
        assert secret not in str(info.value), info.value


def test_well_formed_az_urls() -> None:
    url = parse_remote_url("az://my-cache-01/team/ci/")
    assert (url.scheme, url.bucket, url.prefix, url.redacted) == (
        "az", "my-cache-01", "team/ci/", "az://my-cache-01/team/ci")
    assert parse_remote_url("az://abc").redacted == "az://abc"


def test_missing_credentials_name_the_variables_through_the_cli_and_pytest(
        project: Project, clean_env: pytest.MonkeyPatch) -> None:
    """Nothing in the environment: ``remote ls`` is a usage error (exit 2) naming every
    variable, and so is a pytest run, at start; the account without a key or SAS names
    what is missing; never a traceback."""
    ran = run_cli("remote", "ls", "--remote", "az://cache/ci")
    assert ran.returncode == 2, ran
    for name in ("AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_ACCOUNT",
                 "AZURE_STORAGE_KEY", "AZURE_STORAGE_SAS_TOKEN"):
        assert name in ran.stderr, ran.stderr
    assert "Traceback" not in ran.stderr + ran.stdout

    clean_env.setenv("AZURE_STORAGE_ACCOUNT", "myaccount")
    ran = run_cli("remote", "ls", "--remote", "az://cache/ci")
    assert ran.returncode == 2, ran
    assert "AZURE_STORAGE_ACCOUNT is set, but no credential" in ran.stderr, ran.stderr
    assert "AZURE_STORAGE_KEY or AZURE_STORAGE_SAS_TOKEN" in ran.stderr, ran.stderr

    project.write_tests(CONFIGS[:1])
    result = project.run("--mlc-jit-remote=az://cache/ci")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    err = result.stderr.str()
    assert "AZURE_STORAGE_KEY or AZURE_STORAGE_SAS_TOKEN" in err, err
    clean_env.delenv("AZURE_STORAGE_ACCOUNT")
    result = project.run("--mlc-jit-remote=az://Bad_Name/ci")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    err = result.stderr.str()
    assert "invalid --mlc-jit-remote" in err, err
    assert "'Bad_Name' is not a valid container name" in err, err
    assert project.compiles() == []


def test_without_the_sdk_an_az_remote_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """azure-storage-blob not importable (hidden from the import system here: it is
    installed in the test environment)."""
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", "UseDevelopmentStorage=true")
    monkeypatch.setitem(sys.modules, "azure.storage.blob", None)
    with pytest.raises(RemoteConfigError, match="needs azure-storage-blob") as info:
        require_azure()
    assert EXTRA_HINT in str(info.value)
    with pytest.raises(RemoteConfigError, match="needs azure-storage-blob") as info:
        open_remote("az://cache/ci")
    assert EXTRA_HINT in str(info.value)


def test_secrets_never_reach_a_message(clean_env: pytest.MonkeyPatch) -> None:
    """A SAS token sent to an endpoint where nothing listens: the connection error names
    the object, never the SAS signature; a malformed connection string is a config error
    that shows none of its account key."""
    clean_env.setenv("AZURE_STORAGE_ACCOUNT", ACCOUNT)
    clean_env.setenv("AZURE_STORAGE_ACCOUNT_URL", f"http://127.0.0.1:{free_port()}/{ACCOUNT}")
    clean_env.setenv("AZURE_STORAGE_SAS_TOKEN", "?sv=2024-01-01&sp=rl&sig=S3CRETSIG%3D")
    remote = open_remote("az://cache/ci", retries=0, connect_timeout=2)
    assert isinstance(remote, AzureRemote)
    assert "AZURE_STORAGE_SAS_TOKEN" in remote.describe()
    with pytest.raises(RemoteUnavailableError) as info:
        remote.list_manifests(KEY)
    message = str(info.value)
    assert "az://cache/ci/entries/" in message, message
    assert "S3CRETSIG" not in message, message

    clean_env.setenv("AZURE_STORAGE_CONNECTION_STRING", "AccountKey=S3CRETKEY;junk")
    with pytest.raises(RemoteConfigError) as cfg:
        open_remote("az://cache/ci")
    assert "AZURE_STORAGE_CONNECTION_STRING" in str(cfg.value)
    assert "S3CRETKEY" not in str(cfg.value), cfg.value


def test_only_an_existing_manifest_loses_a_create_only_put(
        clean_env: pytest.MonkeyPatch) -> None:
    """A create-only put refused because the manifest exists (409 BlobAlreadyExists) lost a
    race: False. Refused for anything else (409 ContainerBeingDeleted, which Azurite cannot
    produce: the SDK's call is replaced by one raising the SDK's own exception) is a write
    not made: an error, never "another publisher won"."""
    from azure.core.exceptions import ResourceExistsError

    clean_env.setenv("AZURE_STORAGE_CONNECTION_STRING",
                     f"AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
                     f"BlobEndpoint=http://127.0.0.1:{free_port()}/{ACCOUNT};")
    remote = open_remote("az://cache/ci")
    assert isinstance(remote, AzureRemote)
    name = f"entries/{KEY}/{ENTRY}.json"

    def refused(code: str) -> Any:
        def upload_blob(*args: Any, **kwargs: Any) -> None:
            exc = ResourceExistsError(message=f"refused: {code}")
            vars(exc).update(error_code=code, status_code=409)  # as the SDK sets them
            raise exc
        return type("Blob", (), {"upload_blob": staticmethod(upload_blob)})()

    clean_env.setattr(remote, "_blob", lambda _: refused("BlobAlreadyExists"))
    assert remote._put_manifest(name, b"{}", create_only=True) is False
    clean_env.setattr(remote, "_blob", lambda _: refused("ContainerBeingDeleted"))
    with pytest.raises(RemoteError, match="ContainerBeingDeleted"):
        remote._put_manifest(name, b"{}", create_only=True)


# -- the storage interface, against Azurite ----------------------------------------------------
@servers
def test_upload_list_download_verify_prune(container: Container, tmp_path: Path) -> None:
    remote = open_remote(f"az://{container.name}/ci")
    library, manifest = make_library(tmp_path / "build", os.urandom(9 << 20))  # > 2 ranges
    assert remote.list_manifests(KEY) == []

    assert remote.upload(KEY, ENTRY, library, manifest) is True

    blob, entry_name = f"ci/blobs/{manifest['sha256']}", f"ci/entries/{KEY}/{ENTRY}.json"
    assert set(container.blobs()) == {blob, entry_name}
    assert container.read(blob) == library.read_bytes()
    [entry] = remote.list_manifests(KEY)
    assert entry.usable, entry.problem
    assert entry.manifest == manifest
    assert entry.location == f"az://{container.name}/{entry_name}"
    dest = remote.download(manifest, dest_in(tmp_path))
    assert dest.read_bytes() == library.read_bytes()
    assert remote.verify() == []
    stat = remote._stat(f"blobs/{manifest['sha256']}")
    assert stat is not None
    assert stat.size == manifest["size"]
    assert remote._stat("blobs/absent") is None

    removed = remote.prune(0, blob_grace_seconds=0)
    assert {r.rsplit("/", 2)[-2] for r in removed} == {"blobs", KEY}, removed
    assert container.blobs() == {}


@servers
def test_concurrent_uploads_of_one_entry_have_exactly_one_winner(
        container: Container, tmp_path: Path) -> None:
    """Four writers publish different libraries as one entry at the same instant: the
    create-only put (If-None-Match: *) lets exactly one win; the entry is the winner's."""
    publish_at_once(f"az://{container.name}/ci", tmp_path, writers=4)


@servers
def test_a_tampered_blob_is_refused_and_verify_reports_it(
        container: Container, tmp_path: Path) -> None:
    remote = open_remote(f"az://{container.name}/ci")
    library, manifest = make_library(tmp_path, os.urandom(300_000))
    assert remote.upload(KEY, ENTRY, library, manifest)
    blob = f"ci/blobs/{manifest['sha256']}"
    tampered = bytearray(container.read(blob))
    tampered[len(tampered) // 2] ^= 0xFF
    container.write(blob, bytes(tampered))

    dest = dest_in(tmp_path)
    with pytest.raises(RemoteIntegrityError, match="is corrupt"):
        remote.download(manifest, dest)
    assert not dest.exists()
    [bad] = remote.verify()
    assert bad.entry_digest == ENTRY
    assert "corrupt" in (bad.problem or ""), bad.problem
    # Publishing the entry again (it exists: the manifest put loses) repairs the blob.
    assert remote.upload(KEY, ENTRY, library, manifest) is False
    assert container.read(blob) == library.read_bytes()
    assert remote.verify() == []


@servers
def test_a_planted_blob_is_not_present_and_a_reused_one_is_touched(
        container: Container, tmp_path: Path) -> None:
    """blobs/<sha256> is predictable: a same-size blob planted there, claiming the right
    digest in every property a writer can set (our sha256 metadata, the library's
    Content-MD5), is not present: the publish overwrites it. A genuine blob is reused: its
    bytes are not sent again (the metadata the backdoor added survives), but it is written
    to (a new ETag), so that a prune's grace period keeps it."""
    remote = open_remote(f"az://{container.name}/ci")
    library, manifest = make_library(tmp_path, os.urandom(200_000))
    from azure.storage.blob import ContentSettings

    blob = f"ci/blobs/{manifest['sha256']}"
    md5 = bytearray(hashlib.md5(library.read_bytes()).digest())
    container.write(blob, os.urandom(manifest["size"]), metadata={"sha256": manifest["sha256"]})
    container.client.get_blob_client(blob).set_http_headers(ContentSettings(content_md5=md5))
    forged = container.properties(blob)
    assert forged.content_settings.content_md5 == md5, "the forgery did not take"
    assert forged.metadata == {"sha256": manifest["sha256"]}
    assert not remote._blob_present(f"blobs/{manifest['sha256']}", manifest["sha256"],
                                    manifest["size"])

    assert remote.upload(KEY, ENTRY, library, manifest) is True
    assert container.read(blob) == library.read_bytes()
    assert remote.download(manifest, dest_in(tmp_path)).read_bytes() == library.read_bytes()

    container.client.get_blob_client(blob).set_blob_metadata(
        {"sha256": manifest["sha256"], "mark": "kept"})
    before = container.properties(blob)
    assert remote.upload(KEY, ENTRY2, library, {**manifest}) is True
    after = container.properties(blob)
    assert after.metadata.get("mark") == "kept", "the blob was uploaded again"
    assert after.etag != before.etag, "the reused blob was not touched"
    assert container.read(blob) == library.read_bytes()


@servers
def test_refused_credentials_and_a_missing_container(
        azurite: Azurite, container: Container, monkeypatch: pytest.MonkeyPatch) -> None:
    """A wrong account key is an auth error (never a miss, never the key in the message);
    a container that does not exist is a config error naming it."""
    wrong = base64.b64encode(b"not the key" * 6).decode()
    assert wrong != ACCOUNT_KEY
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING",
                       azurite.connection_string.replace(ACCOUNT_KEY, wrong))
    with pytest.raises(RemoteAuthError, match="was refused") as info:
        open_remote(f"az://{container.name}/ci").list_manifests(KEY)
    assert wrong not in str(info.value)
    assert ACCOUNT_KEY not in str(info.value)

    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite.connection_string)
    with pytest.raises(RemoteConfigError, match="container 'absent-container' does not exist"):
        open_remote("az://absent-container/ci").list_manifests(KEY)


@pytest.fixture
def trickling(azurite: Azurite, container: Container, monkeypatch: pytest.MonkeyPatch
              ) -> Iterator[TrickleProxy]:
    """A proxy in front of Azurite (tests/trickle.py) that sends the body of a blob's
    download or of a listing one byte at a time; set as the account's endpoint."""
    upstream = azurite.endpoint.rsplit("/", 1)[0]
    proxy = TrickleProxy(upstream, rf"^GET /{ACCOUNT}/{container.name}(/ci/blobs/|\?.*comp=list)")
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite.connection_string.replace(
        azurite.endpoint, f"{proxy.endpoint}/{ACCOUNT}"))
    try:
        yield proxy
    finally:
        proxy.close()


@servers
def test_a_trickling_download_and_listing_are_given_up_at_their_deadline(
        container: Container, trickling: TrickleProxy, tmp_path: Path) -> None:
    """Each byte resets the read timeout: only the operation's deadline (1 s here) ends
    the wait; the download leaves no file."""
    writer = open_remote(f"az://{container.name}/ci")
    library, manifest = make_library(tmp_path, os.urandom(50_000))
    # The upload goes through the proxy too (a PUT or HEAD is not trickled).
    assert writer.upload(KEY, ENTRY, library, manifest)
    slow = open_remote(f"az://{container.name}/ci", deadline=1.0, min_throughput=1e9,
                       retries=0)
    dest = dest_in(tmp_path)
    with pytest.raises(RemoteUnavailableError, match="did not finish within its deadline"
                       ) as info:
        slow.download(manifest, dest)
    assert "downloading" in str(info.value)
    assert not dest.exists()
    with pytest.raises(RemoteUnavailableError, match="did not finish within its deadline"
                       ) as info:
        slow.list_manifests(KEY)
    assert "listing" in str(info.value)
    assert trickling.trickled == 2
    wait_until(lambda: trickling.hangups == 2, "the client to hang up the trickles")


# -- end to end, through the plugin --------------------------------------------------------------
def machine(project: Project, name: str) -> Project:
    """The same project as seen from another machine: a cache directory of its own."""
    return Project(project.pytester, project.cache.parent / f"cache-{name}", project.counter)


def run(project: Project, *args: str) -> tuple[int, str]:
    result = project.run("--mlc-device=cpu", "-p", "no:randomly", *args)
    return result.ret, result.stdout.str() + result.stderr.str()


@pytest.fixture
def az_remote(container: Container, monkeypatch: pytest.MonkeyPatch) -> Container:
    monkeypatch.setenv("MLC_JIT_REMOTE", f"az://{container.name}/ci")
    return container


@servers
def test_machine_b_compiles_nothing_and_readonly_writes_nothing(
        project: Project, az_remote: Container) -> None:
    """Machine A compiles and uploads; machine B (fresh cache, -n 2) downloads every
    library and compiles nothing; a READONLY machine on a read-only cache directory hits
    every library remotely and writes nothing to the container."""
    project.write_tests(CONFIGS, per_config=2)
    ret, out = run(machine(project, "a"))
    assert ret == 0, out
    assert len(project.compiles()) == len(CONFIGS)
    entries = az_remote.manifests()
    assert len(entries) == len(CONFIGS)
    assert all(len(names) == 1 for names in entries.values()), entries

    b = machine(project, "b")
    ret, out = run(b, "-n", "2")
    assert ret == 0, out
    assert len(project.compiles()) == len(CONFIGS), "machine B compiled"
    assert len(b.libraries()) == len(CONFIGS)

    before = az_remote.blobs()
    readonly = machine(project, "c")
    readonly.cache.mkdir(mode=0o555)
    ret, out = run(readonly, "--mlc-jit-policy=READONLY")
    assert ret == 0, out
    assert not list(readonly.cache.iterdir()), "READONLY wrote into the cache"
    assert len(project.compiles()) == len(CONFIGS)
    assert az_remote.blobs() == before, "READONLY wrote to the container"


@servers
def test_two_machines_cold_at_once_publish_one_entry_per_key(
        project: Project, az_remote: Container) -> None:
    """Two machines start cold on the same keys at the same moment: both pass, each
    library is compiled at most twice (once per machine), and the container holds exactly
    one valid entry per key."""
    project.write_tests(CONFIGS)
    procs = [subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:randomly",
         f"--mlc-jit-cache-dir={machine(project, name).cache}", "--mlc-device=cpu"],
        cwd=project.pytester.path, env=dict(os.environ), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True) for name in ("a", "b")]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    compiled = [line.split()[1] for line in project.compiles()]
    for config in CONFIGS:
        assert 1 <= compiled.count(f"hidden={config['hidden']}") <= 2, compiled
    entries = az_remote.manifests()
    assert len(entries) == len(CONFIGS)
    assert all(len(names) == 1 for names in entries.values()), entries
    ran = run_cli("remote", "verify")
    assert ran.returncode == 0, ran
