"""The remote tier through the plugin, against a real S3-compatible server (moto's, on
127.0.0.1): "machines" are separate cache directories of one pytester project; compiles
are counted by the factory itself, in the compile subprocess; what the remote holds is
read with a plain boto3 client. Runs are in-process except where xdist is the subject
(``-n 2``) or two processes at once are (the reliability tier).

The tiered store's rules themselves (miss, hit, backfill, upload, down, required, auth,
integrity, READONLY) are tested through the storage interface in test_tiered_store.py;
here, that the plugin wires them: options and variables, messages, summary, exit status.
Where a library on the remote is all a test needs, it is put there from the shared warm
cache (:func:`publish_cache`) instead of being compiled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from s3server import StallingServer, closed_port
from test_mlc import STANDIN_ONLY, model_dir, standin  # noqa: F401 (fixtures)

from conftest import Project, run_cli, wait_until
from pytest_mlcjit.cache.store.remote import open_remote
from pytest_mlcjit.engine.remote import REMOTE_RETRIES

pytest_plugins = ["s3server"]

CONFIGS = [{"hidden": 4}, {"hidden": 6}, {"hidden": 8}]
SECRET = "trusted-branch-secret"
SIGNING_KEY_ENV = "MLC_JIT_REMOTE_SIGNING_KEY"


@dataclasses.dataclass
class Bucket:
    """An S3 remote: its URL (set as MLC_JIT_REMOTE), its bucket, a plain boto3 client."""

    url: str
    name: str
    admin: Any

    def manifests(self) -> dict[str, list[str]]:
        """Key digest → the entries (manifest names) the remote holds for it."""
        found: dict[str, list[str]] = {}
        listed = self.admin.list_objects_v2(Bucket=self.name, Prefix="ci/entries/")
        for obj in listed.get("Contents", []):
            _, _, key, name = obj["Key"].split("/")
            found.setdefault(key, []).append(name)
        return found

    def stored_manifests(self) -> list[dict[str, Any]]:
        listed = self.admin.list_objects_v2(Bucket=self.name, Prefix="ci/entries/")
        return [json.loads(self.read(o["Key"])) for o in listed.get("Contents", [])]

    def read(self, key: str) -> bytes:
        data: bytes = self.admin.get_object(Bucket=self.name, Key=key)["Body"].read()
        return data

    def write(self, key: str, data: bytes) -> None:
        self.admin.put_object(Bucket=self.name, Key=key, Body=data)


@pytest.fixture
def remote(s3_bucket: str, s3_admin: Any, monkeypatch: pytest.MonkeyPatch) -> Bucket:
    """An S3 remote (a fresh bucket of the session's moto server), set as MLC_JIT_REMOTE."""
    url = f"s3://{s3_bucket}/ci"
    monkeypatch.setenv("MLC_JIT_REMOTE", url)
    return Bucket(url, s3_bucket, s3_admin)


def machine(project: Project, name: str) -> Project:
    """The same project as seen from another machine: a cache directory of its own."""
    return Project(project.pytester, project.cache.parent / f"cache-{name}", project.counter)


def run(project: Project, *args: str) -> tuple[int, str]:
    result = project.run("--mlc-device=cpu", "-p", "no:randomly", *args)
    return result.ret, result.stdout.str() + result.stderr.str()


def cli(*args: str) -> tuple[int, str]:
    """``pytest-mlcjit remote ARGS`` in this process (:func:`conftest.run_cli`); its exit
    status and output (stdout, then stderr)."""
    ran = run_cli("remote", *args)
    return ran.returncode, ran.stdout + ran.stderr


#: A conftest recording, after each test, the libraries in the run's private download
#: directories (where READONLY keeps what it downloads).
RECORD_DOWNLOADS = '''
import pathlib, tempfile
import pytest


@pytest.fixture(autouse=True)
def _record_private_downloads():
    yield
    with open({record!r}, "a") as f:
        for path in pathlib.Path(tempfile.gettempdir()).glob("mlcjit-remote-*/tvm/*.so"):
            f.write(f"{{path}}\\n")
'''


def hmac_sha256(manifest: dict[str, Any], key: bytes) -> str:
    """The signature format, computed here: HMAC-SHA256 over the canonical JSON (sorted
    keys, no spaces, UTF-8) of the manifest without its signature."""
    body = {k: v for k, v in manifest.items() if k != "signature"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "hmac-sha256:" + hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


def counted(out: str, word: str) -> int:
    """The number before ``word`` in the remote's summary line (0 if absent)."""
    match = re.search(rf"(\d+) {word}s?\b", out)
    return int(match.group(1)) if match else 0


def publish_cache(cache: Path, url: str, *, replace: bool = False) -> int:
    """Put every entry of a local cache on the remote, as the run that compiled them would
    have uploaded them (the manifest without the local-only ``log`` and ``remote``), with
    no signing key; returns how many."""
    remote = open_remote(url)
    done = 0
    for path in sorted((cache / "tvm").glob("*.manifest.json")):
        manifest = json.loads(path.read_text())
        body = {k: v for k, v in manifest.items() if k not in ("log", "remote")}
        assert remote.upload(manifest["key_digest"], manifest["digest"],
                             path.with_name(manifest["library"]), body, replace=replace)
        done += 1
    return done


# -- sharing libraries ---------------------------------------------------------------------
def test_prepare_shards_fill_the_remote_and_other_machines_compile_nothing(
        project: Project, remote: Bucket, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Two CI jobs prepare one shard each: every library is compiled once and uploaded
    once. A machine running the tests under xdist (-n 2: its workers' downloads counted
    together) downloads every library and compiles nothing. READONLY on a read-only cache
    directory hits every library remotely and leaves nothing behind: not in the cache,
    not in its private download directory."""
    project.write_tests(CONFIGS, per_config=2)
    uploads = 0
    for index in (1, 2):
        ret, out = run(machine(project, f"shard{index}"), "--mlc-jit-prepare",
                       f"--mlc-jit-shard={index}/2")
        assert ret == 0, out
        assert f"shard {index}/2 (--mlc-jit-shard)" in out, out
        uploads += counted(out, "(?:library|libraries) uploaded")
    compiled = sorted(line.split()[1] for line in project.compiles())
    assert compiled == sorted(f"hidden={c['hidden']}" for c in CONFIGS), "each once"
    assert uploads == len(CONFIGS)
    entries = remote.manifests()
    assert len(entries) == len(CONFIGS)
    assert all(len(names) == 1 for names in entries.values()), entries

    b = machine(project, "b")
    ret, out = run(b, "-n", "2")
    assert ret == 0, out
    assert len(project.compiles()) == len(CONFIGS), "machine B compiled"
    assert "3 libraries downloaded" in out, out
    assert len(b.libraries()) == len(CONFIGS)

    readonly = machine(project, "c")
    readonly.cache.mkdir(mode=0o555)
    private = tmp_path / "tmp"
    private.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private))
    seen = tmp_path / "downloads-seen.txt"
    project.pytester.makeconftest(RECORD_DOWNLOADS.format(record=str(seen)))
    ret, out = run(readonly, "--mlc-jit-policy=READONLY")
    assert ret == 0, out
    assert "6 remote hits" in out, out
    assert not list(readonly.cache.iterdir()), "READONLY wrote into the cache"
    assert len(set(seen.read_text().split())) == len(CONFIGS), "not downloaded privately"
    assert not list(private.glob("mlcjit-remote-*")), "the private downloads outlived the run"
    assert len(project.compiles()) == len(CONFIGS)
    assert remote.manifests() == entries


def test_read_mode_uploads_nothing(project: Project, remote: Bucket) -> None:
    project.write_tests(CONFIGS[:1])
    ret, out = run(machine(project, "a"), "--mlc-jit-remote-mode=read")
    assert ret == 0, out
    assert len(project.compiles()) == 1
    assert not remote.manifests()


# -- integrity and signatures --------------------------------------------------------------------
def test_a_tampered_library_is_never_loaded(
        project: Project, remote: Bucket, warm_template: Path) -> None:
    """A library on the remote whose bytes were changed fails its digest check: reported,
    never loaded; READONLY fails, ON compiles instead; ``remote verify`` finds it and
    ``remote prune`` removes it. (A valid library of another entry in its place is refused
    the same way: test_tiered_store.py, test_remote_store.py.)"""
    project.write_tests(CONFIGS[:1])
    seeder = machine(project, "a")
    seeder.warm(warm_template)
    assert publish_cache(seeder.cache, remote.url) == 1
    [stored] = remote.stored_manifests()
    blob = f"ci/blobs/{stored['sha256']}"
    original = remote.read(blob)
    tampered = bytearray(original)
    tampered[len(tampered) // 2] ^= 0xFF
    remote.write(blob, bytes(tampered))

    rc, out = cli("ls")
    assert rc == 0, out
    assert out.startswith(f"{remote.url}: 1 entry"), out
    rc, out = cli("verify")
    assert rc == 1, out
    assert "1 entry checked" in out, out
    assert "1 bad" in out, out

    reader = machine(project, "r")
    ret, out = run(reader, "--mlc-jit-policy=READONLY")
    assert ret == 1, out
    assert "not loaded" in out, out
    assert reader.libraries() == []
    assert project.compiles() == []
    builder = machine(project, "b")
    ret, out = run(builder)
    assert ret == 0, out
    assert len(project.compiles()) == 1, "ON did not compile instead of loading"
    assert "warning: " in out, out
    assert stored["sha256"] in out, out
    [library] = builder.libraries()
    assert library.read_bytes() != bytes(tampered)

    rc, out = cli("prune", "--older-than", "0s")
    assert rc == 0, out
    rc, out = cli("ls")
    assert out.startswith(f"{remote.url}: 0 entries"), out


def test_signed_manifests_only(project: Project, remote: Bucket,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    """With MLC_JIT_REMOTE_SIGNING_KEY set, a run signs what it uploads with it, and
    accepts only manifests signed with it: one signed with another key, or unsigned, is
    refused (the message says so) and never loaded. A job without the secret (a pull
    request) still reads signed entries."""
    project.write_tests(CONFIGS[:1])
    monkeypatch.setenv(SIGNING_KEY_ENV, "another-secret")
    writer = machine(project, "writer")
    ret, out = run(writer)
    assert ret == 0, out
    assert len(project.compiles()) == 1
    [stored] = remote.stored_manifests()
    assert stored["signature"] == hmac_sha256(stored, b"another-secret")

    monkeypatch.setenv(SIGNING_KEY_ENV, SECRET)
    ret, out = run(machine(project, "trusted-reader"), "--mlc-jit-policy=READONLY")
    assert ret == 1, out
    assert "signature that does not match" in out, out
    monkeypatch.delenv(SIGNING_KEY_ENV)
    ret, out = run(machine(project, "pull-request"), "--mlc-jit-policy=READONLY")
    assert ret == 0, out

    publish_cache(writer.cache, remote.url, replace=True)  # a writer without the key
    [stored] = remote.stored_manifests()
    assert "signature" not in stored
    monkeypatch.setenv(SIGNING_KEY_ENV, SECRET)
    ret, out = run(machine(project, "signed-reader"), "--mlc-jit-policy=READONLY")
    assert ret == 1, out
    assert "is unsigned, and a signing key is set" in out, out
    assert len(project.compiles()) == 1


# -- a remote that fails -----------------------------------------------------------------------
@pytest.fixture
def stalling_remote(monkeypatch: pytest.MonkeyPatch) -> Iterator[StallingServer]:
    """A remote whose server accepts connections and never answers; set for the runs
    (dummy credentials, a read timeout of 0.5 s)."""
    server = StallingServer()
    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                        ("AWS_DEFAULT_REGION", "us-east-1"),
                        ("AWS_ENDPOINT_URL", server.endpoint),
                        ("MLC_JIT_REMOTE_CONNECT_TIMEOUT", "1"),
                        ("MLC_JIT_REMOTE_READ_TIMEOUT", "0.5"),
                        ("MLC_JIT_REMOTE", "s3://stalled/ci")):
        monkeypatch.setenv(name, value)
    try:
        yield server
    finally:
        server.close()


def test_an_unanswering_remote_is_warned_once_and_the_run_compiles_locally(
        project: Project, stalling_remote: StallingServer) -> None:
    """A server that never answers: the first request gives up after the configured
    read timeout (the client hangs up each time, never the server, whose patience is far
    below the 60 s default) and the configured retries; the run warns once, naming the
    remote and the error, compiles locally and passes, and the second library does not
    ask the remote at all."""
    project.write_tests(CONFIGS[:2], per_config=2)
    ret, out = run(machine(project, "a"))
    assert ret == 0, out
    warnings = [line for line in out.splitlines() if line.startswith("warning: remote")]
    assert len(warnings) == 1, out
    assert "s3://stalled/ci" in warnings[0], out
    assert "timed out" in warnings[0], out
    assert "is not used for the rest of this run" in warnings[0], out
    assert len(project.compiles()) == 2
    tries = 1 + REMOTE_RETRIES
    wait_until(stalling_remote.settled, "the server to see the hang-ups")
    assert stalling_remote.hangups == ["client"] * tries


def test_a_stopped_server_fails_a_run_that_requires_the_remote(
        project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing listens at the endpoint any more: with --mlc-jit-remote-required the run
    fails with the remote's error instead of compiling."""
    endpoint = f"http://127.0.0.1:{closed_port()}"
    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                        ("AWS_DEFAULT_REGION", "us-east-1"), ("AWS_ENDPOINT_URL", endpoint),
                        ("MLC_JIT_REMOTE", "s3://stopped/ci")):
        monkeypatch.setenv(name, value)
    project.write_tests(CONFIGS[:1])
    required = machine(project, "c")
    ret, out = run(required, "--mlc-jit-remote-required")
    assert ret == 1, out
    assert "RemoteUnavailableError" in out, out
    assert endpoint in out, out
    assert project.compiles() == []
    assert required.libraries() == []


# -- usage errors ----------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["0/2", "3/2", "x", "1/0"])
def test_a_bad_shard_is_a_usage_error(project: Project, bad: str) -> None:
    project.write_tests(CONFIGS[:1])
    result = project.run("--mlc-jit-prepare", f"--mlc-jit-shard={bad}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert f"invalid --mlc-jit-shard {bad!r}: expected I/N with 1 <= I <= N" in (
        result.stderr.str())


@pytest.mark.parametrize("url", ["http://bucket/x", "s3://", "file://relative/path", "ftp:x"])
def test_a_malformed_remote_url_is_a_usage_error(project: Project, url: str) -> None:
    project.write_tests(CONFIGS[:1])
    result = project.run(f"--mlc-jit-remote={url}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    err = result.stderr.str()
    assert "invalid --mlc-jit-remote" in err, err
    assert "s3://" in err, err


# -- MLC libraries ---------------------------------------------------------------------------
@STANDIN_ONLY
def test_mlc_entries_are_shared_under_mlc_file_names(
        tmp_path: Path, model_dir: Path, standin: Path) -> None:  # noqa: F811 (fixtures)
    """An MLC model library (through test_mlc.py's ``mlc_llm``: the stand-in, whose
    compile command counts its compiles) goes through a file:// remote like any other, and
    lands on the second machine under MLC-LLM's own name, model_lib/<md5>.so, without
    compiling there."""
    from pytest_mlcjit import JIT, Settings
    from pytest_mlcjit.compiler.backends.mlc import MLCModel

    shared = tmp_path / "shared"
    shared.mkdir()
    url = shared.as_uri()
    home_a = JIT(Settings(cache_dir=tmp_path / "home-a", remote=url))
    first = home_a.compile(MLCModel(model_dir), "cpu")
    home_a.close()
    assert not first.hit
    home_b = JIT(Settings(cache_dir=tmp_path / "home-b", remote=url))
    second = home_b.compile(MLCModel(model_dir), "cpu")
    home_b.close()
    assert second.hit
    assert second.path == tmp_path / "home-b" / "model_lib" / f"{first.digest}.so"
    assert second.path.read_bytes() == first.path.read_bytes()
    assert len(standin.read_text().splitlines()) == 1


# -- reliability: machines at once -------------------------------------------------------------
@pytest.mark.reliability
def test_two_machines_cold_at_once_publish_one_entry_per_key(
        project: Project, remote: Bucket) -> None:
    """Two machines (each pytest -n 2) start cold on the same keys at the same moment:
    every test passes and the remote holds exactly one valid entry per key. (The default
    tier's deterministic case: test_tiered_store.py, two machines publishing one entry.)"""
    project.write_tests(CONFIGS, per_config=2)
    procs = [subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:randomly",
         f"--mlc-jit-cache-dir={machine(project, name).cache}", "--mlc-device=cpu", "-n", "2"],
        cwd=project.pytester.path, env=dict(os.environ), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True) for name in ("a", "b")]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    entries = remote.manifests()
    assert len(entries) == len(CONFIGS)
    assert all(len(names) == 1 for names in entries.values()), entries
    rc, out = cli("verify", "--remote", remote.url)
    assert rc == 0, out
