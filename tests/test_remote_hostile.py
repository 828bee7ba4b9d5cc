"""JSON and remotes from outside that must not break a run (issue 19, items 2, 8 and 9).

What someone else wrote (a planted 100,000-deep array as a manifest, hundreds of junk
manifests) is junk, skipped and reported, never an exception, in the plugin and in
``pytest-mlcjit remote ls|verify|prune``. Remote errors that should not fail or flood a
run: read-only credentials in the default ``readwrite`` mode, a full disk while
downloading, a remote down (one line per run, one timeout per run). The remote's timeout
variables are checked at start.

Real servers: moto's S3 (tests/s3server.py) with its IAM checks for read-only
credentials; a directory for file://; a server that never answers for a remote down.
Compiles are counted by the factory; what a remote holds is read behind its back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from s3server import Backdoor, StallingServer, read_only_user, set_moto_auth
from test_remote_tier import Bucket, cli, machine, publish_cache, remote, run  # noqa: F401
from trickle import TrickleProxy

from conftest import Project, wait_until
from pytest_mlcjit._util.fs import read_json
from pytest_mlcjit.cache.history import read_runs
from pytest_mlcjit.cache.manifest import parse_manifest
from pytest_mlcjit.cache.store.remote import RemoteOptions, open_remote
from pytest_mlcjit.cache.store.remote_stats import RemoteStats
from pytest_mlcjit.cache.store.tiered import RemoteTier
from pytest_mlcjit.engine.activity import read_board
from pytest_mlcjit.engine.settings import Settings
from pytest_mlcjit.errors import (
    CorruptEntryError,
    RemoteAuthError,
    RemoteIntegrityError,
    RemoteUnavailableError,
)

pytest_plugins = ["s3server"]

CONFIG = [{"hidden": 4}]  # the warm template's library
#: A hostile manifest: 200 KB, an array 100,000 deep (json.loads raises RecursionError).
DEEP = b"[" * 100_000 + b"]" * 100_000
JUNK_NAME = "f" * 64


def junk_line(out: str) -> str:
    [line] = [ln for ln in out.splitlines() if "unusable remote object" in ln]
    return line


@pytest.fixture(params=["file", "s3"])
def hostile(request: pytest.FixtureRequest, tmp_path: Path, s3_endpoint: str,
            monkeypatch: pytest.MonkeyPatch) -> tuple[str, Backdoor]:
    """A remote (a directory, or a bucket of the session's moto server) set as
    MLC_JIT_REMOTE, and its back door. (``s3_endpoint`` is requested here, not only
    through ``remote`` below, so that the session's server starts before pytester's
    snapshot of the modules: a module it imported after would be dropped.)"""
    if request.param == "s3":
        bucket: Bucket = request.getfixturevalue("remote")
        return bucket.url, Backdoor(bucket.url, bucket.admin)
    shared = tmp_path / "shared"
    shared.mkdir()
    monkeypatch.setenv("MLC_JIT_REMOTE", shared.as_uri())
    return shared.as_uri(), Backdoor(shared.as_uri(), None)


def seed(project: Project, url: str, warm_template: Path) -> dict[str, Any]:
    """The warm template's entry, published on the remote; its manifest."""
    seeder = machine(project, "seeder")
    seeder.warm(warm_template)
    assert publish_cache(seeder.cache, url) == 1
    [path] = (seeder.cache / "tvm").glob("*.manifest.json")
    manifest: dict[str, Any] = json.loads(path.read_text())
    return manifest


# -- item 2: a planted deep array ---------------------------------------------------------------
def test_a_deep_manifest_on_the_remote_is_skipped_and_reported(
        project: Project, hostile: tuple[str, Backdoor], warm_template: Path) -> None:
    """A 100,000-deep array planted beside a good entry of the key: ON and READONLY
    requests skip it (one summary line) and use the good entry; ``remote ls`` lists it
    with its problem, ``verify`` flags it (exit 1), ``prune`` removes it."""
    url, door = hostile
    project.write_tests(CONFIG)
    manifest = seed(project, url, warm_template)
    door.write(f"entries/{manifest['key_digest']}/{JUNK_NAME}.json", DEEP)
    # And a copy of the good manifest naming a library of 10**400 bytes (a size
    # is used in arithmetic: the download's deadline). Unsigned remotes trust the rest.
    huge = {**manifest, "size": 10**400, "created": manifest["created"] - 1,
            "digest": "e" * 64}
    door.write(f"entries/{manifest['key_digest']}/{'e' * 64}.json", json.dumps(huge).encode())

    for name, policy in (("on", "ON"), ("readonly", "READONLY")):
        ret, out = run(machine(project, name), f"--mlc-jit-policy={policy}")
        assert ret == 0, out
        assert "RecursionError" not in out, out
        assert "OverflowError" not in out, out
        assert "2 unusable remote objects skipped" in junk_line(out), out
        assert "nested deeper than" in out or "invalid size" in out, out
    assert project.compiles() == []
    assert len(machine(project, "on").libraries()) == 1

    rc, out = cli("ls", "--remote", url)
    assert rc == 0, out
    assert "3 entries" in out, out
    assert "nested deeper than" in out, out
    assert "invalid size" in out, out
    rc, out = cli("verify", "--remote", url)
    assert rc == 1, out
    assert "3 entries checked" in out, out
    assert "2 bad" in out, out
    rc, out = cli("prune", "--remote", url, "--older-than", "0s")
    assert rc == 0, out
    assert f"{JUNK_NAME}.json" in out, out
    assert not any(n.startswith("entries/") for n in door.names()), door.names()


def test_a_deep_manifest_in_the_local_cache_is_corrupt_not_a_crash(
        project: Project, warm_template: Path) -> None:
    """The same document as a local manifest: READONLY reports the entry as unusable,
    saying why; nothing raises RecursionError."""
    project.write_tests(CONFIG)
    project.warm(warm_template)
    [path] = (project.cache / "tvm").glob("*.manifest.json")
    path.write_bytes(DEEP)
    ret, out = run(project, "--mlc-jit-policy=READONLY")
    assert ret == 1, out
    assert "RecursionError" not in out, out
    assert "nested deeper than" in out, out


def test_every_reader_of_json_from_outside_is_bounded(tmp_path: Path) -> None:
    """The one bounded reader, and each reader built on it: a deep array, a huge document
    and bytes that are not UTF-8 are junk (None, skipped, or CorruptEntryError), never an
    exception of another kind; brackets inside strings do not count as nesting."""
    from pytest_mlcjit._util.jsonsafe import MAX_JSON_BYTES, loads_bounded

    deep = tmp_path / "deep.json"
    deep.write_bytes(DEEP)
    for junk, why in ((DEEP, "nested deeper than 64"), (b"[" * 65 + b"]" * 65, "nested"),
                      (b"\xff\xfe", "not UTF-8"), (b" " * (MAX_JSON_BYTES + 1), "larger than"),
                      (b"[1,", "JSONDecodeError")):
        with pytest.raises(ValueError, match=why):
            loads_bounded(junk)
    assert loads_bounded(b'{"a": "' + b"[" * 1000 + b'"}') == {"a": "[" * 1000}
    assert read_json(deep) is None
    with pytest.raises(CorruptEntryError, match="nested deeper than"):
        parse_manifest(DEEP, deep, "0" * 64)
    history = tmp_path / "root" / ".mlcjit" / "runs.jsonl"
    history.parent.mkdir(parents=True)
    history.write_bytes(b'{"time": 1, "policy": "ON"}\n' + DEEP + b"\n")
    assert read_runs(tmp_path / "root") == [{"time": 1, "policy": "ON"}]
    board = tmp_path / "board"
    board.mkdir()
    (board / "4242.json").write_bytes(DEEP)
    assert read_board(board) == []


# -- item 8: errors that should neither fail nor flood a run -------------------------------------
def test_three_hundred_junk_manifests_are_one_line(
        project: Project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        warm_template: Path) -> None:
    """300 junk manifests beside a good entry: one summary line ("300 unusable remote
    objects skipped, the first: …"), and the run's line in runs.jsonl stays small."""
    shared = tmp_path / "shared"
    shared.mkdir()
    monkeypatch.setenv("MLC_JIT_REMOTE", shared.as_uri())
    project.write_tests(CONFIG)
    manifest = seed(project, shared.as_uri(), warm_template)
    entries = shared / "entries" / manifest["key_digest"]
    for i in range(300):
        (entries / f"{i:064x}.json").write_bytes(b"{not json")
    reader = machine(project, "reader")
    ret, out = run(reader)
    assert ret == 0, out
    assert project.compiles() == []
    assert junk_line(out).startswith("warning: 300 unusable remote objects skipped, the first:")
    assert out.count("is not UTF-8 JSON") == 1, out
    [line] = (reader.cache / ".mlcjit" / "runs.jsonl").read_text().splitlines()
    assert len(line) < 8000, f"{len(line)} bytes"


def test_the_stats_of_many_workers_show_each_warning_once() -> None:
    """Merged on the controller: the remote going down is one line whichever workers met
    it (each names what it was doing), so is an upload refused for permission (each
    worker names its library), skipped objects are summed into one line, other
    warnings are kept once each and at most MAX_NOTES of them."""
    from pytest_mlcjit.cache.store.remote_stats import MAX_NOTES

    total = RemoteStats()
    for worker in range(3):
        stats = RemoteStats()
        stats.went_down(f"remote s3://b/ci failed while listing key {worker}: timed out")
        stats.refused_upload(f"remote s3://b/ci refused an upload (uploading {worker}): 403")
        for i in range(100):
            stats.skip(f"manifest {worker}/{i} is junk")
        for i in range(MAX_NOTES + 2):
            stats.note(f"download {i} refused (not loaded)")
        total.merge(json.loads(json.dumps(stats.to_json())))
    assert total.warnings[0] == "remote s3://b/ci failed while listing key 0: timed out"
    assert [w for w in total.warnings if "failed while" in w] == total.warnings[:1]
    assert total.warnings[1] == "remote s3://b/ci refused an upload (uploading 0): 403"
    assert [w for w in total.warnings if "refused an upload" in w] == total.warnings[1:2]
    assert total.warnings[2] == ("300 unusable remote objects skipped, the first: "
                                 "manifest 0/0 is junk")
    assert total.warnings[3:-1] == [f"download {i} refused (not loaded)"
                                    for i in range(MAX_NOTES)]
    assert total.warnings[-1] == "6 more remote warnings not shown"


@pytest.fixture
def reader_credentials(s3_bucket: str, aws_env: str, s3_endpoint: str, s3_admin: Any,
                       monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Credentials of an IAM user who may list and get the bucket's objects and nothing
    else, set for the runs, and moto checking them (as AWS does); the remote's URL."""
    key = read_only_user(s3_endpoint, s3_bucket)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
    url = f"s3://{s3_bucket}/ci"
    monkeypatch.setenv("MLC_JIT_REMOTE", url)
    set_moto_auth(s3_endpoint, "0")
    try:
        yield url
    finally:
        set_moto_auth(s3_endpoint, "inf")


def test_read_only_credentials_switch_the_run_to_read(
        project: Project, reader_credentials: str) -> None:
    """Credentials that may read but not write, the default readwrite mode: the upload
    after a good compile is refused; the run warns once, reads only from then on and
    passes. With --mlc-jit-remote-required the refusal fails the upload (through the tier
    itself: the same refusal without a second compile)."""
    project.write_tests(CONFIG)
    ret, out = run(machine(project, "a"))
    assert ret == 0, out
    warnings = [line for line in out.splitlines() if "refused an upload" in line]
    assert len(warnings) == 1, out
    assert "this run only reads from it" in warnings[0], out
    assert "AccessDenied" in warnings[0] or "403" in warnings[0], out
    assert len(project.compiles()) == 1
    assert list(open_remote(reader_credentials).iter_entries()) == [], "uploaded"

    library = project.pytester.path / "library.so"
    library.write_bytes(b"a library")
    manifest = {"digest": "b" * 64, "key_digest": "b" * 64, "size": 9,
                "sha256": hashlib.sha256(b"a library").hexdigest()}
    hit = cast(Any, type("Hit", (), {"manifest": manifest, "paths": type(
        "Paths", (), {"digest": "b" * 64, "library": library})()})())
    query = cast(Any, type("Query", (), {"digest": "b" * 64, "describe": "tiny"})())
    required = RemoteTier(reader_credentials, required=True)
    assert required.select(query, lambda manifest: True) is None  # reads work
    with pytest.raises(RemoteAuthError, match="refused"):
        required.upload(query, hit, replace=False)
    assert required.writes


def test_a_full_disk_during_a_download_falls_back_with_the_disk_full_message(
        project: Project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        warm_template: Path) -> None:
    """ENOSPC while a download is written (injected: MLCJIT_TEST_ENOSPC=download): the
    run says what a compile says when the disk is full, compiles the library instead and
    passes; nothing half-written is left."""
    shared = tmp_path / "shared"
    shared.mkdir()
    monkeypatch.setenv("MLC_JIT_REMOTE", shared.as_uri())
    project.write_tests(CONFIG)
    seed(project, shared.as_uri(), warm_template)
    monkeypatch.setenv("MLCJIT_TEST_ENOSPC", "download")
    reader = machine(project, "reader")
    ret, out = run(reader)
    assert ret == 0, out
    assert "OSError" not in out, out
    assert "ran out of disk space" in out, out
    assert "Free space or prune the cache (pytest-mlcjit prune)" in out, out
    assert len(project.compiles()) == 1
    assert len(reader.libraries()) == 1
    assert not list((reader.cache / "tvm").glob("**/.staging*")), "staging left behind"


@pytest.fixture
def stalled() -> Iterator[StallingServer]:
    server = StallingServer()
    try:
        yield server
    finally:
        server.close()


def test_the_first_process_to_find_the_remote_down_tells_the_others(
        stalled: StallingServer, aws_env: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Two processes of one run (two tiers sharing the run's id and directory): the first
    waits out the timeout of a server that never answers and says the remote is down;
    the second never connects (the server sees no new connection), and with
    --mlc-jit-remote-required fails at once with the same kind of error. Another run is
    not told."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", stalled.endpoint)
    options = RemoteOptions(connect_timeout=1, read_timeout=0.3, retries=0, run_id="run-1",
                            run_dir=tmp_path)

    def tier(run_id: str = "run-1", required: bool = False) -> RemoteTier:
        return RemoteTier("s3://stalled/ci", required=required,
                          options=dataclasses.replace(options, run_id=run_id))

    query = cast(Any, type("Query", (), {"digest": "a" * 64, "describe": "tiny"})())
    first = tier()
    assert first.select(query, lambda manifest: True) is None
    assert first.down is not None
    accepted = stalled.accepted
    assert accepted == 1

    second = tier()
    assert second.select(query, lambda manifest: True) is None
    assert second.down == first.down
    assert second.stats.warnings == first.stats.warnings
    with pytest.raises(RemoteUnavailableError, match="timed out"):
        tier(required=True).select(query, lambda manifest: True)
    assert stalled.accepted == accepted, "a later process waited for the server again"
    assert tier("run-2").usable()


@pytest.mark.reliability
def test_a_remote_down_is_one_warning_per_run_under_xdist(
        project: Project, stalled: StallingServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """-n 2 against a server that never answers: both workers compile locally and the
    summary says the remote is down once (the default tier's case: the merge test above
    and the two-tier test)."""
    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                        ("AWS_DEFAULT_REGION", "us-east-1"), ("AWS_ENDPOINT_URL",
                                                             stalled.endpoint),
                        ("MLC_JIT_REMOTE_READ_TIMEOUT", "0.5"),
                        ("MLC_JIT_REMOTE", "s3://stalled/ci")):
        monkeypatch.setenv(name, value)
    project.write_tests([{"hidden": 4}, {"hidden": 6}], per_config=2)
    ret, out = run(project, "-n", "2")
    assert ret == 0, out
    assert len([ln for ln in out.splitlines() if ln.startswith("warning: remote")]) == 1, out
    assert len(project.compiles()) == 2


# -- item 3: a total deadline per remote operation --------------------------------------------
@pytest.fixture
def trickling(remote: Bucket, s3_endpoint: str,  # noqa: F811 (a fixture)
              monkeypatch: pytest.MonkeyPatch
              ) -> Iterator[Callable[[str], TrickleProxy]]:
    """Put a proxy that trickles the answers matching a pattern (tests/trickle.py) between
    the runs and the session's moto server, with a base deadline of one second."""
    proxies: list[TrickleProxy] = []

    def start(slow: str) -> TrickleProxy:
        proxies.append(TrickleProxy(s3_endpoint, slow))
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxies[-1].endpoint)
        monkeypatch.setenv("MLC_JIT_REMOTE_DEADLINE", "1")
        return proxies[-1]

    try:
        yield start
    finally:
        for proxy in proxies:
            proxy.close()


def test_a_trickling_download_is_given_up_at_its_deadline(
        project: Project, remote: Bucket, warm_template: Path,  # noqa: F811
        trickling: Callable[[str], TrickleProxy]) -> None:
    """The remote sends the library one byte at a time (each byte resets the read
    timeout): at the download's deadline (1 s + its size at 1 MB/s) the connection is
    closed, the run reports it as a remote error, compiles the library and passes."""
    project.write_tests(CONFIG)
    seed(project, remote.url, warm_template)
    proxy = trickling(r"^GET /[^?]*/ci/blobs/")
    reader = machine(project, "reader")
    ret, out = run(reader)
    assert ret == 0, out
    assert proxy.trickled == 1, "the download did not go through the trickle"
    [line] = [ln for ln in out.splitlines() if "did not finish within its deadline" in ln]
    assert "downloading" in line, line
    assert "MLC_JIT_REMOTE_MIN_THROUGHPUT" in line, line
    assert "1 error" in out, out
    assert len(project.compiles()) == 1
    assert len(reader.libraries()) == 1
    wait_until(lambda: proxy.hangups == 1, "the client to close the trickled download")


def test_a_trickling_listing_fails_a_run_that_requires_the_remote(
        project: Project, remote: Bucket,  # noqa: F811 (a fixture)
        trickling: Callable[[str], TrickleProxy]) -> None:
    """The listing trickles: its deadline ends the wait; with --mlc-jit-remote-required
    (READONLY: nothing compiles) the run fails with the deadline as a remote error."""
    project.write_tests(CONFIG)
    proxy = trickling(r"list-type=2")
    ret, out = run(machine(project, "reader"), "--mlc-jit-policy=READONLY",
                   "--mlc-jit-remote-required")
    assert ret == 1, out
    assert proxy.trickled == 1, "the listing did not go through the trickle"
    assert "RemoteUnavailableError" in out, out
    assert "listing" in out, out
    assert "did not finish within its deadline" in out, out
    assert project.compiles() == []


# -- item 9: the timeout variables ----------------------------------------------------------------
@pytest.mark.parametrize("value", ["abc", "inf", "1e12", "-1", "0"])
@pytest.mark.parametrize("name", ["MLC_JIT_REMOTE_CONNECT_TIMEOUT", "MLC_JIT_REMOTE_READ_TIMEOUT",
                                  "MLC_JIT_REMOTE_DEADLINE"])
def test_a_bad_remote_timeout_is_a_usage_error_at_start(
        project: Project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str,
        value: str) -> None:
    """Named with the valid range, at start (no test runs), by the plugin and by
    ``pytest-mlcjit remote``."""
    monkeypatch.setenv("MLC_JIT_REMOTE", tmp_path.as_uri())
    monkeypatch.setenv(name, value)
    project.write_tests(CONFIG)
    result = project.run()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    expected = (f"invalid {name} {value!r}: expected a number of seconds greater than 0 "
                "and at most 86400")
    assert expected in result.stderr.str()
    rc, out = cli("ls")
    assert rc == 2, out
    assert expected in out, out


@pytest.mark.parametrize("value", ["abc", "0", "-5"])
def test_a_bad_minimum_throughput_is_a_usage_error_at_start(
        project: Project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("MLC_JIT_REMOTE", tmp_path.as_uri())
    monkeypatch.setenv("MLC_JIT_REMOTE_MIN_THROUGHPUT", value)
    project.write_tests(CONFIG)
    result = project.run()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert f"invalid MLC_JIT_REMOTE_MIN_THROUGHPUT {value!r}" in result.stderr.str()


def test_the_remote_commands_and_the_plugin_share_their_timeouts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One source of defaults: a remote opened without options (plain Python, the CLI)
    waits as long as a run does; the variables reach ``pytest-mlcjit remote``."""
    plain = open_remote(tmp_path.as_uri()).options
    settings = Settings()
    assert (plain.connect_timeout, plain.read_timeout) == (
        settings.remote_connect_timeout, settings.remote_read_timeout)
    assert (plain.deadline, plain.min_throughput) == (
        settings.remote_deadline, settings.remote_min_throughput)
    from pytest_mlcjit.cli.remote import open_for_cli

    monkeypatch.setenv("MLC_JIT_REMOTE_READ_TIMEOUT", "7.5")
    monkeypatch.setenv("MLC_JIT_REMOTE_DEADLINE", "9")
    options = open_for_cli(tmp_path.as_uri()).options
    assert (options.read_timeout, options.deadline) == (7.5, 9.0)


def test_a_fifo_or_a_link_planted_in_a_directory_remote_is_never_read(
        tmp_path: Path) -> None:
    """Someone who can write to a shared directory plants a FIFO as a manifest and a
    symlink (to a file of the reader's machine) as a blob: a reader never blocks on the
    FIFO (it is not listed), never follows the link (the download is refused as not a
    regular file), and `remote verify` reports it instead of hanging or crashing."""
    from test_remote_store import ENTRY, ENTRY2, KEY, dest_in, published

    root = tmp_path / "remote"
    root.mkdir()
    shared = open_remote(root.as_uri())
    manifest = published(shared, tmp_path, b"the real library")
    os.mkfifo(root / "entries" / KEY / f"{ENTRY2}.json")
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"x" * manifest["size"])
    blob = root / "blobs" / manifest["sha256"]
    blob.unlink()
    blob.symlink_to(secret)

    assert [e.entry_digest for e in shared.list_manifests(KEY)] == [ENTRY]
    with pytest.raises(RemoteIntegrityError, match="is not a regular file"):
        shared.download(manifest, dest_in(tmp_path))
    rc, out = cli("verify", "--remote", root.as_uri())
    assert rc == 1, out
    assert "is not a regular file" in out, out


def test_what_a_remote_holds_is_printed_without_crashing_the_commands(
        tmp_path: Path) -> None:
    """A manifest field holding a lone surrogate, or a number JSON cannot hold, reaches
    `remote ls` (text and --json) escaped, never as a UnicodeEncodeError or a NaN."""
    from test_remote_store import ENTRY, KEY

    root = tmp_path / "remote"
    (root / "entries" / KEY).mkdir(parents=True)
    body = {"digest": KEY, "key_digest": KEY, "sha256": "0" * 64, "size": 1,
            "key": {"factory": "m:\ud800", "target": "llvm"}, "created": 1e308 * 10}
    text = json.dumps(body).replace("Infinity", "1e999")
    (root / "entries" / KEY / f"{ENTRY}.json").write_text(text, encoding="utf-8")
    rc, out = cli("ls", "--remote", root.as_uri())
    assert rc == 0, out
    assert "\\ud800" in out, out
    rc, out = cli("ls", "--json", "--remote", root.as_uri())
    assert rc == 0, out
    json.loads(out, parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))
