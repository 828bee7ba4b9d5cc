"""The ``gha://`` remote, the GitHub Actions cache.

GitHub's cache service runs only for GitHub's runners and cannot run here: the one mock of
these tests is :mod:`gha_standin`, which replaces it (the service's three Twirp methods,
its scoping by branch, its creation limit, throttling on demand), with the blobs in
Azurite, the real Azure Storage emulator. The stand-in is proven first with the official
client, ``@actions/cache``, run under node (``tests/node/gha_client.js``): what it saves
is restored, and entries cross between it and this package's client both ways.

Tests that start Azurite or node are in the ``servers`` tier (``--run-servers -m
servers``). The default tier keeps the bad inputs and what needs no blob store (a stand-in
without one): throttling at the first request of a run, throttling that outlasts the
bound on every write, a refused token.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import math
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from azurite import NODE_DIR, Azurite, missing
from gha_standin import GHAStandin, running

from conftest import Project, run_cli
from pytest_mlcjit.cache.store.remote import open_remote
from pytest_mlcjit.cache.store.remote.gha import GHARemote, _Pacer, retry_after
from pytest_mlcjit.engine.settings import resolve
from pytest_mlcjit.errors import (
    ConfigError,
    RemoteAuthError,
    RemoteConfigError,
    RemoteUnavailableError,
)

pytest_plugins = ["azurite"]

GHA_ENV = ("ACTIONS_RESULTS_URL", "ACTIONS_RUNTIME_TOKEN", "ACTIONS_CACHE_SERVICE_V2",
           "MLC_JIT_GHA_MAX_WAIT", "MLC_JIT_GHA_RATE", "MLC_JIT_GHA_RATE_WINDOW",
           "GITHUB_REPOSITORY", "GITHUB_SERVER_URL", "MLC_JIT_REMOTE")
CONFIGS = [{"hidden": 4}, {"hidden": 6}]


@pytest.fixture(autouse=True)
def _no_gha_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in GHA_ENV:
        monkeypatch.delenv(name, raising=False)


def use(standin: GHAStandin, monkeypatch: pytest.MonkeyPatch, token: str | None = None) -> str:
    """Point ACTIONS_RESULTS_URL and ACTIONS_RUNTIME_TOKEN at the stand-in; the token."""
    token = token or standin.token("refs/heads/main")
    monkeypatch.setenv("ACTIONS_RESULTS_URL", standin.url)
    monkeypatch.setenv("ACTIONS_RUNTIME_TOKEN", token)
    return token


@pytest.fixture
def bare(monkeypatch: pytest.MonkeyPatch) -> Iterator[GHAStandin]:
    """A stand-in with no blob store (nothing gets that far), set as the service."""
    with running(None) as standin:
        use(standin, monkeypatch)
        yield standin


@pytest.fixture
def standin(azurite: Azurite, monkeypatch: pytest.MonkeyPatch) -> Iterator[GHAStandin]:
    """A stand-in with its blobs in Azurite, set as the service (main branch's token)."""
    with running(azurite) as service:
        use(service, monkeypatch)
        yield service


def library(directory: Path, data: bytes) -> tuple[str, str, Path, dict[str, Any]]:
    """A fake library and its manifest: (key digest, entry digest, path, manifest)."""
    digest = hashlib.sha256(b"key " + data).hexdigest()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{digest[:12]}.so"
    path.write_bytes(data)
    return digest, digest, path, {"digest": digest, "sha256": hashlib.sha256(data).hexdigest(),
                                  "size": len(data), "created": time.time()}


def fetched(remote: Any, key: str, dest: Path) -> bytes | None:
    """The library of ``key``'s entry as ``remote`` downloads it, None if it sees none."""
    entries = [e for e in remote.list_manifests(key) if e.usable]
    if not entries:
        return None
    remote.download(entries[0].manifest, dest)
    data = dest.read_bytes()
    dest.unlink()
    return data


# -- bad input (default tier) -----------------------------------------------------------------
@pytest.mark.parametrize("url", ["gha://v2/extra", "gha://user@v2", "gha://v2:80", "gha://-x",
                                 "gha://" + "x" * 65, "gha://a b"])
def test_a_malformed_gha_url_is_refused_naming_it(url: str) -> None:
    with pytest.raises(RemoteConfigError) as info:
        open_remote(url)
    assert url.rsplit("@", maxsplit=1)[-1][:20] in str(info.value)
    assert "gha://[SCOPE]" in str(info.value), "the valid form"


def test_missing_variables_are_named_with_the_step_that_exports_them(
        monkeypatch: pytest.MonkeyPatch, project: Project) -> None:
    with pytest.raises(RemoteConfigError) as info:
        open_remote("gha://")
    message = str(info.value)
    assert "ACTIONS_RESULTS_URL and ACTIONS_RUNTIME_TOKEN" in message
    assert "core.exportVariable" in message
    assert "actions/github-script" in message
    monkeypatch.setenv("ACTIONS_RESULTS_URL", "https://results.example/")
    with pytest.raises(RemoteConfigError, match="needs ACTIONS_RUNTIME_TOKEN, which is not set"):
        open_remote("gha://v2")
    monkeypatch.setenv("ACTIONS_RUNTIME_TOKEN", "not a token")
    with pytest.raises(RemoteConfigError, match="invalid ACTIONS_RUNTIME_TOKEN") as info:
        open_remote("gha://")
    assert "not a token" not in str(info.value), "a token is never shown"
    monkeypatch.setenv("ACTIONS_RUNTIME_TOKEN", "t0ken")
    monkeypatch.setenv("ACTIONS_RESULTS_URL", "ftp://results.example/")
    with pytest.raises(RemoteConfigError, match="invalid ACTIONS_RESULTS_URL 'ftp://"):
        open_remote("gha://")

    # Through the plugin: a usage error at start naming the variable, not a traceback.
    monkeypatch.delenv("ACTIONS_RUNTIME_TOKEN")
    monkeypatch.setenv("ACTIONS_RESULTS_URL", "https://results.example/")
    project.write_tests(CONFIGS[:1])
    result = project.run("--mlc-jit-remote=gha://")
    out = result.stdout.str() + result.stderr.str()
    assert result.ret == pytest.ExitCode.USAGE_ERROR, out
    assert "--mlc-jit-remote: remote cache gha:// needs ACTIONS_RUNTIME_TOKEN" in out, out
    assert "Traceback" not in out, out
    assert project.compiles() == []


@pytest.mark.parametrize(("name", "value"), [("MLC_JIT_GHA_MAX_WAIT", "soon"),
                                             ("MLC_JIT_GHA_MAX_WAIT", "0"),
                                             ("MLC_JIT_GHA_RATE", "-1"),
                                             ("MLC_JIT_GHA_RATE", "1.5"),
                                             ("MLC_JIT_GHA_RATE_WINDOW", "inf")])
def test_a_bad_pacing_value_is_refused_naming_the_variable(
        monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv("ACTIONS_RESULTS_URL", "https://results.example/")
    monkeypatch.setenv("ACTIONS_RUNTIME_TOKEN", "t0ken")
    monkeypatch.setenv(name, value)
    with pytest.raises(RemoteConfigError, match=f"invalid {name} '{value}'"):
        open_remote("gha://")
    with pytest.raises(ConfigError, match=f"invalid {name} '{value}'"):
        resolve(environ={name: value})  # the option table's row: a usage error at start


def test_retry_after_in_seconds_or_as_an_http_date() -> None:
    now = 1_700_000_000.0
    assert retry_after("7", now) == 7.0
    assert retry_after("0", now) == 0.0
    assert retry_after(email.utils.formatdate(now + 30, usegmt=True), now) == 30.0
    assert retry_after(email.utils.formatdate(now - 30, usegmt=True), now) == 0.0
    for junk in (None, "", "soon", "-3", "nan", "inf"):
        assert retry_after(junk, now) is None, junk


# -- throttling without a blob store (default tier) ------------------------------------------
def test_a_429_at_start_is_waited_out_then_reported_never_silent(
        bare: GHAStandin, monkeypatch: pytest.MonkeyPatch, project: Project) -> None:
    """The first request of a run is throttled (sccache#2593): retried as Retry-After
    asks, in seconds or as a date; past MLC_JIT_GHA_MAX_WAIT the run says what happened."""
    remote = open_remote("gha://")
    key = hashlib.sha256(b"k").hexdigest()
    bare.throttle(3, retry_after=["0", email.utils.formatdate(usegmt=True), "0"])
    assert remote.list_manifests(key) == []
    assert bare.requests["GetCacheEntryDownloadURL"] == 4, "3 throttled, then answered"

    monkeypatch.setenv("MLC_JIT_GHA_MAX_WAIT", "1")
    bare.throttle(1000, retry_after=["0", "0", "30"])
    with pytest.raises(RemoteUnavailableError) as info:
        open_remote("gha://").list_manifests(key)
    message = str(info.value)
    assert "given up after 3 attempts" in message, message
    assert "HTTP 429" in message, message
    assert "MLC_JIT_GHA_MAX_WAIT=1s" in message, message
    assert os.environ["ACTIONS_RUNTIME_TOKEN"] not in message

    # A READONLY run whose remote throttles at its first lookup: the test fails, and the
    # output says why (the remote's error), not only "no cached library".
    project.write_tests(CONFIGS[:1])
    result = project.run("--mlc-device=cpu", "-p", "no:randomly", "--mlc-jit-remote=gha://",
                         "--mlc-jit-policy=READONLY")
    out = result.stdout.str() + result.stderr.str()
    assert result.ret == pytest.ExitCode.TESTS_FAILED, out
    assert "HTTP 429" in out, out
    assert "given up after" in out, out
    assert project.compiles() == []


def test_each_write_throttled_past_the_bound_is_reported(
        bare: GHAStandin, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A storm on the creations that outlasts MLC_JIT_GHA_MAX_WAIT: every upload raises
    (the tier counts it as a write not made), naming the cause; the first after its two
    attempts, the others at once: the service's Retry-After holds back every creation
    (the pacing), so they do not ask again. Nothing is made silently."""
    monkeypatch.setenv("MLC_JIT_GHA_MAX_WAIT", "1")
    bare.throttle(10_000, retry_after=["0", "5"], methods=["CreateCacheEntry"])
    remote = open_remote("gha://")
    failed = []
    for i in range(3):
        key, entry, path, manifest = library(tmp_path / str(i), f"lib {i}".encode())
        with pytest.raises(RemoteUnavailableError) as info:
            remote.upload(key, entry, path, manifest)
        failed.append(str(info.value))
    assert "given up after 2 attempts" in failed[0], failed
    assert "HTTP 429" in failed[0], failed
    assert all("Retry-After" in m and "held back" in m for m in failed[1:]), failed
    assert bare.requests["CreateCacheEntry"] == 2
    assert bare.visible() == []
    assert bare.creations == []


def test_retry_after_zero_is_no_licence_to_hammer(
        bare: GHAStandin, monkeypatch: pytest.MonkeyPatch) -> None:
    """A storm answered ``Retry-After: 0`` without end: MLC_JIT_GHA_MAX_WAIT bounds the
    time since the first attempt (not only the pauses asked for), and the pauses grow:
    a few requests, then the lookup is given up (not thousands until the deadline)."""
    monkeypatch.setenv("MLC_JIT_GHA_MAX_WAIT", "0.5")
    bare.throttle(100_000, retry_after=["0"])
    with pytest.raises(RemoteUnavailableError) as info:
        open_remote("gha://", deadline=5).list_manifests(hashlib.sha256(b"k").hexdigest())
    assert "given up after" in str(info.value), info.value
    assert 2 <= bare.throttled < 50, bare.throttled


def test_pacing_is_shared_through_the_run_directorys_file(tmp_path: Path) -> None:
    """Two pacers that share only the state file (other identities: not this process's
    memory), as two processes of a run do: the second waits for the slot the first took
    (a limit of 5 an hour: a burst of 1, then a slot every ~17 min); a pacer with another
    file waits for nothing. One file per service and repository, never per run."""
    state = tmp_path / "pace"
    first, second = (_Pacer(5, 3600.0, state, f"{tmp_path}/{n}") for n in "ab")
    assert first.reserve(math.inf) == 0.0
    assert second.reserve(math.inf) > 900.0, "the slot taken by the first was not seen"
    assert _Pacer(5, 3600.0, tmp_path / "other", f"{tmp_path}/c").reserve(math.inf) == 0.0
    second.hold(5000.0)  # a 429's Retry-After, seen by every process
    assert first.reserve(math.inf) > 4900.0


def test_prune_is_refused_saying_why_and_a_refused_token_is_an_auth_error(
        bare: GHAStandin, monkeypatch: pytest.MonkeyPatch) -> None:
    for dry_run in ([], ["--dry-run"], ["--dry-run", "--max-size", "1G"]):
        ran = run_cli("remote", "prune", "--remote", "gha://", "--older-than", "1d", *dry_run)
        assert ran.returncode != 0, (dry_run, ran)
        assert "GitHub evicts them itself" in ran.stdout + ran.stderr, ran

    forged = bare.token("refs/heads/main").rsplit(".", 1)[0] + ".Zm9yZ2Vk"
    use(bare, monkeypatch, forged)
    with pytest.raises(RemoteAuthError) as info:
        open_remote("gha://").list_manifests(hashlib.sha256(b"k").hexdigest())
    assert "HTTP 401" in str(info.value)
    assert forged not in str(info.value)


# -- against the stand-in with Azurite (servers tier) ----------------------------------------
def node(ops: list[dict[str, Any]], standin: GHAStandin, token: str) -> list[dict[str, Any]]:
    """Run ``ops`` with the official client (tests/node/gha_client.js) against ``standin``."""
    if shutil.which("node") is None:
        missing("node is not installed")  # skips; fails under MLCJIT_REQUIRE_SERVERS=1
    if not (NODE_DIR / "node_modules" / "@actions" / "cache").is_dir():
        missing("@actions/cache is not installed")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACTIONS_", "GITHUB_"))}
    env.update(ACTIONS_CACHE_SERVICE_V2="1", ACTIONS_RESULTS_URL=standin.url,
               ACTIONS_RUNTIME_TOKEN=token, RUNNER_TEMP=tempfile.mkdtemp())
    ran = subprocess.run(["node", str(NODE_DIR / "gha_client.js"), json.dumps(ops)], env=env,
                         check=False, capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stdout[-4000:] + ran.stderr[-4000:]
    result: list[dict[str, Any]] = json.loads(ran.stdout.strip().splitlines()[-1])
    return result


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.mark.servers
def test_the_standin_speaks_the_official_clients_protocol(
        standin: GHAStandin, tmp_path: Path) -> None:
    """@actions/cache saves a directory and restores it (exact key and restore key) from
    the stand-in; what it saved, this package's client downloads (its archive holds the
    same files), and what this package's client uploads, it restores."""
    token = os.environ["ACTIONS_RUNTIME_TOKEN"]
    saved, first, second, third = (tmp_path / n for n in ("saved", "first", "second", "third"))
    (saved / "data" / "sub").mkdir(parents=True)
    (saved / "data" / "a.txt").write_text("alpha")
    (saved / "data" / "sub" / "b.bin").write_bytes(os.urandom(70_000))
    for workspace in (first, second, third):
        workspace.mkdir()
    remote = open_remote("gha://node")
    assert isinstance(remote, GHARemote)
    key = f"{remote._root}archive@0"  # a name of this package's layout: node/archive
    results = node([
        {"op": "version", "paths": ["data"], "cwd": str(saved)},
        {"op": "save", "key": key, "paths": ["data"], "cwd": str(saved)},
        {"op": "restore", "key": key, "paths": ["data"], "cwd": str(first)},
        {"op": "restore", "key": "no-such-key", "restoreKeys": [key[:-2]], "paths": ["data"],
         "cwd": str(second)},
        {"op": "restore", "key": "no-such-key", "paths": ["data"], "cwd": str(second)}],
        standin, token)
    version, compression = results[0]["version"], results[0]["compression"]
    assert results[1]["cacheId"] > 0
    assert results[2]["matchedKey"] == key
    assert results[3]["matchedKey"] == key
    assert results[4]["matchedKey"] is None
    assert tree(first / "data") == tree(saved / "data") == tree(second / "data")

    remote._version = version  # the version the official client used for these paths
    stream = remote._open_stream("archive")
    assert stream is not None
    archive = b"".join(stream)
    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    flag = "--use-compress-program=unzstd" if compression.startswith("zstd") else "-z"
    subprocess.run(["tar", "-xf", "-", flag, "-C", str(unpacked)], input=archive, check=True)
    assert tree(unpacked / "data") == tree(saved / "data")

    (saved / "data" / "a.txt").write_text("made by this package")
    flag = "--use-compress-program=zstd" if compression.startswith("zstd") else "-z"
    ours = subprocess.run(["tar", "-cf", "-", flag, "-C", str(saved), "data"], check=True,
                          capture_output=True).stdout
    remote._write("ours", "0", ours)
    [restored] = node([{"op": "restore", "key": f"{remote._root}ours@0", "paths": ["data"],
                        "cwd": str(third)}], standin, token)
    assert restored["matchedKey"] == f"{remote._root}ours@0"
    assert tree(third / "data") == tree(saved / "data")
    assert standin.requests["CreateCacheEntry"] == 2


def run(project: Project, *args: str) -> tuple[int, str]:
    result = project.run("--mlc-device=cpu", "-p", "no:randomly", *args)
    return result.ret, result.stdout.str() + result.stderr.str()


@pytest.mark.servers
def test_machine_a_uploads_and_machine_b_compiles_nothing(
        standin: GHAStandin, project: Project) -> None:
    """Machine A compiles and uploads through --mlc-jit-remote=gha://ci; machine B, a
    fresh cache under xdist, downloads every library and compiles none."""
    project.write_tests(CONFIGS, per_config=2)
    a = Project(project.pytester, project.cache.parent / "cache-a", project.counter)
    ret, out = run(a, "--mlc-jit-remote=gha://ci")
    assert ret == 0, out
    assert len(project.compiles()) == len(CONFIGS)
    manifests = [k for k in standin.visible() if k.startswith("mlcjit/ci/entries/")]
    assert len(manifests) == len(CONFIGS), standin.visible()

    b = Project(project.pytester, project.cache.parent / "cache-b", project.counter)
    ret, out = run(b, "--mlc-jit-remote=gha://ci", "-n", "2")
    assert ret == 0, out
    assert len(project.compiles()) == len(CONFIGS), "machine B compiled"
    assert len(b.libraries()) == len(CONFIGS), "downloaded: nothing compiled them"


@pytest.mark.servers
def test_a_429_storm_loses_no_write(standin: GHAStandin, tmp_path: Path) -> None:
    """A storm of 429s (Retry-After in seconds, as a date, or absent: backoff) and 503s
    over a series of uploads: every write is made, and every entry reads back."""
    when = email.utils.formatdate(time.time() + 1, usegmt=True)
    standin.throttle(6, retry_after=["0", "1", when, None, "0", "0"])
    standin.throttle(2, status=503, retry_after=["0"], methods=["FinalizeCacheEntryUpload"])
    remote = open_remote("gha://")
    libraries = [library(tmp_path / str(i), os.urandom(1000 + i)) for i in range(4)]
    assert all(remote.upload(*lib) for lib in libraries)
    assert standin.throttled == 8, "the storm met the writes"
    reader = open_remote("gha://")
    for key, _, path, _ in libraries:
        assert fetched(reader, key, tmp_path / "got.so") == path.read_bytes()


@pytest.mark.servers
def test_300_new_libraries_stay_within_the_creation_limit(
        azurite: Azurite, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """300 new libraries (600 new entries: blob and manifest), uploaded by 8 threads
    through two adapters that share a run directory (its pacing file, as the processes of
    a run share it: flock on separately opened files), against a service that accepts 160
    new entries per 2 s (GitHub's 200 a minute, scaled down): every write is made and the
    service never had to refuse one. (Without the pacing, MLC_JIT_GHA_RATE=0, the same
    upload here had 104 creations refused, each retried after its Retry-After.)"""
    with running(azurite, limit=160, window=2.0) as service:
        use(service, monkeypatch)
        monkeypatch.setenv("MLC_JIT_GHA_RATE", "160")
        monkeypatch.setenv("MLC_JIT_GHA_RATE_WINDOW", "2.0")
        remotes = [open_remote("gha://", run_dir=tmp_path) for _ in range(2)]
        libraries = [library(tmp_path / "libs", f"library {i}".encode() * 10)
                     for i in range(300)]
        failures: list[BaseException] = []

        def upload(share: int) -> None:
            for i in range(share, len(libraries), 8):
                try:
                    assert remotes[i % 2].upload(*libraries[i])
                except BaseException as exc:
                    failures.append(exc)

        threads = [threading.Thread(target=upload, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert failures == []
        assert service.refused_for_rate == 0
        assert len(service.creations) == 600
        assert len(service.visible()) == 600, "every entry is there"
        assert [p.name[:10] for p in tmp_path.glob(".gha-pace-*")] == [".gha-pace-"], (
            "one pacing file, shared")


@pytest.mark.servers
def test_concurrent_publishers_of_one_entry_have_exactly_one_winner(
        standin: GHAStandin, tmp_path: Path) -> None:
    """Four writers publish one entry at once (different libraries, their blobs already
    there): exactly one upload returns True and readers get the winner's library. The
    winner's manifest is still being uploaded when the others are refused its creation
    (its finalization throttled for a second here): they wait for it, and neither claim
    the entry nor publish a generation of their own."""
    key = hashlib.sha256(b"one entry").hexdigest()
    remotes = [open_remote("gha://") for _ in range(4)]
    builds = []
    for i, remote in enumerate(remotes):
        _, _, path, manifest = library(tmp_path / str(i), os.urandom(3000))
        builds.append((path, {**manifest, "digest": key}))
        remote._put_blob(f"blobs/{manifest['sha256']}", path, manifest["sha256"],
                         manifest["size"])
    standin.throttle(1, retry_after=["1"], methods=["FinalizeCacheEntryUpload"])
    results: list[bool | BaseException] = [False] * 4
    barrier = threading.Barrier(4)

    def publish(i: int) -> None:
        barrier.wait()
        try:
            results[i] = remotes[i].upload(key, key, *builds[i])
        except BaseException as exc:  # reported below, not lost in the thread
            results[i] = exc

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results, key=str) == [False] * 3 + [True], results
    assert standin.throttled == 1
    assert [k for k in standin.visible() if "/entries/" in k] == [
        f"mlcjit/entries/{key}/{key}.json@0"]
    winner = builds[results.index(True)][0]
    assert fetched(open_remote("gha://"), key, tmp_path / "got.so") == winner.read_bytes()


@pytest.mark.servers
def test_entries_are_scoped_by_branch_as_the_service_scopes_them(
        standin: GHAStandin, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A feature branch's entries are read by that branch only; the default branch's by
    every branch; a token without a writable scope reads, and its upload is refused."""
    main_lib = library(tmp_path / "main", b"built on main")
    feature_lib = library(tmp_path / "feature", b"built on the feature branch")
    use(standin, monkeypatch, standin.token("refs/heads/main"))
    assert open_remote("gha://").upload(*main_lib)
    use(standin, monkeypatch, standin.token("refs/heads/feature", read=["refs/heads/main"]))
    feature = open_remote("gha://")
    assert feature.upload(*feature_lib)
    assert fetched(feature, main_lib[0], tmp_path / "x.so") == b"built on main"
    assert fetched(feature, feature_lib[0], tmp_path / "x.so") == b"built on the feature branch"

    use(standin, monkeypatch, standin.token("refs/heads/other", read=["refs/heads/main"]))
    other = open_remote("gha://")
    assert other.list_manifests(feature_lib[0]) == [], "another branch reads the feature's"
    assert fetched(other, main_lib[0], tmp_path / "x.so") == b"built on main"

    use(standin, monkeypatch, standin.token(None, read=["refs/pull/7/merge", "refs/heads/main"]))
    reader = open_remote("gha://")
    assert fetched(reader, main_lib[0], tmp_path / "x.so") == b"built on main"
    with pytest.raises(RemoteAuthError, match="HTTP 403"):
        reader.upload(*library(tmp_path / "reader", b"from a read-only token"))
    assert {e.scope for e in standin.entries()} == {"refs/heads/main", "refs/heads/feature"}


@pytest.mark.servers
def test_a_planted_blob_never_blocks_the_real_one_and_a_quarantined_entry_is_replaced(
        standin: GHAStandin, tmp_path: Path) -> None:
    """``blobs/<sha256>`` planted with other bytes (the digest of a reproducible build is
    known in advance) is not taken as present: the upload writes the real bytes as a newer
    generation, which readers get. A quarantined entry is hidden; the next upload of it
    publishes it again. The service removes nothing: ``remote rm`` says so."""
    remote = open_remote("gha://")
    assert isinstance(remote, GHARemote)
    key, entry, path, manifest = library(tmp_path, b"the real library")
    remote._write(f"blobs/{manifest['sha256']}", "0", b"a planted library")
    assert remote.upload(key, entry, path, manifest)
    assert fetched(open_remote("gha://"), key, tmp_path / "got.so") == b"the real library"

    [found] = remote.list_manifests(key)
    remote.quarantine(found, "failed to load")
    assert remote.list_manifests(key) == []
    [(_, record)] = list(remote.iter_quarantined())
    assert record is not None
    assert record["why"] == "failed to load"
    assert remote.upload(key, entry, path, manifest) is True
    assert fetched(open_remote("gha://"), key, tmp_path / "got.so") == b"the real library"

    ran = run_cli("remote", "rm", "--remote", "gha://", f"{key}/{entry}")
    assert ran.returncode != 0
    assert "GitHub evicts them itself" in ran.stdout + ran.stderr, ran
    assert fetched(open_remote("gha://"), key, tmp_path / "got.so") == b"the real library"
