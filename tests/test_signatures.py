"""Ed25519 signatures that readers verify without being able to sign (issue 21, item 3),
against a real S3 server (moto's, on 127.0.0.1) and a file:// directory.

A writer signs with a private key; a reader holding only public keys loads what a
trusted key signed and refuses the rest: unsigned, forged, replayed (a signed manifest
copied under another key, a signature copied onto another manifest) and revoked-key
entries, each with its own reason. A job with only public keys cannot produce an entry a
trusted reader accepts. HMAC keeps working. The keys come from
``MLC_JIT_REMOTE_SIGNING_KEY`` and ``MLC_JIT_REMOTE_TRUSTED_KEYS``: a bad value is a usage
error at start naming the variable. Test keys are generated here (cryptography); what a
remote holds is read and planted behind its back (``Backdoor``)."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
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

from conftest import Project, run_cli
from pytest_mlcjit.cache.store.remote import open_remote
from pytest_mlcjit.cache.store.remote.signing import keys_from_env
from pytest_mlcjit.engine.remote import remote_options
from pytest_mlcjit.engine.settings import from_environment
from pytest_mlcjit.errors import RemoteConfigError, RemoteIntegrityError

pytest_plugins = ["s3server"]

ENTRY3 = hashlib.sha256(b"entry 3").hexdigest()
ENTRY4 = hashlib.sha256(b"entry 4").hexdigest()
CONFIG = [{"hidden": 4}]  # the warm template's library
SIGNING = "MLC_JIT_REMOTE_SIGNING_KEY"
TRUSTED = "MLC_JIT_REMOTE_TRUSTED_KEYS"


@dataclasses.dataclass(frozen=True)
class Key:
    """An Ed25519 key pair made for a test: raw bytes, PEM texts, its key id (computed
    here, as docs/how-to/remote.md defines it)."""

    private: bytes
    public: bytes
    private_pem: str
    public_pem: str

    @property
    def key_id(self) -> str:
        return hashlib.sha256(self.public).hexdigest()[:16]


def new_key() -> Key:
    private = ed25519.Ed25519PrivateKey.generate()
    public = private.public_key()
    raw = serialization.Encoding.Raw
    return Key(
        private.private_bytes(raw, serialization.PrivateFormat.Raw,
                              serialization.NoEncryption()),
        public.public_bytes(raw, serialization.PublicFormat.Raw),
        private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()).decode(),
        public.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo).decode())


@pytest.fixture(scope="module")
def keys() -> tuple[Key, Key]:
    return new_key(), new_key()


#: What is checked here is the same on every store (test_remote_store.py covers each one).
FILE_ONLY = pytest.mark.parametrize("remote_url", ["file"], indirect=True)


# -- the store -------------------------------------------------------------------------------
@FILE_ONLY
def test_a_reader_with_only_the_public_key_loads_signed_entries_and_refuses_the_others(
        remote_url: str, tmp_path: Path, backdoor: Backdoor,  # noqa: F811
        keys: tuple[Key, Key]) -> None:
    trusted, revoked = keys
    writer = open_remote(remote_url, ed25519_key=trusted.private)
    good = published(writer, tmp_path, b"signed by the trusted key", entry=ENTRY)
    published(open_remote(remote_url), tmp_path, b"unsigned", entry=ENTRY2)
    published(open_remote(remote_url, ed25519_key=revoked.private), tmp_path,
              b"signed by a revoked key", entry=ENTRY3)
    # forged: the good manifest naming another library, its signature kept
    evil = published(open_remote(remote_url), tmp_path, b"evil library", key=OTHER_KEY)
    stored = json.loads(backdoor.read(f"entries/{KEY}/{ENTRY}.json"))
    backdoor.write(f"entries/{KEY}/{ENTRY4}.json", json.dumps(
        {**stored, "sha256": evil["sha256"], "size": evil["size"]}).encode())
    # replayed: the good signed manifest copied under another key
    backdoor.write(f"entries/{OTHER_KEY}/{ENTRY2}.json", json.dumps(stored).encode())

    reader = open_remote(remote_url, trusted_keys=(trusted.public,))
    assert (reader.signed, reader.verifies) == (False, True)
    entries = {e.entry_digest: e for e in reader.list_manifests(KEY)}

    assert stored["signature"].startswith(f"ed25519:{trusted.key_id}:")
    assert entries[ENTRY].usable, entries[ENTRY].problem
    assert entries[ENTRY].manifest == stored
    assert reader.download(stored, dest_in(tmp_path)).read_bytes() == (
        b"signed by the trusted key")
    with pytest.raises(RemoteIntegrityError, match="is unsigned"):
        reader.download(good, dest_in(tmp_path))  # the same manifest, without its signature
    assert "is unsigned" in str(entries[ENTRY2].problem)
    assert f"signature by unknown key id {revoked.key_id}" in str(entries[ENTRY3].problem)
    assert f"signature by key id {trusted.key_id} that does not match" in str(
        entries[ENTRY4].problem)
    [replayed] = [e for e in reader.list_manifests(OTHER_KEY) if e.entry_digest == ENTRY2]
    assert f"is for key {KEY!r}" in str(replayed.problem)
    for entry in (entries[e] for e in (ENTRY2, ENTRY3, ENTRY4)):
        assert entry.manifest is not None
        with pytest.raises(RemoteIntegrityError, match="refusing to download"):
            reader.download(entry.manifest, dest_in(tmp_path))
    assert {e.entry_digest for e in reader.verify() if e.key_digest == KEY} == {
        ENTRY2, ENTRY3, ENTRY4}
    # revoking the writer = removing its key id: its entries go with it
    assert not open_remote(remote_url, trusted_keys=(revoked.public,)).list_manifests(KEY)[
        0].usable


def test_a_signature_copied_onto_another_manifest_does_not_verify(
        tmp_path: Path, keys: tuple[Key, Key]) -> None:
    trusted, _ = keys
    remote = open_remote(tmp_path.as_uri(), ed25519_key=trusted.private)
    published(remote, tmp_path, b"first", entry=ENTRY)
    published(remote, tmp_path, b"second", entry=ENTRY2)
    first = json.loads((tmp_path / "entries" / KEY / f"{ENTRY}.json").read_text())
    second_path = tmp_path / "entries" / KEY / f"{ENTRY2}.json"
    second = json.loads(second_path.read_text())
    second_path.write_text(json.dumps({**second, "signature": first["signature"]}))

    entries = {e.entry_digest: e for e in remote.list_manifests(KEY)}

    assert entries[ENTRY].usable
    assert "that does not match its content" in str(entries[ENTRY2].problem)


@FILE_ONLY
def test_a_job_with_only_public_keys_cannot_publish_an_entry_a_trusted_reader_accepts(
        remote_url: str, tmp_path: Path, backdoor: Backdoor,  # noqa: F811
        keys: tuple[Key, Key]) -> None:
    """It signs nothing (a signature it copies into its manifest is dropped), so its
    uploads, REDO included, are refused by every reader with keys, itself included."""
    trusted, _ = keys
    signed = published(open_remote(remote_url, ed25519_key=trusted.private), tmp_path,
                       b"trusted build", entry=ENTRY)
    copied = json.loads(backdoor.read(f"entries/{KEY}/{ENTRY}.json"))["signature"]
    pull_request = open_remote(remote_url, trusted_keys=(trusted.public,))
    library, manifest = make_library(tmp_path / "pr", b"pull request build")

    assert pull_request.upload(KEY, ENTRY2, library, {**manifest, "signature": copied})
    assert pull_request.upload(KEY, ENTRY, library, manifest, replace=True)

    stored = [json.loads(backdoor.read(n)) for n in backdoor.names() if n.startswith("entries/")]
    assert all("signature" not in m for m in stored if m["sha256"] == manifest["sha256"])
    for reader in (pull_request, open_remote(remote_url, trusted_keys=(trusted.public,))):
        usable = [e.manifest for e in reader.list_manifests(KEY) if e.usable]
        assert [m["sha256"] for m in usable if m] == [signed["sha256"]]
        assert "is unsigned" in str(reader.verify())


def test_the_ed25519_signature_format_is_pinned(keys: tuple[Key, Key]) -> None:
    """``ed25519:<key id>:<base64>`` over the canonical JSON without the signature; the
    key id is the first 16 hex digits of the SHA-256 of the raw public key: other tools
    can sign and check manifests."""
    trusted, _ = keys
    from pytest_mlcjit.cache.store.remote.signing import ManifestKeys

    manifest = {"size": 3, "sha256": "ab" * 32, "toolchain": {"b": 1, "a": "é"}}
    body = '{"sha256":"' + "ab" * 32 + '","size":3,"toolchain":{"a":"é","b":1}}'
    signature = ManifestKeys(ed25519_key=trusted.private).sign(
        {**manifest, "signature": "ignored"})

    assert signature is not None
    scheme, key_id, encoded = signature.split(":")
    assert (scheme, key_id) == ("ed25519", trusted.key_id)
    public = ed25519.Ed25519PublicKey.from_public_bytes(trusted.public)
    public.verify(base64.b64decode(encoded), body.encode("utf-8"))  # raises if wrong


def test_hmac_keeps_working_and_both_kinds_can_be_trusted_at_once(
        tmp_path: Path, keys: tuple[Key, Key]) -> None:
    trusted, _ = keys
    url = tmp_path.as_uri()
    published(open_remote(url, signing_key=b"team secret"), tmp_path, b"hmac", entry=ENTRY)
    published(open_remote(url, ed25519_key=trusted.private), tmp_path, b"ed", entry=ENTRY2)

    def problems(**options: Any) -> dict[str, str | None]:
        return {e.entry_digest: e.problem for e in open_remote(url, **options).list_manifests(
            KEY)}

    assert problems(signing_key=b"team secret", trusted_keys=(trusted.public,)) == {
        ENTRY: None, ENTRY2: None}
    hmac_only = problems(signing_key=b"team secret")
    assert hmac_only[ENTRY] is None
    assert f"unknown key id {trusted.key_id}" in str(hmac_only[ENTRY2])
    ed_only = problems(trusted_keys=(trusted.public,))
    assert "is signed with an HMAC secret" in str(ed_only[ENTRY])
    assert ed_only[ENTRY2] is None


def test_a_malformed_hmac_signature_is_refused_never_a_crash(tmp_path: Path) -> None:
    """A signature a bucket writer planted with a lone surrogate (valid JSON, no UTF-8
    text) or any other junk after ``hmac-sha256:`` is a refused entry for a reader with
    the secret, and ``remote verify`` reports it: never an exception."""
    url = tmp_path.as_uri()
    remote = open_remote(url, signing_key=b"team secret")
    manifest = published(remote, tmp_path, b"hmac", entry=ENTRY)
    for entry, junk in ((ENTRY2, "hmac-sha256:\ud800"), (ENTRY3, "hmac-sha256:" + "G" * 64)):
        (tmp_path / "entries" / KEY / f"{entry}.json").write_text(json.dumps(
            {**manifest, "key_digest": KEY, "digest": entry, "signature": junk}))

    problems = {e.entry_digest: e.problem for e in remote.list_manifests(KEY)}

    assert problems[ENTRY] is None
    for entry in (ENTRY2, ENTRY3):
        assert "has a malformed signature" in str(problems[entry]), problems
    ran = run_cli("remote", "verify", "--remote", url,
                  env={SIGNING: "team secret"})
    assert ran.returncode == 1, ran.stdout + ran.stderr
    assert ran.stdout.count("has a malformed signature") == 2, ran.stdout


# -- the keys from the environment -----------------------------------------------------------
def test_the_key_variables_take_pem_text_pem_files_and_hmac_secrets(
        tmp_path: Path, keys: tuple[Key, Key]) -> None:
    one, two = keys
    (tmp_path / "writer.pem").write_text(one.private_pem)
    (tmp_path / "writer-key").write_text(one.private_pem)  # an existing file: read too
    (tmp_path / "one.pem").write_text(one.public_pem)
    (tmp_path / "both.pem").write_text(one.public_pem + two.public_pem)

    assert keys_from_env({SIGNING: one.private_pem}) == (None, one.private, ())
    assert keys_from_env({SIGNING: str(tmp_path / "writer.pem")})[1] == one.private
    assert keys_from_env({SIGNING: str(tmp_path / "writer-key")})[1] == one.private
    assert keys_from_env({SIGNING: "s3cr/et+=="}) == (b"s3cr/et+==", None, ())
    for value in (one.public_pem + two.public_pem, str(tmp_path / "both.pem"),
                  f"{tmp_path / 'one.pem'}{os.pathsep}{two.public_pem}",
                  f"{tmp_path / 'one.pem'}\n{tmp_path / 'both.pem'}\n"):
        assert keys_from_env({TRUSTED: value})[2] == (one.public, two.public), value


@pytest.fixture(scope="module")
def bad_values(tmp_path_factory: pytest.TempPathFactory,
               keys: tuple[Key, Key]) -> dict[str, tuple[str, str, str]]:
    """name -> (variable, value, what the error says)."""
    one, _ = keys
    root = tmp_path_factory.mktemp("keys")
    ec_key = ec.generate_private_key(ec.SECP256R1())
    ec_pem = ec_key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()).decode()
    encrypted = ed25519.Ed25519PrivateKey.from_private_bytes(one.private).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw")).decode()
    broken = one.private_pem.replace(one.private_pem.splitlines()[1], "AAAA" * 10)
    return {
        "empty signing key": (SIGNING, " ", "it is set but empty"),
        "empty trusted keys": (TRUSTED, "  \n", "it is set but empty"),
        "malformed private PEM": (SIGNING, broken, "malformed or unsupported PEM"),
        "truncated PEM": (SIGNING, one.private_pem[:60], "is not one whole PEM block"),
        "missing .pem file": (SIGNING, str(root / "nowhere.pem"), "names no file"),
        "public key as signing key": (SIGNING, one.public_pem, "is a public key"),
        "encrypted private key": (SIGNING, encrypted, "is an encrypted private key"),
        "not an Ed25519 key": (SIGNING, ec_pem, "not an Ed25519 key"),
        "private key as trusted": (TRUSTED, one.private_pem, "holds a PRIVATE KEY block"),
        "missing trusted file": (TRUSTED, str(root / "gone.pem"), "names no file"),
        "malformed public PEM": (TRUSTED, one.public_pem.replace("MCow", "MCox"),
                                 "malformed or unsupported PUBLIC KEY"),
        "unterminated PEM": (TRUSTED, one.public_pem.rsplit("-----END", 1)[0],
                             "malformed PEM block"),
        # "$KEY_A:$KEY_B" where neither is set: it would trust no key, so verify nothing
        "trusted keys naming none": (TRUSTED, f"{os.pathsep} \n{os.pathsep}",
                                     "it names no key"),
        # openssl pkcs12 -nodes output: a private key, never an HMAC secret made of it
        "text around the private PEM": (SIGNING, f"Bag Attributes\n{one.private_pem}",
                                        "is not one whole PEM block"),
    }


@pytest.mark.parametrize("case", [
    "empty signing key", "empty trusted keys", "malformed private PEM", "truncated PEM",
    "missing .pem file", "public key as signing key", "encrypted private key",
    "not an Ed25519 key", "private key as trusted", "missing trusted file",
    "malformed public PEM", "unterminated PEM", "trusted keys naming none",
    "text around the private PEM"])
def test_a_bad_key_variable_is_a_config_error_naming_it(
        case: str, bad_values: dict[str, tuple[str, str, str]], keys: tuple[Key, Key]) -> None:
    variable, value, says = bad_values[case]
    with pytest.raises(RemoteConfigError) as info:
        keys_from_env({variable: value})

    message = str(info.value)
    assert message.startswith(f"invalid {variable}: "), message
    assert says in message, message
    assert "expected" in message, message
    assert keys[0].private_pem.splitlines()[1] not in message  # never the secret


def test_a_bad_key_variable_is_a_usage_error_at_start(
        project: Project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        keys: tuple[Key, Key]) -> None:
    """Named with what was expected, before any test runs, by the plugin and by
    ``pytest-mlcjit remote``; never a traceback."""
    monkeypatch.setenv("MLC_JIT_REMOTE", tmp_path.as_uri())
    project.write_tests(CONFIG)
    for variable, value, says in [(SIGNING, "", "it is set but empty"),
                                  (TRUSTED, keys[0].private_pem, "PRIVATE KEY block")]:
        monkeypatch.setenv(variable, value)
        result = project.run()
        err = result.stderr.str()
        assert result.ret == pytest.ExitCode.USAGE_ERROR, err
        assert f"invalid {variable}: " in err, err
        assert says in err, err
        assert "Traceback" not in err + result.stdout.str()
        ran = run_cli("remote", "ls")
        assert ran.returncode == 2, ran.stdout + ran.stderr
        assert f"invalid {variable}: " in ran.stdout + ran.stderr
        monkeypatch.delenv(variable)
    assert project.compiles() == []


# -- through the plugin ----------------------------------------------------------------------
def test_the_run_reads_its_keys_from_the_environment_and_says_what_it_verifies(
        project: Project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        keys: tuple[Key, Key]) -> None:
    """A writer whose MLC_JIT_REMOTE_SIGNING_KEY names its private key's file, a reader
    whose MLC_JIT_REMOTE_TRUSTED_KEYS names the public key's: the options a run opens its
    remote with (:func:`remote_options`) sign and verify with them, and the run header
    says so. (The download through the plugin is the same for both schemes:
    test_remote_tier.py.)"""
    trusted, _ = keys
    root = tmp_path / "remote"
    root.mkdir()
    monkeypatch.setenv("MLC_JIT_REMOTE", root.as_uri())
    (tmp_path / "writer.pem").write_text(trusted.private_pem)
    (tmp_path / "trusted.pem").write_text(trusted.public_pem)
    project.write_tests(CONFIG)

    monkeypatch.setenv(SIGNING, str(tmp_path / "writer.pem"))
    writer = open_remote(root.as_uri(), remote_options(from_environment()))
    published(writer, tmp_path, b"signed by the writer's key")
    result = project.run("--collect-only")
    assert (f"entries verified with Ed25519 key {trusted.key_id}; uploads signed with key "
            f"ed25519:{trusted.key_id}") in result.stdout.str()
    monkeypatch.delenv(SIGNING)
    monkeypatch.setenv(TRUSTED, str(tmp_path / "trusted.pem"))
    reader = open_remote(root.as_uri(), remote_options(from_environment()))
    result = project.run("--collect-only")

    assert (reader.signed, reader.verifies) == (False, True)
    [entry] = reader.list_manifests(KEY)
    assert entry.usable, entry.problem
    assert entry.manifest is not None
    assert reader.download(entry.manifest, dest_in(tmp_path)).read_bytes() == (
        b"signed by the writer's key")
    assert (f"entries verified with Ed25519 key {trusted.key_id}; no uploads: this job holds "
            "no signing key" in result.stdout.str())
    assert project.compiles() == []


def test_a_job_with_only_public_keys_reads_and_uploads_nothing(
        project: Project, keys: tuple[Key, Key], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every entry a job without a signing key could upload would be unsigned, refused by
    each reader that verifies: with trusted keys and no signing key, the run compiles what
    the remote lacks and uploads nothing (the remote's directory stays empty)."""
    trusted, _ = keys
    root = tmp_path / "remote"
    root.mkdir()
    monkeypatch.setenv(TRUSTED, trusted.public_pem)
    project.write_tests(CONFIG)
    result = project.run(f"--mlc-jit-remote={root.as_uri()}")

    result.assert_outcomes(passed=1)
    assert len(project.compiles()) == 1
    assert [p for p in root.rglob("*") if p.is_file()] == []
    assert "no uploads: this job holds no signing key" in result.stdout.str()
