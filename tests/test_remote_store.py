"""The remotes (pytest_mlcjit.cache.store.remote) against a real S3 server (moto's, over
HTTP on 127.0.0.1) and a file:// directory: publishing, create-only races, integrity,
signatures, and how failures surface: each from a real answer (a refused connection, a
server that stalls, S3's XML error documents from a server of s3server.py, moto refusing
credentials, a directory the user may not read). What is asserted is what happened (the
error class, the requests the server saw, who hung up, the files left), never how long it
took."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from s3server import (
    Backdoor,
    ErrorServer,
    MotoAuth,
    StallingServer,
    closed_port,
    permissions_enforced,
)

from conftest import wait_until
from pytest_mlcjit.cache.store.remote import base as remote_base
from pytest_mlcjit.cache.store.remote import entries as remote_entries
from pytest_mlcjit.cache.store.remote import open_remote, parse_remote_url
from pytest_mlcjit.cache.store.remote.base import Remote, RemoteEntry
from pytest_mlcjit.cache.store.remote.file import FileRemote
from pytest_mlcjit.cache.store.remote.s3 import EXTRA_HINT, S3Remote
from pytest_mlcjit.cache.store.remote.signing import manifest_signature
from pytest_mlcjit.errors import (
    ConfigError,
    MlcJitError,
    RemoteAuthError,
    RemoteConfigError,
    RemoteError,
    RemoteIntegrityError,
    RemoteUnavailableError,
)

pytest_plugins = ["s3server"]

KEY = hashlib.sha256(b"key").hexdigest()
OTHER_KEY = hashlib.sha256(b"other key").hexdigest()
ENTRY = hashlib.sha256(b"entry").hexdigest()
ENTRY2 = hashlib.sha256(b"entry 2").hexdigest()
PREFIX = "team/cache"


# -- helpers ----------------------------------------------------------------------------------
@pytest.fixture(params=["s3", "file"])
def remote_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of a new, empty remote: a bucket prefix on moto, or a directory."""
    if request.param == "s3":
        return f"s3://{request.getfixturevalue('s3_bucket')}/{PREFIX}"
    root = tmp_path / "remote"
    root.mkdir()
    return root.as_uri()


@pytest.fixture
def backdoor(remote_url: str, request: pytest.FixtureRequest) -> Backdoor:
    s3 = request.getfixturevalue("s3_admin") if remote_url.startswith("s3:") else None
    return Backdoor(remote_url, s3)


def make_library(directory: Path, data: bytes, key: str = KEY,
                 created: float | None = None) -> tuple[Path, dict[str, Any]]:
    """A library file and the manifest the local cache would write for it."""
    directory.mkdir(parents=True, exist_ok=True)
    library = directory / f"{hashlib.sha256(data).hexdigest()[:12]}.so"
    library.write_bytes(data)
    manifest = {"digest": key, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
                "created": time.time() if created is None else created,
                "target": "llvm", "toolchain": {"version": "0.27", "ünïcode": "✓"}}
    return library, manifest


def usable(entries: list[RemoteEntry]) -> list[dict[str, Any]]:
    return [e.manifest for e in entries if e.usable and e.manifest is not None]


def published(remote: Remote, tmp_path: Path, data: bytes, *, key: str = KEY,
              entry: str = ENTRY, created: float | None = None) -> dict[str, Any]:
    library, manifest = make_library(tmp_path / "build" / entry[:8], data, key, created)
    assert remote.upload(key, entry, library, manifest)
    return manifest


def tails(locations: list[str]) -> list[str]:
    """The object names (``entries/…``, ``blobs/…``) at the end of remote URLs."""
    return [re.sub(r"^.*?/(?=(entries|blobs)/)", "", loc) for loc in locations]


def dest_in(tmp_path: Path) -> Path:
    staging = tmp_path / "staging"
    staging.mkdir(exist_ok=True)
    return staging / f"lib.{os.urandom(6).hex()}.so"


# -- round trip -------------------------------------------------------------------------------
def test_upload_list_download_round_trip(remote_url: str, tmp_path: Path,
                                         backdoor: Backdoor) -> None:
    remote = open_remote(remote_url, signing_key=None)
    library, manifest = make_library(tmp_path / "build", os.urandom(3 << 20))  # > one chunk
    assert remote.list_manifests(KEY) == []

    assert remote.upload(KEY, ENTRY, library, manifest) is True

    [entry] = remote.list_manifests(KEY)
    assert entry.usable
    assert entry.problem is None
    assert (entry.key_digest, entry.entry_digest) == (KEY, ENTRY)
    assert entry.manifest == manifest
    assert entry.location.endswith(f"entries/{KEY}/{ENTRY}.json")
    dest = remote.download(manifest, dest_in(tmp_path))
    assert dest.read_bytes() == library.read_bytes()
    assert remote.list_manifests(OTHER_KEY) == []
    assert [e.entry_digest for e in remote.iter_entries()] == [ENTRY]
    assert backdoor.names() == {f"blobs/{manifest['sha256']}", f"entries/{KEY}/{ENTRY}.json"}


def test_a_key_holds_several_entries(remote_url: str, tmp_path: Path) -> None:
    remote = open_remote(remote_url, signing_key=None)
    first = published(remote, tmp_path, b"variant one", entry=ENTRY2)
    second = published(remote, tmp_path, b"variant two", entry=ENTRY)

    entries = remote.list_manifests(KEY)

    assert [e.entry_digest for e in entries] == sorted([ENTRY, ENTRY2])
    assert sorted(usable(entries), key=lambda m: str(m["sha256"])) == sorted(
        [first, second], key=lambda m: str(m["sha256"]))


def test_the_s3_remote_lives_under_its_prefix(s3_bucket: str, aws_env: str, s3_admin: Any,
                                              tmp_path: Path) -> None:
    remote = open_remote(f"s3://{s3_bucket}/{PREFIX}/", signing_key=None)
    assert isinstance(remote, S3Remote)
    published(remote, tmp_path, b"bytes")
    keys = {o["Key"] for o in s3_admin.list_objects_v2(Bucket=s3_bucket)["Contents"]}
    assert all(k.startswith(f"{PREFIX}/") for k in keys), keys
    assert aws_env in remote.describe()  # the endpoint came from AWS_ENDPOINT_URL
    assert open_remote(f"s3://{s3_bucket}", signing_key=None).list_manifests(KEY) == []


def test_upload_refuses_a_library_that_does_not_match_its_manifest(
        remote_url: str, tmp_path: Path, backdoor: Backdoor) -> None:
    remote = open_remote(remote_url, signing_key=None)
    library, manifest = make_library(tmp_path, b"the real bytes")
    library.write_bytes(b"other bytes!!!")  # same size, other content

    with pytest.raises(RemoteIntegrityError, match="refusing to upload") as info:
        remote.upload(KEY, ENTRY, library, manifest)

    assert manifest["sha256"] in str(info.value)
    assert backdoor.names() == set()
    with pytest.raises(RemoteIntegrityError, match="is for key"):
        remote.upload(OTHER_KEY, ENTRY, *make_library(tmp_path, b"x"))
    library, keyless = make_library(tmp_path, b"x")
    del keyless["digest"]
    with pytest.raises(RemoteIntegrityError, match="is for key None"):
        remote.upload(KEY, ENTRY, library, keyless)
    with pytest.raises(RemoteConfigError, match=re.escape("invalid entry digest '../x'")):
        remote.upload(KEY, "../x", *make_library(tmp_path, b"x"))


# -- create-only publishing -------------------------------------------------------------------
def test_concurrent_uploads_of_one_entry_have_exactly_one_winner(remote_url: str,
                                                                 tmp_path: Path) -> None:
    """Four writers publish different libraries as the same entry at the same instant: one
    wins, the others are told, and the entry is the winner's, whole."""
    publish_at_once(remote_url, tmp_path, writers=4)


def publish_at_once(url: str, tmp_path: Path, *, writers: int) -> None:
    """``writers`` remotes at ``url`` publish different libraries as one entry at the same
    instant: exactly one upload returns True, the others False, and the entry listed and
    downloaded is the winner's, whole."""
    remotes = [open_remote(url, signing_key=None) for _ in range(writers)]
    builds = [make_library(tmp_path / f"w{i}", os.urandom(200_000)) for i in range(writers)]
    results: list[bool | BaseException] = [False] * writers
    barrier = threading.Barrier(writers)

    def publish(i: int) -> None:
        barrier.wait()
        try:
            results[i] = remotes[i].upload(KEY, ENTRY, *builds[i])
        except BaseException as exc:  # reported below, not lost in the thread
            results[i] = exc

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert sorted(map(repr, results)) == ["False"] * (writers - 1) + ["True"], results
    winner = results.index(True)
    [entry] = remotes[0].list_manifests(KEY)
    assert entry.manifest == builds[winner][1]
    dest = remotes[0].download(entry.manifest, dest_in(tmp_path))
    assert dest.read_bytes() == builds[winner][0].read_bytes()


def test_a_second_upload_changes_nothing_and_replace_overwrites(remote_url: str,
                                                                tmp_path: Path) -> None:
    remote = open_remote(remote_url, signing_key=None)
    first = published(remote, tmp_path, b"first build")
    library, second = make_library(tmp_path / "again", b"second build")

    assert remote.upload(KEY, ENTRY, library, second) is False
    assert usable(remote.list_manifests(KEY)) == [first]

    assert remote.upload(KEY, ENTRY, library, second, replace=True) is True
    assert usable(remote.list_manifests(KEY)) == [second]
    assert remote.download(second, dest_in(tmp_path)).read_bytes() == b"second build"


def test_replace_repairs_a_corrupt_blob(remote_url: str, tmp_path: Path,
                                        backdoor: Backdoor) -> None:
    remote = open_remote(remote_url, signing_key=None)
    library, manifest = make_library(tmp_path, b"good bytes")
    remote.upload(KEY, ENTRY, library, manifest)
    backdoor.write(f"blobs/{manifest['sha256']}", b"bad bytes!")
    assert remote.verify() != []

    assert remote.upload(KEY, ENTRY, library, manifest, replace=True) is True
    assert remote.verify() == []


# -- integrity of downloads -------------------------------------------------------------------
def test_a_tampered_blob_is_refused_and_deleted(remote_url: str, tmp_path: Path,
                                                backdoor: Backdoor) -> None:
    remote = open_remote(remote_url, signing_key=None)
    manifest = published(remote, tmp_path, b"A" * 5000)
    backdoor.write(f"blobs/{manifest['sha256']}", b"B" * 5000)  # same size
    dest = dest_in(tmp_path)

    with pytest.raises(RemoteIntegrityError) as info:
        remote.download(manifest, dest)

    message = str(info.value)
    assert f"blobs/{manifest['sha256']}" in message
    assert manifest["sha256"] in message
    assert hashlib.sha256(b"B" * 5000).hexdigest() in message
    assert not dest.exists()
    assert list(dest.parent.iterdir()) == []


def test_a_swapped_library_is_refused(remote_url: str, tmp_path: Path,
                                      backdoor: Backdoor) -> None:
    """Another entry's valid library put in place of this one's (larger, so the download
    stops at the manifest's size), or a manifest that names another library with the wrong
    size: both refused."""
    remote = open_remote(remote_url, signing_key=None)
    mine = published(remote, tmp_path, b"mine" * 100)
    theirs = published(remote, tmp_path, b"theirs" * 1000, key=OTHER_KEY)
    backdoor.write(f"blobs/{mine['sha256']}", backdoor.read(f"blobs/{theirs['sha256']}"))

    with pytest.raises(RemoteIntegrityError, match=f"more than {mine['size']} bytes"):
        remote.download(mine, dest_in(tmp_path))

    lying = {**mine, "sha256": theirs["sha256"]}  # the other blob, but this size
    backdoor.write(f"entries/{KEY}/{ENTRY2}.json", json.dumps(lying).encode())
    [entry] = [e for e in remote.list_manifests(KEY) if e.entry_digest == ENTRY2]
    assert entry.manifest is not None
    with pytest.raises(RemoteIntegrityError, match="is corrupt"):
        remote.download(entry.manifest, dest_in(tmp_path))
    assert list((tmp_path / "staging").iterdir()) == []


def test_a_missing_blob_is_an_integrity_error(remote_url: str, tmp_path: Path) -> None:
    remote = open_remote(remote_url, signing_key=None)
    _, manifest = make_library(tmp_path, b"never uploaded")

    with pytest.raises(RemoteIntegrityError, match="is missing"):
        remote.download(manifest, dest_in(tmp_path))


@pytest.mark.parametrize("field", [{"sha256": "../../../etc/passwd"}, {"sha256": "A" * 64},
                                   {"size": -1}, {"size": "12"}, {"size": True}])
def test_download_refuses_a_malformed_manifest_before_any_request(
        field: dict[str, Any], tmp_path: Path) -> None:
    remote = open_remote((tmp_path).as_uri(), signing_key=None)
    _, manifest = make_library(tmp_path / "build", b"x")

    with pytest.raises(RemoteIntegrityError, match="refusing to download"):
        remote.download({**manifest, **field}, dest_in(tmp_path))


def test_malformed_and_stray_objects_are_reported_or_ignored(
        remote_url: str, tmp_path: Path, backdoor: Backdoor,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A smaller limit, so that the test need not write 16 MiB to the server.
    monkeypatch.setattr(remote_base, "MAX_MANIFEST_BYTES", 1 << 20)
    monkeypatch.setattr(remote_entries, "MAX_MANIFEST_BYTES", 1 << 20)
    remote = open_remote(remote_url, signing_key=None)
    good = published(remote, tmp_path, b"good")
    backdoor.write(f"entries/{KEY}/{ENTRY2}.json", b"{not json")
    backdoor.write(f"entries/{KEY}/README", b"stray: not a manifest name")
    backdoor.write(f"entries/{OTHER_KEY}/{ENTRY}.json", json.dumps(good).encode())
    huge = json.dumps({**good, "padding": "x" * (2 << 20)}).encode()
    backdoor.write(f"entries/{OTHER_KEY}/{ENTRY2}.json", huge)

    entries = {(e.key_digest, e.entry_digest): e for e in remote.iter_entries()}

    assert set(entries) == {(KEY, ENTRY), (KEY, ENTRY2), (OTHER_KEY, ENTRY), (OTHER_KEY, ENTRY2)}
    assert entries[KEY, ENTRY].usable
    assert "is not UTF-8 JSON" in str(entries[KEY, ENTRY2].problem)
    assert f"is for key {KEY!r}" in str(entries[OTHER_KEY, ENTRY].problem)
    assert "is larger than" in str(entries[OTHER_KEY, ENTRY2].problem)
    assert usable(remote.list_manifests(KEY)) == [good]


# -- signatures -------------------------------------------------------------------------------
def test_signed_manifests_are_accepted_and_readable_without_the_key(
        remote_url: str, tmp_path: Path, backdoor: Backdoor) -> None:
    writer = open_remote(remote_url, signing_key=b"team secret")
    manifest = published(writer, tmp_path, b"signed library")

    stored = json.loads(backdoor.read(f"entries/{KEY}/{ENTRY}.json"))
    assert stored["signature"].startswith("hmac-sha256:")
    assert {k: v for k, v in stored.items() if k != "signature"} == manifest
    for reader in (open_remote(remote_url, signing_key=b"team secret"),
                   open_remote(remote_url, signing_key=None)):
        [entry] = reader.list_manifests(KEY)
        assert entry.usable, entry.problem
        assert entry.manifest is not None
        assert reader.download(entry.manifest, dest_in(tmp_path)).read_bytes() == (
            b"signed library")


def test_unsigned_and_wrongly_signed_manifests_are_refused(remote_url: str,
                                                           tmp_path: Path) -> None:
    """A job that can write to the bucket but lacks the key cannot make a reader with the
    key use its library, whether it signs nothing or signs with another key."""
    published(open_remote(remote_url, signing_key=None), tmp_path, b"unsigned", entry=ENTRY)
    published(open_remote(remote_url, signing_key=b"wrong"), tmp_path, b"other", entry=ENTRY2)
    reader = open_remote(remote_url, signing_key=b"team secret")

    entries = {e.entry_digest: e for e in reader.list_manifests(KEY)}

    assert "is unsigned" in str(entries[ENTRY].problem)
    assert "does not match" in str(entries[ENTRY2].problem)
    for entry in entries.values():
        assert not entry.usable
        assert entry.manifest is not None
        with pytest.raises(RemoteIntegrityError, match="refusing to download"):
            reader.download(entry.manifest, dest_in(tmp_path))
    assert {e.entry_digest for e in reader.verify()} == {ENTRY, ENTRY2}


def test_editing_a_signed_manifest_breaks_its_signature(remote_url: str, tmp_path: Path,
                                                        backdoor: Backdoor) -> None:
    signer = open_remote(remote_url, signing_key=b"team secret")
    published(signer, tmp_path, b"the signed one")
    evil = published(open_remote(remote_url, signing_key=None), tmp_path, b"evil",
                     key=OTHER_KEY)
    name = f"entries/{KEY}/{ENTRY}.json"
    stored = json.loads(backdoor.read(name))
    backdoor.write(name, json.dumps({**stored, "sha256": evil["sha256"],
                                     "size": evil["size"]}).encode())

    [entry] = signer.list_manifests(KEY)

    assert "does not match" in str(entry.problem)


def test_a_signed_manifest_copied_under_another_key_is_refused(
        remote_url: str, tmp_path: Path, backdoor: Backdoor) -> None:
    """The signature covers the manifest's ``digest`` (its key), so a validly signed
    manifest cannot be replayed to serve its library for another key."""
    signer = open_remote(remote_url, signing_key=b"team secret")
    published(signer, tmp_path, b"library of KEY")
    backdoor.write(f"entries/{OTHER_KEY}/{ENTRY}.json",
                   backdoor.read(f"entries/{KEY}/{ENTRY}.json"))

    [entry] = signer.list_manifests(OTHER_KEY)

    assert f"is for key {KEY!r}" in str(entry.problem)


def test_the_signature_is_hmac_sha256_over_canonical_json() -> None:
    """Pinned format, so that other tools can sign and check manifests."""
    manifest = {"size": 3, "sha256": "ab" * 32, "toolchain": {"b": 1, "a": "é"}}
    body = '{"sha256":"' + "ab" * 32 + '","size":3,"toolchain":{"a":"é","b":1}}'
    expected = hmac.new(b"k", body.encode("utf-8"), hashlib.sha256).hexdigest()

    assert manifest_signature(manifest, b"k") == f"hmac-sha256:{expected}"
    assert manifest_signature({**manifest, "signature": "anything"}, b"k") == (
        f"hmac-sha256:{expected}")


# -- maintenance ------------------------------------------------------------------------------
def test_verify_finds_a_bad_blob(remote_url: str, tmp_path: Path, backdoor: Backdoor) -> None:
    remote = open_remote(remote_url, signing_key=None)
    good = published(remote, tmp_path, b"good library", entry=ENTRY)
    bad = published(remote, tmp_path, b"library to be damaged", entry=ENTRY2)
    assert remote.verify() == []

    backdoor.write(f"blobs/{bad['sha256']}", b"damaged")
    problems = remote.verify()

    assert [e.entry_digest for e in problems] == [ENTRY2]
    assert f"blobs/{bad['sha256']}" in str(problems[0].problem)
    assert "7 bytes" in str(problems[0].problem)
    assert good["sha256"] not in str(problems)


def test_prune_removes_old_entries_and_their_unreferenced_blobs(remote_url: str,
                                                                tmp_path: Path,
                                                                backdoor: Backdoor) -> None:
    remote = open_remote(remote_url, signing_key=None)
    day = 24 * 3600.0
    old = published(remote, tmp_path, b"old only", entry=ENTRY, created=time.time() - 10 * day)
    shared = b"shared by an old and a new entry"
    published(remote, tmp_path, shared, key=OTHER_KEY, entry=ENTRY,
              created=time.time() - 10 * day)
    new = published(remote, tmp_path, shared, key=OTHER_KEY, entry=ENTRY2)

    # the old manifests go; their blobs are young (their uploads may still be running)
    assert sorted(tails(remote.prune(7 * day))) == [f"entries/{KEY}/{ENTRY}.json",
                                                    f"entries/{OTHER_KEY}/{ENTRY}.json"]
    assert f"blobs/{old['sha256']}" in backdoor.names()

    # past the grace period, the blob no manifest names goes; the shared one stays
    assert tails(remote.prune(7 * day, blob_grace_seconds=0)) == [f"blobs/{old['sha256']}"]
    assert backdoor.names() == {f"blobs/{new['sha256']}", f"entries/{OTHER_KEY}/{ENTRY2}.json"}
    assert remote.verify() == []
    assert remote.prune(7 * day, blob_grace_seconds=0) == []


def test_prune_without_a_created_field_uses_the_object_time(remote_url: str,
                                                            tmp_path: Path) -> None:
    remote = open_remote(remote_url, signing_key=None)
    library, manifest = make_library(tmp_path, b"no created field")
    del manifest["created"]
    remote.upload(KEY, ENTRY, library, manifest)

    assert remote.prune(3600.0) == []
    assert len(remote.prune(-60.0, blob_grace_seconds=-60.0)) == 2
    assert list(remote.iter_entries()) == []


# -- URLs and options -------------------------------------------------------------------------
@pytest.mark.parametrize("url", [
    "", "http://host/x", "gs://bucket/x", "/abs/path", "s3://", "s3://Upper-Case",
    "s3://ab", "s3://bucket/a//b", "s3://bucket/../x", "s3://bucket/p?versionId=1",
    "s3://bucket:9000/p", "file://relative/path", "file:relative", "s3://bucket/a b",
])
def test_malformed_urls_are_config_errors_naming_the_value(url: str) -> None:
    with pytest.raises(RemoteConfigError) as info:
        open_remote(url, signing_key=None)

    assert isinstance(info.value, ConfigError)
    assert isinstance(info.value, MlcJitError)
    assert repr(url) in str(info.value)
    assert "s3://BUCKET[/PREFIX] or file:///ABSOLUTE/PATH" in str(info.value)


def test_credentials_in_a_url_are_refused_without_being_shown() -> None:
    with pytest.raises(RemoteConfigError, match="credentials do not belong") as info:
        parse_remote_url("s3://AKIA123:hunter2@bucket/prefix")

    assert "hunter2" not in str(info.value)
    assert "AKIA123" not in str(info.value)
    assert "s3://***@bucket/prefix" in str(info.value)


def test_well_formed_urls(tmp_path: Path) -> None:
    assert parse_remote_url("s3://my.bucket-1").prefix == ""
    assert parse_remote_url("s3://my.bucket-1/a/b/").prefix == "a/b/"
    assert parse_remote_url("s3://my.bucket-1/a/b/").redacted == "s3://my.bucket-1/a/b"
    spaced = tmp_path / "with space"
    spaced.mkdir()
    parsed = parse_remote_url(spaced.as_uri())
    assert (parsed.scheme, parsed.path) == ("file", str(spaced))
    assert parse_remote_url(parsed.redacted) == parsed
    remote = open_remote(spaced.as_uri(), signing_key=None)
    assert isinstance(remote, FileRemote)
    assert remote.url == parsed.redacted


def test_a_missing_directory_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(RemoteConfigError, match="does not exist"):
        open_remote((tmp_path / "nowhere").as_uri(), signing_key=None)


@pytest.mark.parametrize(("option", "value"), [
    ("signing_key", b""), ("signing_key", "text"), ("connect_timeout", 0),
    ("read_timeout", float("nan")), ("read_timeout", -1.0), ("retries", -1), ("retries", 1.5),
])
def test_bad_options_are_config_errors(option: str, value: Any, tmp_path: Path) -> None:
    kwargs: dict[str, Any] = {"signing_key": None, option: value}
    with pytest.raises(RemoteConfigError, match="invalid remote"):
        open_remote(tmp_path.as_uri(), **kwargs)


def test_importing_the_module_does_not_import_boto3() -> None:
    code = ("import sys, pytest_mlcjit.cache.store.remote as r; "
            "r.parse_remote_url('s3://bucket/x'); assert 'boto3' not in sys.modules, 'boto3'; "
            "assert 'botocore' not in sys.modules, 'botocore'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr


def test_without_boto3_an_s3_remote_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "boto3", None)  # what `import boto3` sees when absent

    with pytest.raises(RemoteConfigError, match="needs boto3") as info:
        open_remote("s3://bucket/x", signing_key=None)

    assert EXTRA_HINT in str(info.value)


# -- failures of the S3 server ----------------------------------------------------------------
def test_a_missing_bucket_is_a_config_error(aws_env: str) -> None:
    remote = open_remote("s3://no-such-bucket-here/x", signing_key=None)

    with pytest.raises(RemoteConfigError, match="bucket 'no-such-bucket-here' does not exist"):
        remote.list_manifests(KEY)


def test_refused_credentials_are_an_auth_error_not_a_miss(
        s3_bucket: str, tmp_path: Path, moto_auth: MotoAuth) -> None:
    remote = open_remote(f"s3://{s3_bucket}/{PREFIX}", signing_key=None, retries=0)
    published(remote, tmp_path, b"published before the keys were revoked")
    manifest = next(remote.iter_entries()).manifest
    assert manifest is not None
    moto_auth.on()

    with pytest.raises(RemoteAuthError, match="InvalidAccessKeyId") as info:
        remote.list_manifests(KEY)
    assert "AWS_ACCESS_KEY_ID" in str(info.value)
    with pytest.raises(RemoteAuthError):
        remote.download(manifest, dest_in(tmp_path))
    with pytest.raises(RemoteAuthError, match="403"):
        remote.upload(KEY, ENTRY2, *make_library(tmp_path / "new", b"new"))
    assert list((tmp_path / "staging").iterdir()) == []


def test_no_credentials_at_all_are_an_auth_error(aws_env: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """boto3 finds no credentials (none in the environment, no files, no instance
    metadata): refused before any request, as an auth error that says what to set."""
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    remote = open_remote("s3://bucket/x", signing_key=None, retries=0)

    with pytest.raises(RemoteAuthError, match="set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"):
        remote.list_manifests(KEY)


@pytest.fixture
def error_server(aws_env: str, monkeypatch: pytest.MonkeyPatch
                 ) -> Iterator[Callable[[int, str | None], ErrorServer]]:
    """Starts an :class:`ErrorServer` (status, S3 error code) and points AWS_ENDPOINT_URL
    at it; closed at teardown."""
    servers: list[ErrorServer] = []

    def start(status: int, code: str | None) -> ErrorServer:
        servers.append(ErrorServer(status, code))
        monkeypatch.setenv("AWS_ENDPOINT_URL", servers[-1].endpoint)
        return servers[-1]

    yield start
    for server in servers:
        server.close()


#: S3's answers when it refuses: (error code, or None for a bare status; HTTP status;
#: the error they are).
ANSWERS: list[tuple[str | None, int, type[RemoteError]]] = [
    ("ExpiredToken", 400, RemoteAuthError),
    ("SignatureDoesNotMatch", 403, RemoteAuthError),
    ("AccessDenied", 403, RemoteAuthError),
    ("InvalidAccessKeyId", 403, RemoteAuthError),
    (None, 401, RemoteAuthError),
    ("SlowDown", 503, RemoteUnavailableError),
    ("TooManyRequests", 429, RemoteUnavailableError),
    ("InternalError", 500, RemoteUnavailableError),
    ("BadGateway", 502, RemoteUnavailableError),
    (None, 504, RemoteUnavailableError),
    ("NoSuchBucket", 404, RemoteConfigError),
    ("BadDigest", 400, RemoteIntegrityError),
    ("InvalidRequest", 400, RemoteError),
]


def test_s3_error_answers_map_to_distinct_errors(
        tmp_path: Path, error_server: Callable[[int, str | None], ErrorServer]) -> None:
    """Each answer S3 gives when it refuses (expired tokens, throttling, server errors,
    a proxy's bare status...), received for real over HTTP as S3's XML error document and
    parsed by boto3 itself, on a listing, a download and an upload: each is its error
    class, and with no retries configured each request is made once. The server is a small
    one of s3server.py (moto cannot be made to give these answers on demand); moto's own
    403 and missing bucket are tested above. One remote for the whole table (making a
    boto3 client costs a few tenths of a second)."""
    server = error_server(500, None)
    remote = open_remote("s3://bucket/x", signing_key=None, retries=0)
    _, manifest = make_library(tmp_path / "build", b"library")
    upload = make_library(tmp_path / "up", b"library")
    calls: list[Callable[[], object]] = [
        lambda: remote.list_manifests(KEY),
        lambda: remote.download(manifest, dest_in(tmp_path)),
        lambda: remote.upload(KEY, ENTRY, *upload),
    ]

    for code, status, expected in ANSWERS:
        server.status, server.code = status, code
        server.requests.clear()
        for call in calls:
            with pytest.raises(RemoteError) as info:
                call()
            message = str(info.value)
            assert type(info.value) is expected, (code, status, message)
            assert (code or str(status)) in message or "'bucket' does not exist" in message
            assert "s3://bucket/x/" in message
        methods = [line.split()[0] for line in server.requests]
        assert methods == ["GET", "GET", "HEAD", "PUT"], (code, server.requests)  # no retry
    assert list((tmp_path / "staging").iterdir()) == []


def test_a_throttling_server_is_unavailable_after_the_configured_retries(
        error_server: Callable[[int, str | None], ErrorServer]) -> None:
    server = error_server(503, "SlowDown")
    remote = open_remote("s3://bucket/x", signing_key=None, retries=1)

    with pytest.raises(RemoteUnavailableError) as info:
        remote.list_manifests(KEY)

    assert "SlowDown" in str(info.value)
    assert "503" in str(info.value)
    assert len(server.requests) == 2, server.requests  # the first try and one retry


def test_a_refused_connection_is_unavailable(aws_env: str, monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    """Nothing listens at the endpoint (a stopped server): every operation is
    RemoteUnavailableError naming the object and the endpoint, and leaves no file."""
    endpoint = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    remote = open_remote("s3://soon-gone/x", signing_key=None, connect_timeout=1,
                         read_timeout=1, retries=0)

    with pytest.raises(RemoteUnavailableError) as info:
        remote.list_manifests(KEY)

    assert "s3://soon-gone/x/entries/" in str(info.value)
    assert endpoint in str(info.value)
    assert "cannot be reached" in str(info.value)
    _, manifest = make_library(tmp_path, b"x")
    with pytest.raises(RemoteUnavailableError):
        remote.download(manifest, dest_in(tmp_path))
    with pytest.raises(RemoteUnavailableError):
        remote.upload(KEY, ENTRY, *make_library(tmp_path, b"x"))
    assert list((tmp_path / "staging").iterdir()) == []


def test_credentials_in_the_endpoint_are_never_shown(aws_env: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    port = closed_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://admin:hunter2@127.0.0.1:{port}")
    remote = open_remote("s3://bucket/x", signing_key=None, connect_timeout=1, retries=0)

    with pytest.raises(RemoteUnavailableError) as info:
        remote.list_manifests(KEY)

    assert "hunter2" not in str(info.value)
    assert "hunter2" not in remote.describe()
    assert f"http://***@127.0.0.1:{port}" in str(info.value)


@pytest.fixture
def stalling_server(aws_env: str, monkeypatch: pytest.MonkeyPatch
                    ) -> Iterator[Callable[[bytes], StallingServer]]:
    """Starts a :class:`StallingServer` (sending a reply, or nothing) and points
    AWS_ENDPOINT_URL at it; closed at teardown."""
    servers: list[StallingServer] = []

    def start(reply: bytes = b"") -> StallingServer:
        servers.append(StallingServer(reply))
        monkeypatch.setenv("AWS_ENDPOINT_URL", servers[-1].endpoint)
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def test_a_stalling_server_is_unavailable_after_the_configured_timeout_and_retries(
        stalling_server: Callable[[bytes], StallingServer]) -> None:
    """A server that accepts and never answers: the listing fails as timed out, after one
    try and the one retry configured, each ended by the client (its 0.5 s read timeout
    fired before the server's patience, far below the 30 s default, ran out)."""
    server = stalling_server(b"")
    remote = open_remote("s3://bucket/x", signing_key=None, read_timeout=0.5, retries=1)

    with pytest.raises(RemoteUnavailableError, match="timed out"):
        remote.list_manifests(KEY)

    wait_until(server.settled, "the server to see the hang-ups")
    assert server.hangups == ["client", "client"]


def test_a_download_that_stalls_midway_is_unavailable_and_leaves_no_file(
        tmp_path: Path, stalling_server: Callable[[bytes], StallingServer]) -> None:
    reply = (b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
             b"Content-Length: 1000000\r\n\r\n" + b"x" * 1000)
    server = stalling_server(reply)
    remote = open_remote("s3://bucket/x", signing_key=None, read_timeout=0.5, retries=0)
    _, manifest = make_library(tmp_path, b"x" * 1_000_000)
    dest = dest_in(tmp_path)

    with pytest.raises(RemoteUnavailableError) as info:
        remote.download(manifest, dest)

    assert f"s3://bucket/x/blobs/{manifest['sha256']}" in str(info.value)
    assert not dest.exists()
    assert list(dest.parent.iterdir()) == []
    wait_until(server.settled, "the server to see the hang-up")
    assert server.hangups == ["client"]

# -- failures of a directory ------------------------------------------------------------------
def test_an_unreadable_directory_is_an_auth_error_not_a_miss(tmp_path: Path) -> None:
    """A directory this user may not read (permissions enforced for real, as root too:
    :func:`s3server.permissions_enforced`) is refused, never a miss."""
    remote = open_remote(tmp_path.as_uri(), signing_key=None)
    manifest = published(remote, tmp_path, b"x")
    (tmp_path / "entries" / KEY).chmod(0)
    (tmp_path / "blobs").chmod(0)
    try:
        with permissions_enforced():
            with pytest.raises(RemoteAuthError, match="permission"):
                remote.list_manifests(KEY)
            with pytest.raises(RemoteAuthError, match="permission"):
                remote.download(manifest, dest_in(tmp_path))
    finally:
        (tmp_path / "entries" / KEY).chmod(0o755)
        (tmp_path / "blobs").chmod(0o755)
    assert list((tmp_path / "staging").iterdir()) == []


def test_a_directory_remote_leaves_no_temp_files(tmp_path: Path) -> None:
    root = tmp_path / "remote"
    root.mkdir()
    remote = open_remote(root.as_uri(), signing_key=None)
    published(remote, tmp_path, b"x")
    library, manifest = make_library(tmp_path / "again", b"x")
    assert remote.upload(KEY, ENTRY, library, manifest) is False
    assert remote.upload(KEY, ENTRY, library, manifest, replace=True) is True

    assert sorted(p.name for p in root.rglob("*") if p.is_file()) == sorted(
        [manifest["sha256"], f"{ENTRY}.json"])
    stale = root / "blobs" / ".abc.123.tmp"
    stale.write_bytes(b"left by a killed writer")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    assert remote.prune(3600.0) == [stale.as_uri()]
