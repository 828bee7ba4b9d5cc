"""The remote tier against a real S3-compatible server (moto's, started by the tests on
127.0.0.1): "machines" are separate cache directories; compiles are counted by the
factory itself, in the compile subprocess."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Project

pytest_plugins = ["s3server"]

CONFIGS = [{"hidden": 4}, {"hidden": 6}, {"hidden": 8}]
SECRET = "trusted-branch-secret"


@pytest.fixture
def remote(project: Project, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The tiny-model project with an S3 remote (the bucket of a fresh moto server)."""
    monkeypatch.setenv("MLC_JIT_REMOTE", f"s3://{s3_bucket}/ci")
    project.write_tests(CONFIGS, per_config=2)
    return f"s3://{s3_bucket}/ci"


def machine(project: Project, name: str) -> Project:
    """The same project as seen from another machine: a cache directory of its own."""
    return Project(project.pytester, project.cache.parent / f"cache-{name}", project.counter)


def run(project: Project, *args: str) -> tuple[int, str]:
    result = project.run("--mlc-device=cpu", "-p", "no:randomly", *args)
    return result.ret, result.stdout.str() + result.stderr.str()


def manifests(s3_admin: Any, bucket: str) -> dict[str, list[str]]:
    """Key digest → the entries (manifest names) the remote holds for it."""
    found: dict[str, list[str]] = {}
    listed = s3_admin.list_objects_v2(Bucket=bucket, Prefix="ci/entries/")
    for obj in listed.get("Contents", []):
        _, _, key, name = obj["Key"].split("/")
        found.setdefault(key, []).append(name)
    return found


def test_a_second_machine_gets_every_library_from_the_remote(
        project: Project, remote: str, s3_admin: Any, s3_bucket: str) -> None:
    """Machine A (-n 2, cold) compiles and uploads; machine B (a fresh cache, -n 2)
    compiles nothing and passes; READONLY on a third cache writes nothing into it."""
    ret, out = run(machine(project, "a"), "-n", "2")
    assert ret == 0, out
    assert len(project.compiles()) == 3
    assert "3 uploads" in out, out
    entries = manifests(s3_admin, s3_bucket)
    assert len(entries) == 3
    assert all(len(names) == 1 for names in entries.values())

    ret, out = run(machine(project, "b"), "-n", "2")
    assert ret == 0, out
    assert len(project.compiles()) == 3, "machine B compiled"
    assert "3 downloads" in out, out
    assert len(machine(project, "b").libraries()) == 3

    readonly = machine(project, "c")
    readonly.cache.mkdir(mode=0o555)
    ret, out = run(readonly, "-n", "2", "--mlc-jit-policy=READONLY")
    assert ret == 0, out
    assert "6 remote hits" in out, out
    assert not list(readonly.cache.iterdir()), "READONLY wrote into the cache"
    assert len(project.compiles()) == 3


def test_two_machines_cold_at_once_publish_one_entry_per_key(
        project: Project, remote: str, s3_admin: Any, s3_bucket: str) -> None:
    """Two machines start cold on the same keys at the same moment: every test passes and
    the remote holds exactly one valid entry per key."""
    env = dict(os.environ)
    procs = [subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:randomly",
         f"--mlc-jit-cache-dir={machine(project, name).cache}", "--mlc-device=cpu", "-n", "2"],
        cwd=project.pytester.path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True) for name in ("a", "b")]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    entries = manifests(s3_admin, s3_bucket)
    assert len(entries) == 3
    assert all(len(names) == 1 for names in entries.values()), entries
    verify = project.pytester.run(sys.executable, "-m", "pytest_mlcjit", "remote", "verify",
                                  "--remote", remote)
    assert verify.ret == 0, verify.stdout.str()


def test_a_tampered_or_swapped_library_is_never_loaded(
        project: Project, remote: str, s3_admin: Any, s3_bucket: str) -> None:
    """A blob whose bytes were changed (tampered), or replaced by another entry's library
    (swapped), fails its digest check: reported, never loaded; ON compiles instead,
    READONLY fails."""
    project.write_tests(CONFIGS[:2], per_config=1)
    ret, out = run(machine(project, "a"))
    assert ret == 0, out
    listed = s3_admin.list_objects_v2(Bucket=s3_bucket, Prefix="ci/entries/")
    names = [o["Key"] for o in listed["Contents"]]
    first, second = (json.loads(s3_admin.get_object(Bucket=s3_bucket, Key=n)["Body"].read())
                     for n in names)
    def blob(manifest: dict[str, Any]) -> str:
        return f"ci/blobs/{manifest['sha256']}"

    original = s3_admin.get_object(Bucket=s3_bucket, Key=blob(first))["Body"].read()
    tampered = bytearray(original)
    tampered[len(tampered) // 2] ^= 0xFF
    s3_admin.put_object(Bucket=s3_bucket, Key=blob(first), Body=bytes(tampered))
    # The second entry's blob swapped for the first's library (a valid library, not its own).
    s3_admin.put_object(Bucket=s3_bucket, Key=blob(second), Body=original)

    def cli(*args: str) -> Any:
        return project.pytester.run(sys.executable, "-m", "pytest_mlcjit", "remote", *args,
                                    "--remote", remote)

    listed = cli("ls")
    assert listed.ret == 0
    assert "2 entries" in listed.stdout.str()
    verify = cli("verify")
    assert verify.ret == 1, verify.stdout.str()
    assert "2 entries checked" in verify.stdout.str()
    assert "2 bad" in verify.stdout.str()

    ret, out = run(machine(project, "r"), "--mlc-jit-policy=READONLY")
    assert ret == 1, out
    assert "not loaded" in out, out
    compiled = len(project.compiles())
    ret, out = run(machine(project, "b"))
    assert ret == 0, out
    assert len(project.compiles()) == compiled + 2, "ON compiled both instead of loading"
    assert out.count("warning: ") >= 2, out
    assert "sha256" in out, out
    pruned = cli("prune", "--older-than", "0s")
    assert pruned.ret == 0, pruned.stdout.str()
    assert cli("ls").stdout.str().startswith(f"{remote}: 0 entries")


def test_signed_manifests_only(project: Project, remote: str, s3_admin: Any, s3_bucket: str,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    """With MLC_JIT_REMOTE_SIGNING_KEY set, an unsigned manifest and one signed with
    another key are refused (the message says so) and compiled locally; a job without the
    secret (a pull request) can still read signed entries."""
    project.write_tests(CONFIGS[:1], per_config=1)
    ret, out = run(machine(project, "unsigned-writer"))  # no key: uploads unsigned
    assert ret == 0, out
    monkeypatch.setenv("MLC_JIT_REMOTE_SIGNING_KEY", SECRET)
    ret, out = run(machine(project, "signed-reader"))
    assert ret == 0, out
    assert "is unsigned, and a signing key is set" in out, out
    assert len(project.compiles()) == 2, "the unsigned entry was loaded"

    s3_admin.delete_objects(Bucket=s3_bucket, Delete={"Objects": [
        {"Key": o["Key"]} for o in s3_admin.list_objects_v2(
            Bucket=s3_bucket, Prefix="ci/")["Contents"]]})
    monkeypatch.setenv("MLC_JIT_REMOTE_SIGNING_KEY", "another-secret")
    ret, out = run(machine(project, "wrong-key-writer"))
    assert ret == 0, out
    monkeypatch.setenv("MLC_JIT_REMOTE_SIGNING_KEY", SECRET)
    ret, out = run(machine(project, "trusted-reader"))
    assert ret == 0, out
    assert "signature that does not match" in out, out
    assert len(project.compiles()) == 4

    monkeypatch.delenv("MLC_JIT_REMOTE_SIGNING_KEY")  # a pull request: reads signed entries
    ret, out = run(machine(project, "pull-request"), "--mlc-jit-policy=READONLY")
    assert ret == 0, out
    assert len(project.compiles()) == 4


def test_a_server_stopped_mid_run(project: Project,
                                  spare_s3_server: tuple[Any, str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The server stops after the first machine: by default the run passes, compiling
    locally, with one warning naming the error and the URL; with
    --mlc-jit-remote-required it fails."""
    server, endpoint = spare_s3_server
    import boto3  # type: ignore[import-untyped]

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("MLC_JIT_REMOTE_CONNECT_TIMEOUT", "1")
    monkeypatch.setenv("MLC_JIT_REMOTE_READ_TIMEOUT", "2")
    boto3.session.Session().client("s3", endpoint_url=endpoint).create_bucket(Bucket="spare")
    monkeypatch.setenv("MLC_JIT_REMOTE", "s3://spare/ci")
    project.write_tests(CONFIGS[:2], per_config=2)
    ret, out = run(machine(project, "a"))
    assert ret == 0, out
    server.stop()

    t0 = time.monotonic()
    ret, out = run(machine(project, "b"))
    assert ret == 0, out
    assert time.monotonic() - t0 < 120
    warnings = [line for line in out.splitlines() if line.startswith("warning: remote")]
    assert len(warnings) == 1, out
    assert "s3://spare/ci" in warnings[0], out
    assert "is not used for the rest of this run" in warnings[0], out
    assert len(project.compiles()) == 4

    ret, out = run(machine(project, "c"), "--mlc-jit-remote-required")
    assert ret == 1, out
    assert "RemoteUnavailableError" in out, out


@pytest.fixture
def stalling_endpoint() -> Iterator[str]:
    """An endpoint that accepts connections and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(sock.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    sock.close()


def test_a_stalling_server_costs_bounded_time(project: Project, stalling_endpoint: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that never answers: the run falls back within the documented timeouts
    and passes with the warning; nothing hangs."""
    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                        ("AWS_DEFAULT_REGION", "us-east-1"),
                        ("AWS_ENDPOINT_URL", stalling_endpoint),
                        ("MLC_JIT_REMOTE_CONNECT_TIMEOUT", "1"),
                        ("MLC_JIT_REMOTE_READ_TIMEOUT", "1"),
                        ("MLC_JIT_REMOTE", "s3://stalled/ci")):
        monkeypatch.setenv(name, value)
    project.write_tests(CONFIGS[:1], per_config=1)
    t0 = time.monotonic()
    ret, out = run(machine(project, "a"))
    elapsed = time.monotonic() - t0
    assert ret == 0, out
    assert "warning: remote s3://stalled/ci failed" in out, out
    assert elapsed < 60, f"{elapsed:.1f}s"


def test_two_prepare_shards_fill_the_remote(project: Project, remote: str) -> None:
    """Two CI jobs prepare one shard each into the remote; a READONLY run on a third
    machine then hits every library, remotely."""
    configs = [{"hidden": h} for h in (3, 4, 5, 6, 7, 8)]
    project.write_tests(configs, per_config=1)
    for index in (1, 2):
        ret, out = run(machine(project, f"shard{index}"), "--mlc-jit-prepare",
                       f"--mlc-jit-shard={index}/2")
        assert ret == 0, out
        assert f"shard {index}/2 (--mlc-jit-shard)" in out, out
    compiled = sorted(line.split()[1] for line in project.compiles())
    assert compiled == sorted(f"hidden={c['hidden']}" for c in configs), "each once"
    ret, out = run(machine(project, "gpu-runner"), "--mlc-jit-policy=READONLY")
    assert ret == 0, out
    assert "6 remote hits" in out, out
    assert len(project.compiles()) == 6


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


def test_readwrite_mode_read_uploads_nothing(project: Project, remote: str, s3_admin: Any,
                                             s3_bucket: str) -> None:
    project.write_tests(CONFIGS[:1])
    ret, out = run(machine(project, "a"), "--mlc-jit-remote-mode=read")
    assert ret == 0, out
    assert not manifests(s3_admin, s3_bucket)


def test_mlc_entries_are_shared_under_mlc_file_names(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """An MLC model library (through the mlc_llm stand-in: the real one is not on PyPI)
    goes through a file:// remote like any other, and lands on the second machine under
    MLC-LLM's own name, model_lib/<md5>.so, without compiling there."""
    from test_mlc import STANDIN  # the stand-in's location

    monkeypatch.syspath_prepend(str(STANDIN))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(STANDIN), *filter(None, [os.environ.get("PYTHONPATH")])]))
    counter = tmp_path / "mlc-compiles.txt"
    monkeypatch.setenv("MLC_STANDIN_COUNT_FILE", str(counter))
    from make_model_dir import make_model_dir  # type: ignore[import-not-found,unused-ignore]

    from pytest_mlcjit import JIT, Settings
    from pytest_mlcjit.build.backends.mlc import MLCModel

    model_dir = make_model_dir(tmp_path / "Llama-q4f16_1-MLC")
    shared = tmp_path / "shared"
    shared.mkdir()
    url = f"file://{shared}"
    first = JIT(Settings(cache_dir=tmp_path / "home-a", remote=url)).compile(
        MLCModel(model_dir), "cpu")
    assert not first.hit
    second = JIT(Settings(cache_dir=tmp_path / "home-b", remote=url)).compile(
        MLCModel(model_dir), "cpu")
    assert second.hit
    assert second.path == tmp_path / "home-b" / "model_lib" / f"{first.digest}.so"
    assert second.path.read_bytes() == first.path.read_bytes()
    assert len(counter.read_text().splitlines()) == 1
