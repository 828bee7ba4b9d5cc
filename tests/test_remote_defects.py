"""Defects of the S3 tier an adversarial probe found (issue 21, item 8), each with a test
that fails before the issue, and the primitives other parts build on (``_stat``,
``_touch``, quarantine).

- keyless readers: the run header says remote entries are not verified, with the fix;
  an empty key is a usage error, not "no key";
- a squatter (an object planted at an entry's predictable name) never blocks a writer
  that signs: an object it would refuse to read is replaced, one it accepts stands;
- presence by size: a same-size blob planted without a verified digest is overwritten;
- freshness: an old signed manifest put back after a REDO is never preferred;
- prune against a concurrent upload: a reused blob is touched, and uploaded again if a
  prune removed it before the manifest was written.

Against moto's S3 server and a file:// directory; planted and read behind the remote's
back (``Backdoor``), signing with HMAC and with Ed25519 (test keys made here)."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from s3server import Backdoor
from test_remote_store import (
    ENTRY,
    ENTRY2,
    KEY,
    OTHER_KEY,
    backdoor,  # noqa: F401 (a fixture)
    dest_in,
    make_library,
    published,
    remote_url,  # noqa: F401 (a fixture)
)

from conftest import Project
from pytest_mlcjit.cache.manage import remote as manage_remote
from pytest_mlcjit.cache.store.remote import Remote, open_remote
from pytest_mlcjit.errors import RemoteError

pytest_plugins = ["s3server"]

SECRET = b"trusted writers' secret"
ENTRY3 = hashlib.sha256(b"entry 3").hexdigest()
ENTRY4 = hashlib.sha256(b"entry 4").hexdigest()
CONFIG = [{"hidden": 4}]


def _raw_pair() -> tuple[bytes, bytes]:
    private = ed25519.Ed25519PrivateKey.generate()
    raw = serialization.Encoding.Raw
    return (private.private_bytes(raw, serialization.PrivateFormat.Raw,
                                  serialization.NoEncryption()),
            private.public_key().public_bytes(raw, serialization.PublicFormat.Raw))


@dataclasses.dataclass(frozen=True)
class Scheme:
    """How trusted writers sign and readers verify: ``writer`` and ``colleague`` are two
    trusted writers (each accepts the other's entries), ``reader`` verifies only."""

    writer: dict[str, Any]
    colleague: dict[str, Any]
    reader: dict[str, Any]

    def open(self, url: str) -> tuple[Remote, Remote, Remote]:
        """The writer, the colleague and the reader (one remote where their keys are the
        same: an S3 client costs its setup)."""
        opened: dict[int, Remote] = {}
        return tuple(opened.setdefault(id(o), open_remote(url, **o))  # type: ignore[return-value]
                     for o in (self.writer, self.colleague, self.reader))


@pytest.fixture(scope="module", params=["hmac", "ed25519"])
def scheme(request: pytest.FixtureRequest) -> Scheme:
    if request.param == "hmac":
        options = {"signing_key": SECRET}
        return Scheme(options, options, options)
    (mine, my_public), (theirs, their_public) = _raw_pair(), _raw_pair()
    return Scheme({"ed25519_key": mine, "trusted_keys": (their_public,)},
                  {"ed25519_key": theirs, "trusted_keys": (my_public,)},
                  {"trusted_keys": (my_public, their_public)})


def only_usable(remote: Remote, key: str = KEY) -> list[dict[str, Any]]:
    return [e.manifest for e in remote.list_manifests(key) if e.usable and e.manifest]


# -- keyless readers -------------------------------------------------------------------------
def test_a_keyless_reader_is_told_that_remote_entries_are_not_verified(
        project: Project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLC_JIT_REMOTE", tmp_path.as_uri())
    project.write_tests(CONFIG)

    result = project.run("--collect-only")
    assert result.ret == 0, result.stdout.str()
    [line] = [ln for ln in result.stdout.lines if "entries are NOT verified" in ln]
    assert tmp_path.as_uri() in line
    assert "set MLC_JIT_REMOTE_TRUSTED_KEYS" in line

    monkeypatch.setenv("MLC_JIT_REMOTE_SIGNING_KEY", "")  # empty is not "no key"
    result = project.run("--collect-only")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "invalid MLC_JIT_REMOTE_SIGNING_KEY: it is set but empty" in result.stderr.str()
    assert project.compiles() == []


#: The storage matters less than the scheme here: S3 with HMAC, a directory with Ed25519.
S3_HMAC_FILE_ED25519 = pytest.mark.parametrize(("remote_url", "scheme"),
                                               [("s3", "hmac"), ("file", "ed25519")],
                                               indirect=True)
FILE_ONLY = pytest.mark.parametrize("remote_url", ["file"], indirect=True)


# -- squatters -------------------------------------------------------------------------------
@S3_HMAC_FILE_ED25519
def test_an_object_a_signing_writer_would_refuse_does_not_block_its_publish(
        remote_url: str, tmp_path: Path, backdoor: Backdoor,  # noqa: F811
        scheme: Scheme) -> None:
    """Planted at the entries' predictable names before the trusted publish: an unsigned
    manifest, junk, a manifest with a forged signature: each is replaced (and said).
    Where another trusted writer published first, its entry stands (False, as before)."""
    writer, colleague, reader = scheme.open(remote_url)
    _, evil = make_library(tmp_path / "evil", b"the squatter's library")
    builds = {e: make_library(tmp_path / e[:8], f"trusted build {e[:8]}".encode())
              for e in (ENTRY, ENTRY2, ENTRY3, ENTRY4)}
    backdoor.write(f"entries/{KEY}/{ENTRY}.json", json.dumps(evil).encode())
    backdoor.write(f"entries/{KEY}/{ENTRY2}.json", b"\x00junk")
    forged = {**evil, "signature": "hmac-sha256:" + "0" * 64}
    backdoor.write(f"entries/{KEY}/{ENTRY3}.json", json.dumps(forged).encode())
    theirs = make_library(tmp_path / "theirs", b"the colleague's build")
    assert colleague.upload(KEY, ENTRY4, *theirs)

    for entry in (ENTRY, ENTRY2, ENTRY3):
        assert writer.upload(KEY, entry, *builds[entry]) is True, entry
    assert writer.upload(KEY, ENTRY4, *builds[ENTRY4]) is False

    found = {e.entry_digest: e for e in reader.list_manifests(KEY)}
    assert all(e.usable for e in found.values()), [e.problem for e in found.values()]
    for entry, (_, manifest) in builds.items():
        expected = theirs[1] if entry == ENTRY4 else manifest
        got = found[entry].manifest
        assert got is not None
        assert got["sha256"] == expected["sha256"]
        assert reader.download(got, dest_in(tmp_path)).read_bytes() == (
            (theirs if entry == ENTRY4 else builds[entry])[0].read_bytes())
    notes = writer.take_notes()
    assert len(notes) == 3, notes
    assert all("replaced" in note and "refuse to read" in note for note in notes)


# -- presence by size ------------------------------------------------------------------------
def test_a_blob_planted_without_a_verified_digest_is_not_taken_as_present(
        remote_url: str, tmp_path: Path, backdoor: Backdoor,  # noqa: F811
        request: pytest.FixtureRequest) -> None:
    """Builds are reproducible, so ``blobs/<sha256>`` is known in advance: bytes of the
    right size planted there (no checksum) are overwritten by the trusted publish, and
    every reader then loads the real library."""
    library, manifest = make_library(tmp_path, b"A" * 4096)
    blob = f"blobs/{manifest['sha256']}"
    backdoor.write(blob, b"B" * 4096)
    writer = open_remote(remote_url, signing_key=SECRET)

    assert writer.upload(KEY, ENTRY, library, manifest) is True

    assert backdoor.read(blob) == b"A" * 4096
    [entry] = writer.list_manifests(KEY)
    assert entry.manifest is not None
    assert writer.download(entry.manifest, dest_in(tmp_path)).read_bytes() == b"A" * 4096
    if remote_url.startswith("s3:"):  # the store keeps the SHA-256 it verified
        admin = request.getfixturevalue("s3_admin")
        head = admin.head_object(Bucket=backdoor.bucket, Key=backdoor.prefix + blob,
                                 ChecksumMode="ENABLED")
        assert head["ChecksumSHA256"] == base64.b64encode(
            bytes.fromhex(manifest["sha256"])).decode()


# -- freshness -------------------------------------------------------------------------------
@pytest.mark.parametrize("remote_url", ["file"], indirect=True)
def test_an_old_signed_manifest_put_back_after_a_redo_is_not_preferred(
        remote_url: str, tmp_path: Path, backdoor: Backdoor,  # noqa: F811
        scheme: Scheme) -> None:
    writer, _, reader = scheme.open(remote_url)
    first = make_library(tmp_path / "v1", b"version 1")
    assert writer.upload(KEY, ENTRY, *first)
    old = backdoor.read(f"entries/{KEY}/{ENTRY}.json")
    second = make_library(tmp_path / "v2", b"version 2, rebuilt by a REDO")

    assert writer.upload(KEY, ENTRY, *second, replace=True) is True

    backdoor.write(f"entries/{KEY}/{ENTRY}.json", old)  # put back
    backdoor.write(f"entries/{KEY}/{ENTRY}.7.json", old)  # or moved to a newer name
    [newest] = only_usable(reader)
    assert newest["sha256"] == second[1]["sha256"]
    assert reader.download(newest, dest_in(tmp_path)).read_bytes() == (
        b"version 2, rebuilt by a REDO")
    problems = {e.location.rsplit("/", 1)[1]: e.problem for e in reader.iter_entries()}
    assert "superseded by generation 1" in str(problems[f"{ENTRY}.json"])
    assert "states generation 0, but is stored as generation 7" in str(
        problems[f"{ENTRY}.7.json"])

    # `remote verify` reports the superseded one, but never offers `remote rm K/E`: that
    # would remove the newest generation with it.
    verified = manage_remote.verify(reader)
    [superseded] = [b for b in verified["bad"] if "superseded" in str(b["problem"])]
    assert superseded["remove"] is None, superseded

    # a second REDO: generation 2, the older ones removed
    third = make_library(tmp_path / "v3", b"version 3")
    backdoor.delete(f"entries/{KEY}/{ENTRY}.7.json")
    assert writer.upload(KEY, ENTRY, *third, replace=True) is True
    assert sorted(n for n in backdoor.names() if n.startswith("entries/")) == [
        f"entries/{KEY}/{ENTRY}.2.json"]
    assert [m["sha256"] for m in only_usable(reader)] == [third[1]["sha256"]]


# -- prune against a concurrent upload -------------------------------------------------------
@FILE_ONLY
def test_a_reused_blob_removed_by_a_prune_before_the_manifest_is_uploaded_again(
        remote_url: str, tmp_path: Path, backdoor: Backdoor,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A comment-only edit: a new key, the same library bytes. The blob is on the remote
    (an old entry's, whose manifest a prune removed: an orphan), so the upload reuses it;
    the prune removes the orphan between the upload's presence check and its manifest
    (the storage seam ``_put_manifest``): the upload puts the blob back."""
    writer = open_remote(remote_url, signing_key=SECRET)
    shared = b"the same library bytes under a new key"
    old = published(writer, tmp_path, shared, key=OTHER_KEY, entry=ENTRY)
    backdoor.delete(f"entries/{OTHER_KEY}/{ENTRY}.json")
    blob = f"blobs/{old['sha256']}"
    put_manifest = writer._put_manifest

    def prune_strikes(name: str, data: bytes, *, create_only: bool) -> bool:
        if blob in backdoor.names():
            backdoor.delete(blob)
        return put_manifest(name, data, create_only=create_only)

    monkeypatch.setattr(writer, "_put_manifest", prune_strikes)
    library, manifest = make_library(tmp_path / "edit", shared)

    assert writer.upload(KEY, ENTRY2, library, manifest) is True

    assert backdoor.read(blob) == shared
    [entry] = writer.list_manifests(KEY)
    assert entry.manifest is not None
    assert writer.download(entry.manifest, dest_in(tmp_path)).read_bytes() == shared


def test_an_upload_that_reuses_a_blob_touches_it(tmp_path: Path) -> None:
    """So that a prune's grace period, counted from the blob's last write, keeps it."""
    root = tmp_path / "remote"
    root.mkdir()
    writer = open_remote(root.as_uri())
    old = published(writer, tmp_path, b"shared bytes", key=OTHER_KEY)
    blob = root / "blobs" / old["sha256"]
    long_ago = time.time() - 30 * 86400
    os.utime(blob, (long_ago, long_ago))

    published(writer, tmp_path, b"shared bytes", key=KEY, entry=ENTRY2)

    assert blob.stat().st_mtime > long_ago + 29 * 86400


# -- primitives other parts build on ---------------------------------------------------------
def test_stat_and_touch(remote_url: str, tmp_path: Path,  # noqa: F811
                        backdoor: Backdoor) -> None:  # noqa: F811
    remote = open_remote(remote_url)
    manifest = published(remote, tmp_path, b"x" * 300)
    blob = f"blobs/{manifest['sha256']}"

    assert remote._stat("blobs/" + "0" * 64) is None
    stat = remote._stat(blob)
    assert stat is not None
    assert (stat.name, stat.size) == (blob, 300)
    remote._touch(blob)
    remote._touch("blobs/" + "0" * 64)  # absent: nothing to do
    after = remote._stat(blob)
    assert after is not None
    assert after.modified >= stat.modified
    assert remote._blob_present(blob, manifest["sha256"], 300)  # the checksum is kept
    assert backdoor.read(blob) == b"x" * 300


@FILE_ONLY
def test_quarantine_moves_an_entry_aside_and_lists_it(
        remote_url: str, tmp_path: Path, backdoor: Backdoor) -> None:  # noqa: F811
    remote = open_remote(remote_url, signing_key=SECRET)
    published(remote, tmp_path, b"a library that does not load", entry=ENTRY)
    [entry] = remote.list_manifests(KEY)
    raw = backdoor.read(f"entries/{KEY}/{ENTRY}.json")
    before = time.time()

    where = remote.quarantine(entry, "failed to load: undefined symbol")

    assert where.endswith(f"/quarantine/{KEY}/{ENTRY}.json")
    assert remote.list_manifests(KEY) == []
    record = json.loads(backdoor.read(f"quarantine/{KEY}/{ENTRY}.json"))
    assert record["why"] == "failed to load: undefined symbol"
    assert record["manifest"] == raw.decode()
    assert record["time"] >= before - 1
    assert record["entry"] == entry.location
    backdoor.write(f"quarantine/{KEY}/{ENTRY2}.json", b"not a record")
    assert sorted(remote.iter_quarantined(), key=lambda q: q[0]) == sorted(
        [(where, record), (where.replace(ENTRY, ENTRY2), None)], key=lambda q: q[0])
    assert remote.verify() == []  # quarantine/ is not an entry


@FILE_ONLY
def test_quarantine_leaves_in_place_a_manifest_that_changed_since_it_was_refused(
        remote_url: str, tmp_path: Path, backdoor: Backdoor) -> None:  # noqa: F811
    """A job lists an unsigned squatter (refused); before it moves it aside, a trusted
    writer replaces the squatter with its signed entry, or a bucket writer swaps in a
    link to a file of the job's machine: what is there now is not what was refused, so
    nothing is moved (a RemoteError, which the run warns about) and no record copies it."""
    reader = open_remote(remote_url, signing_key=SECRET)
    published(open_remote(remote_url), tmp_path, b"squatter", entry=ENTRY)
    [refused] = reader.list_manifests(KEY)
    assert "is unsigned" in str(refused.problem)
    name = f"entries/{KEY}/{ENTRY}.json"

    library, manifest = make_library(tmp_path / "trusted", b"squatter")  # the same bytes
    assert open_remote(remote_url, signing_key=SECRET).upload(KEY, ENTRY, library, manifest)
    published_now = backdoor.read(name)
    with pytest.raises(RemoteError, match="changed since it was refused"):
        reader.quarantine(refused, "failed to load")
    assert backdoor.read(name) == published_now
    assert [e.usable for e in reader.list_manifests(KEY)] == [True]

    secret = tmp_path / "secret.json"  # a file of the reader's machine
    secret.write_text(json.dumps({"token": "do not upload me"}))
    root = Path(remote_url.removeprefix("file://"))
    (root / name).unlink()
    (root / name).symlink_to(secret)  # never followed (file.py), never moved aside
    with pytest.raises(RemoteError, match=r"is not a regular file|changed since it was refused"):
        reader.quarantine(refused, "failed to load")
    assert not [n for n in backdoor.names() if n.startswith("quarantine/")]


def test_what_a_bucket_writer_puts_in_a_manifest_reaches_a_problem_escaped_and_bounded(
        tmp_path: Path) -> None:
    """Fields a refusal quotes (size, sha256, generation, key) may hold lone surrogates
    (valid JSON, no UTF-8 text: printing them raises) or megabytes: the problem quotes
    them escaped and cut short."""
    remote = open_remote(tmp_path.as_uri(), signing_key=SECRET)
    manifest = published(remote, tmp_path, b"library", entry=ENTRY)
    huge = "\ud800" * 20_000
    for entry, fields in ((ENTRY2, {"generation": huge, "signature": "x"}),
                          (ENTRY3, {"size": huge}), (ENTRY4, {"sha256": huge})):
        path = tmp_path / "entries" / KEY / f"{entry}.json"
        path.write_text(json.dumps({**manifest, **fields}))

    problems = [e.problem for e in remote.list_manifests(KEY) if e.entry_digest != ENTRY]

    assert len(problems) == 3
    for problem in problems:
        assert problem is not None
        assert "\\ud800" in problem.encode("utf-8").decode(), problem
        assert len(problem) < 600, len(problem)
