"""Causes, not symptoms (issue 21, item 7), and what a run says and leaves about the remote.

A test whose library the remote had but this run refused (unsigned, signed with another
secret, signed by a key this job does not trust) fails under READONLY with the refusal and
its fix in its own error, not "no cached library … warm the cache first". Requests and
downloads are counted apart and labelled so: a request served by a library this run
downloaded is a remote hit, however the downloads fell; a download is one library. The
writes a run could not make are counted across its workers and shown. A run that writes
records the remote entries it used (``access/`` on the remote, which ``remote prune
--max-size`` reads); a read-only one writes nothing there.

The remotes are directories (``file://``), read from the filesystem; the libraries are
the warm template's (no compile here).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from test_remote_quarantine import objects, own_error
from test_remote_tier import machine, publish_cache
from test_tiered_store import FAST, Entry, compile_into, fetch

from conftest import Project, accounting
from pytest_mlcjit.cache.store import Stores
from pytest_mlcjit.cache.store.interface import Hit, Missing
from pytest_mlcjit.cache.store.remote import RemoteOptions, open_remote
from pytest_mlcjit.cache.store.remote_policy import LoadResult
from pytest_mlcjit.engine.stats import Stats
from pytest_mlcjit.errors import CompileInterrupted
from pytest_mlcjit.plugin.report import remote_lines

SECRET = "trusted-branch-secret"


def seeded(project: Project, warm_template: Path) -> Path:
    """A machine's cache holding the warm template's entry (hidden=4, cpu)."""
    seeder = machine(project, "seeder")
    seeder.warm(warm_template)
    return seeder.cache


def upload(cache: Path, url: str, options: RemoteOptions) -> None:
    """Put the cache's entry on the remote as a writer with ``options`` (its keys) would."""
    [path] = (cache / "tvm").glob("*.manifest.json")
    manifest = json.loads(path.read_text())
    body = {k: v for k, v in manifest.items() if k not in ("log", "remote")}
    assert open_remote(url, options).upload(manifest["key_digest"], manifest["digest"],
                                            path.with_name(manifest["library"]), body)


def ed25519_keys() -> tuple[bytes, str]:
    """A fresh Ed25519 key pair: the raw private key, the public key as PEM."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                            serialization.NoEncryption())
    pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return raw, pem.decode()


# -- a refusal is the cause of the miss -----------------------------------------------------------
@pytest.mark.parametrize("refusal", ["unsigned", "another secret", "an unknown key"])
def test_a_refused_remote_entry_fails_readonly_with_the_refusal_and_its_fix(
        project: Project, warm_template: Path, shared: Path,
        monkeypatch: pytest.MonkeyPatch, refusal: str) -> None:
    """The remote holds the test's library, signed in a way this job does not trust: the
    READONLY test fails with the refusal (the remote entry, why) and the fix (publish it
    from a trusted writer, or trust its signer) in its own error, never "no cached
    library … warm the cache first"; nothing was loaded or written."""
    project.write_tests([{"hidden": 4}])
    cache = seeded(project, warm_template)
    if refusal == "unsigned":
        assert publish_cache(cache, shared.as_uri()) == 1
        cause = "is unsigned"
        monkeypatch.setenv("MLC_JIT_REMOTE_SIGNING_KEY", SECRET)
    elif refusal == "another secret":
        upload(cache, shared.as_uri(), RemoteOptions(signing_key=b"another-secret"))
        cause = "signature that does not match"
        monkeypatch.setenv("MLC_JIT_REMOTE_SIGNING_KEY", SECRET)
    else:
        writer, _ = ed25519_keys()
        _, trusted = ed25519_keys()
        upload(cache, shared.as_uri(), RemoteOptions(ed25519_key=writer))
        cause = "signature by unknown key id"
        monkeypatch.setenv("MLC_JIT_REMOTE_TRUSTED_KEYS", trusted)
    entries = sorted((shared / "entries").rglob("*.json"))

    reader = machine(project, "reader")
    result = reader.run("--mlc-device=cpu", "-p", "no:randomly", "--mlc-jit-policy=READONLY")
    assert result.ret == 1, result.stdout.str()
    error = own_error(result)
    assert "CacheMissError: the remote's library for key" in error, error
    assert "was refused: manifest file://" in error, error
    assert cause in error, error
    assert "publish it again from a job that signs with a trusted key" in error, error
    assert "warm the cache first" not in error, error
    assert reader.libraries() == []
    assert sorted((shared / "entries").rglob("*.json")) == entries
    assert not (shared / "quarantine").exists()


# -- counting --------------------------------------------------------------------------------------
def test_remote_hits_are_requests_downloads_are_libraries_and_writers_record_their_use(
        project: Project, warm_template: Path, shared: Path, tmp_path: Path) -> None:
    """One library on the remote, three tests of it on a fresh machine: 3 requests, all 3
    remote hits (served by the library this run downloaded), and 1 library downloaded;
    the same in the JSON report. The next run on that machine: 3 plain hits. Each of these
    runs (readwrite, a cache that takes writes) leaves one access record naming the entry
    it used, the second for its local hits of the downloaded entry; a READONLY run leaves
    none."""
    project.write_path_tests([{"hidden": 4}], per_config=3)
    assert publish_cache(seeded(project, warm_template), shared.as_uri()) == 1
    [manifest] = list((shared / "entries").rglob("*.json"))
    used = f"{manifest.parent.name}/{manifest.stem}"
    report = tmp_path / "report.json"

    def records() -> list[dict[str, Any]]:
        found = sorted((shared / "access").glob("*.json")) if (shared / "access").is_dir() \
            else []
        return [json.loads(p.read_text()) for p in found]

    fresh = machine(project, "fresh")
    first = fresh.run("--mlc-device=cpu", "-p", "no:randomly", f"--mlc-jit-report={report}")
    out = first.stdout.str()
    assert first.ret == 0, out
    assert accounting(first) == {"requests": 3, "remote_hit": 3}
    assert f"remote {shared.as_uri()}: 1 library downloaded (" in out, out
    data = json.loads(report.read_text())
    assert data["outcomes"]["remote_hit"] == 3
    assert data["remote"]["downloads"] == 1
    assert [r["used"] for r in records()] == [[used]]

    again = fresh.run("--mlc-device=cpu", "-p", "no:randomly")
    assert again.ret == 0, again.stdout.str()
    assert accounting(again) == {"requests": 3, "hit": 3}
    assert [r["used"] for r in records()] == [[used], [used]]

    readonly = machine(project, "readonly").run("--mlc-device=cpu", "-p", "no:randomly",
                                                "--mlc-jit-policy=READONLY")
    assert readonly.ret == 0, readonly.stdout.str()
    assert accounting(readonly) == {"requests": 3, "remote_hit": 3}
    assert len(records()) == 2, "a read-only job wrote an access record"


def test_a_process_told_that_the_remote_is_down_records_no_use_at_its_end(
        tmp_path: Path) -> None:
    """Two processes of one run (two sets of stores sharing the run's id and directory,
    as xdist workers do), through the storage interface: the first downloads an entry;
    the second then finds the remote down (its directory gone for a moment) and tells the
    run. At its end the first does not write its access record to a remote the run no
    longer uses (one that hangs would hold the end of the run for a whole deadline), nor
    does the second."""
    remote = tmp_path / "remote"
    remote.mkdir()
    query = Entry("used")
    compile_into(Stores(remote=remote.as_uri(), remote_options=FAST).get(
        tmp_path / "writer", writes=True), query, b"library")
    board = tmp_path / "board"
    board.mkdir()
    run = dataclasses.replace(FAST, run_id="run1", run_dir=board)
    first = Stores(remote=remote.as_uri(), remote_options=run, worker="gw0")
    assert isinstance(fetch(first.get(tmp_path / "one", writes=True), query), Hit)
    second = Stores(remote=remote.as_uri(), remote_options=run, worker="gw1")
    store = second.get(tmp_path / "two", writes=True)
    remote.rename(tmp_path / "away")
    assert fetch(store, Entry("other")) == Missing()
    (tmp_path / "away").rename(remote)
    assert second.remote_stats is not None
    assert second.remote_stats.down is not None
    first.close()
    second.close()
    assert objects(remote, "access") == [], "a use recorded on a remote the run left"


def test_writes_not_made_by_every_worker_are_counted_once_each_and_shown() -> None:
    """Two xdist workers' statistics, as their controller merges them: every write not
    made is counted, each reason shown once, and with --mlc-jit-remote-required the
    summary says that they fail the run."""
    workers = []
    for name in ("gw0", "gw1"):
        stats = Stats()
        stats.remote.write_not_made(f"tiny-{name}: not uploaded: its library failed its load "
                                    "check (it lacks the function(s) its manifest records: "
                                    "forward)")
        stats.remote.write_not_made("not uploaded: the remote was down for the rest of the run")
        stats.remote.write_not_made("not uploaded: the remote was down for the rest of the run")
        workers.append(json.loads(json.dumps(stats.to_json())))  # as sent by the worker
    total = Stats()
    for data in workers:
        total.merge(data)
    assert total.remote.uploads_failed == 6
    assert total.remote.upload_failures == [
        "tiny-gw0: not uploaded: its library failed its load check (it lacks the function(s) "
        "its manifest records: forward)",
        "not uploaded: the remote was down for the rest of the run",
        "tiny-gw1: not uploaded: its library failed its load check (it lacks the function(s) "
        "its manifest records: forward)"]
    lines = remote_lines(total.remote, "s3://b/ci", required=True)
    assert lines == [
        "remote s3://b/ci: 6 writes not made",
        *(f"warning: write not made: {why}" for why in total.remote.upload_failures),
        "error: 6 writes to the remote not made, and --mlc-jit-remote-required is set: the "
        "run fails"]
    assert remote_lines(total.remote, "s3://b/ci")[-1].startswith("warning: "), \
        "without --mlc-jit-remote-required they do not fail the run"


def test_an_unusable_remote_object_is_counted_once_however_often_it_is_listed(
        tmp_path: Path) -> None:
    """Through the storage interface: one unsigned entry on a directory remote, refused by
    a job that verifies (READONLY's store: nothing set aside). Its key is asked for twice,
    as a fetch ahead of time and then the test's own request do: both misses name the
    refusal, and the run counts one unusable remote object, not one per listing."""
    remote = tmp_path / "remote"
    remote.mkdir()
    query = Entry("planted")
    compile_into(Stores(remote=remote.as_uri(), remote_options=FAST).get(
        tmp_path / "planter", writes=True), query, b"unsigned library")
    signed = dataclasses.replace(FAST, signing_key=SECRET.encode())
    stores = Stores(remote=remote.as_uri(), remote_options=signed)
    store = stores.get(tmp_path / "reader", writes=False)
    for _ in range(2):
        found = fetch(store, query)
        assert isinstance(found, Missing)
        assert "is unsigned" in str(found.refused), found
    stats = stores.remote_stats
    assert stats is not None
    assert stats.skipped == 1, stats.warnings
    assert stats.warnings[0].startswith("1 unusable remote object skipped: "), stats.warnings
    stores.close()


@pytest.mark.parametrize("how", ["interrupted", "library gone"])
def test_an_upload_stopped_by_anything_but_the_remote_is_a_write_not_made(
        tmp_path: Path, how: str) -> None:
    """Through the storage interface, an upload stopped by something other than the
    remote: an interrupt while the library's load check runs, or the local library gone
    (a concurrent prune of the local cache) when the transfer reads it. The error is
    raised as before, and the write not made is counted with why, nothing on the remote.

    The load check is a stand-in (a function, not a process): an interrupt or a removal
    landing at that moment cannot be timed from outside; the transfer that then fails is
    the real file remote's, on the real local store's library."""
    remote = tmp_path / "remote"
    remote.mkdir()

    def check(library: Path, manifest: Any) -> LoadResult:
        if how == "interrupted":
            raise CompileInterrupted("the build … was stopped: interrupted")
        library.unlink()
        return LoadResult(True, "loaded")

    stores = Stores(remote=remote.as_uri(), remote_options=FAST, load_check=check)
    error = CompileInterrupted if how == "interrupted" else FileNotFoundError
    with pytest.raises(error):
        compile_into(stores.get(tmp_path / "cache", writes=True), Entry("x"), b"library")
    stats = stores.remote_stats
    assert stats is not None
    assert (stats.uploads, stats.uploads_failed) == (0, 1)
    [why] = stats.upload_failures
    assert why.startswith("test entry 'x': not uploaded: "), why
    assert ("interrupted" if how == "interrupted" else "FileNotFoundError") in why, why
    assert objects(remote, "entries") == []
    stores.close()
