"""A remote that keeps to a budget (issue 21, item 5, and item 8's prune defect): access
records and last use, ``pytest-mlcjit remote prune --older-than/--max-size/--dry-run/
--blob-grace``, ``remote rm``, ``remote verify``'s quarantine and removal hints, and
``--mlc-jit-remote-max-size`` after a prepare run.

Remotes are real: a directory (file://) and moto's S3 server; small fake libraries go
through the Remote interface as a run would upload them. What a remote holds is read
behind its back (:class:`s3server.Backdoor`), never from the command's own claim. Times
are set in the manifests (``created``), in access records and, on a directory, in the
files' mtimes: nothing waits for a clock. A concurrent upload is interleaved
deterministically, by running it from inside the prune's own calls to the remote.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from s3server import Backdoor
from test_remote_store import remote_url  # noqa: F401 (a fixture: a file:// or s3:// remote)

from conftest import Project, run_cli
from pytest_mlcjit.cache.store.remote import maintenance, open_remote
from pytest_mlcjit.cache.store.remote.base import Remote, StoredObject
from pytest_mlcjit.cache.store.remote.maintenance import (
    PruneReport,
    last_use,
    prune_remote,
    write_access,
)

pytest_plugins = ["s3server"]

DAY = 24 * 3600.0


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.fixture
def dir_url(tmp_path: Path) -> str:
    """A directory remote (where files can be backdated: blob grace)."""
    root = tmp_path / "remote"
    root.mkdir()
    return root.as_uri()


def door(url: str, request: pytest.FixtureRequest) -> Backdoor:
    s3 = request.getfixturevalue("s3_admin") if url.startswith("s3:") else None
    return Backdoor(url, s3)


def publish(remote: Remote, tmp_path: Path, name: str, data: bytes, *, age_days: float,
            key: str | None = None, entry: str | None = None) -> tuple[str, str, str]:
    """Upload a fake library ``data`` as entry ``name`` (digests ``key`` and ``entry``,
    else its own), created ``age_days`` ago; (key digest, entry digest, blob sha256)."""
    key = key or digest(f"key {name}")
    entry = entry or digest(f"entry {name}")
    lib = tmp_path / "libs" / f"{name}.so"
    lib.parent.mkdir(parents=True, exist_ok=True)
    lib.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    manifest = {"digest": key, "sha256": sha, "size": len(data),
                "created": time.time() - age_days * DAY, "target": "llvm"}
    assert remote.upload(key, entry, lib, manifest)
    return key, entry, sha


def backdate(url: str, name: str, seconds: float) -> None:
    """Make a directory remote's object ``name`` last written ``seconds`` ago."""
    path = Path(url.removeprefix("file://"), name)
    then = time.time() - seconds
    os.utime(path, (then, then))


def cli(*args: str) -> tuple[int, str]:
    ran = run_cli("remote", *args)
    return ran.returncode, ran.stdout + ran.stderr


def cli_json(*args: str) -> dict[str, Any]:
    ran = run_cli("remote", *args, "--json")
    assert ran.returncode == 0, ran.stdout + ran.stderr
    data: dict[str, Any] = json.loads(ran.stdout)
    return data


def manifests(backdoor: Backdoor) -> set[str]:
    return {n for n in backdoor.names() if n.startswith("entries/")}


def blobs(backdoor: Backdoor) -> set[str]:
    return {n for n in backdoor.names() if n.startswith("blobs/")}


# -- least recently used first -------------------------------------------------------------
def test_least_recently_used_entries_go_first_and_recently_used_ones_survive(
        remote_url: str, tmp_path: Path,  # noqa: F811
        request: pytest.FixtureRequest) -> None:
    """Three entries of 1000 bytes created 10, 9 and 8 days ago; a run used the oldest
    (its access record): --max-size removes the unused ones, oldest first, and keeps
    the used one to the last."""
    backdoor = door(remote_url, request)
    remote = open_remote(remote_url, signing_key=None)
    a = publish(remote, tmp_path, "a", os.urandom(1000), age_days=10)
    b = publish(remote, tmp_path, "b", os.urandom(1000), age_days=9)
    c = publish(remote, tmp_path, "c", os.urandom(1000), age_days=8)
    write_access(remote, "run-1", "gw0", [f"{a[0]}/{a[1]}", "junk", "x/y"])
    [record] = [n for n in backdoor.names() if n.startswith("access/")]
    assert record == "access/run-1-gw0.json"
    assert json.loads(backdoor.read(record))["used"] == [f"{a[0]}/{a[1]}"]
    assert set(last_use(remote)) == {f"{a[0]}/{a[1]}"}
    write_access(remote, "run-2", "gw0", [])  # nothing used: nothing written
    assert [n for n in backdoor.names() if n.startswith("access/")] == [record]

    data = cli_json("prune", "--remote", remote_url, "--max-size", "2000", "--blob-grace", "0")
    assert [(e["entry_digest"], e["why"]) for e in data["entries"]] == [(b[1], "max-size")]
    assert manifests(backdoor) == {f"entries/{a[0]}/{a[1]}.json", f"entries/{c[0]}/{c[1]}.json"}
    assert blobs(backdoor) == {f"blobs/{a[2]}", f"blobs/{c[2]}"}
    assert (data["total_before"], data["total_after"]) == (3000, 2000)

    removed = prune_remote(remote, max_size=1000, blob_grace_seconds=0)
    assert manifests(backdoor) == {f"entries/{a[0]}/{a[1]}.json"}, removed
    assert blobs(backdoor) == {f"blobs/{a[2]}"}, removed
    assert remote.verify() == []


def test_dry_run_deletes_nothing_and_lists_what_would_go(
        dir_url: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """--dry-run leaves every object as it was (a full snapshot, bytes included) and
    lists exactly what the same prune then removes."""
    backdoor = door(dir_url, request)
    remote = open_remote(dir_url, signing_key=None)
    publish(remote, tmp_path, "old", os.urandom(500), age_days=40)
    publish(remote, tmp_path, "mid", os.urandom(500), age_days=5)
    publish(remote, tmp_path, "new", os.urandom(500), age_days=1)
    backdoor.write(f"blobs/{'e' * 64}", b"orphan")
    backdoor.write("access/old-run-gw0.json",
                   json.dumps({"time": time.time() - 50 * DAY, "used": []}).encode())
    before = backdoor.snapshot()
    args = ("prune", "--remote", dir_url, "--older-than", "30d", "--max-size", "600",
            "--blob-grace", "0")

    dry = cli_json(*args, "--dry-run")
    assert backdoor.snapshot() == before
    assert dry["dry_run"] is True
    assert [e["why"] for e in dry["entries"]] == ["older-than", "max-size"]
    rc, text = cli(*args, "--dry-run")
    assert rc == 0, text
    assert "would remove 2 entries" in text, text
    assert backdoor.snapshot() == before

    done = cli_json(*args)
    assert sorted(done["removed"]) == sorted(dry["removed"])
    assert len(backdoor.names()) == len(before) - len(dry["removed"]) == 2  # new's


def test_older_than_and_max_size_combine_by_last_use(
        dir_url: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """--older-than removes what was not used for AGE (by access records, else created),
    then --max-size the least recently used of the rest; access records older than every
    kept entry go (junk ones too), newer ones stay."""
    backdoor = door(dir_url, request)
    remote = open_remote(dir_url, signing_key=None)
    x = publish(remote, tmp_path, "x", os.urandom(100), age_days=40)
    y = publish(remote, tmp_path, "y", os.urandom(100), age_days=35)
    z = publish(remote, tmp_path, "z", os.urandom(100), age_days=10)
    w = publish(remote, tmp_path, "w", os.urandom(100), age_days=1)
    write_access(remote, "recent", "main", [f"{y[0]}/{y[1]}"])  # y: created 35d, used now
    backdoor.write("access/ancient-main.json", json.dumps(
        {"time": time.time() - 39 * DAY, "used": [f"{x[0]}/{x[1]}"]}).encode())
    backdoor.write("access/junk-old.json", b"[" * 100_000)
    backdate(dir_url, "access/junk-old.json", 45 * DAY)
    backdoor.write("access/junk-new.json", b"not json")

    data = cli_json("prune", "--remote", dir_url, "--older-than", "30d", "--max-size", "200",
                    "--blob-grace", "0")
    assert [(e["entry_digest"], e["why"]) for e in data["entries"]] == [
        (x[1], "older-than"), (z[1], "max-size")]
    assert manifests(backdoor) == {f"entries/{y[0]}/{y[1]}.json", f"entries/{w[0]}/{w[1]}.json"}
    assert {n for n in backdoor.names() if n.startswith("access/")} == {
        "access/recent-main.json", "access/junk-new.json"}
    assert data["access_records"] == 2


# -- remote rm and verify ------------------------------------------------------------------
def test_rm_an_entry_a_key_an_unknown_one_and_an_ambiguous_prefix(
        dir_url: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    backdoor = door(dir_url, request)
    remote = open_remote(dir_url, signing_key=None)
    k1, k2 = "abcd" + "0" * 60, "abcd" + "1" * 60
    e1 = publish(remote, tmp_path, "e1", b"one", age_days=1, key=k1)
    e2 = publish(remote, tmp_path, "e2", b"two", age_days=1, key=k1)
    publish(remote, tmp_path, "e3", b"three", age_days=1, key=k2, entry="ef01" + "0" * 60)
    publish(remote, tmp_path, "e4", b"four", age_days=1, key=k2, entry="ef01" + "1" * 60)
    before = backdoor.snapshot()

    rc, out = cli("rm", "--remote", dir_url, "abcd")
    assert rc == 1, out
    assert "ambiguous" in out, out
    assert f"{k1} (2 entries)" in out, out
    assert f"{k2} (2 entries)" in out, out
    rc, out = cli("rm", "--remote", dir_url, "ffff0000")
    assert rc == 1, out
    assert "has no entry ffff0000" in out, out
    rc, out = cli("rm", "--remote", dir_url, "abcd1111/ef01")
    assert rc == 1, out
    assert "ambiguous: it names 2 candidates" in out, out
    assert f"{k2}/ef01{'0' * 60}" in out, out
    assert f"{k2}/ef01{'1' * 60}" in out, out
    assert backdoor.snapshot() == before, "a refused rm removed something"

    rc, out = cli("rm", "--remote", dir_url, f"{k1[:12]}/{e1[1][:12]}")
    assert rc == 0, out
    assert manifests(backdoor) == {f"entries/{k1}/{e2[1]}.json"} | {
        n for n in manifests(backdoor) if k2 in n}
    assert f"blobs/{e1[2]}" in backdoor.names(), "rm leaves the blob to prune"
    assert "next 'pytest-mlcjit remote prune'" in out, out
    rc, out = cli("rm", "--remote", dir_url, k2)
    assert rc == 0, out
    assert manifests(backdoor) == {f"entries/{k1}/{e2[1]}.json"}
    data = cli_json("prune", "--remote", dir_url, "--older-than", "30d", "--blob-grace", "0")
    assert blobs(backdoor) == {f"blobs/{e2[2]}"}, data


def test_verify_lists_quarantined_and_bad_entries_with_the_command_that_removes_them(
        dir_url: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    backdoor = door(dir_url, request)
    remote = open_remote(dir_url, signing_key=None)
    good = publish(remote, tmp_path, "good", b"good bytes", age_days=1)
    bad = publish(remote, tmp_path, "bad", b"bad bytes", age_days=1)
    refused = publish(remote, tmp_path, "refused", b"refused bytes", age_days=1)
    backdoor.write(f"blobs/{bad[2]}", b"tampered!")
    [entry] = remote.list_manifests(refused[0])
    remote.quarantine(entry, "failed to load: undefined symbol")

    rc, out = cli("verify", "--remote", dir_url)
    assert rc == 1, out
    assert "2 entries checked" in out, out
    assert "1 bad" in out, out
    remove_bad = f"pytest-mlcjit remote rm {bad[0][:12]}/{bad[1][:12]}"
    assert f"remove it: {remove_bad}" in out, out
    assert "failed to load: undefined symbol" in out, out
    remove_record = f"pytest-mlcjit remote rm {refused[0][:12]}/{refused[1][:12]}"
    assert f"remove the record: {remove_record}" in out, out

    for command in (remove_bad, remove_record):
        rc, text = cli(*command.split()[2:], "--remote", dir_url)
        assert rc == 0, text
    rc, out = cli("verify", "--remote", dir_url)
    assert rc == 0, out
    assert "moved aside" not in out, out
    assert manifests(backdoor) == {f"entries/{good[0]}/{good[1]}.json"}


# -- blobs: the grace period, and never one a manifest names ------------------------------------
def test_the_blob_grace_period_is_printed_and_settable(
        dir_url: str, request: pytest.FixtureRequest) -> None:
    """Blobs no entry names go once written longer ago than the grace period (default
    3600 s, printed; --blob-grace sets it), and a directory remote's temp files of
    writers that died with them."""
    backdoor = door(dir_url, request)
    old, recent = f"blobs/{'a' * 64}", f"blobs/{'b' * 64}"
    backdoor.write(old, b"orphan written 2h ago")
    backdoor.write(recent, b"orphan written 10 min ago")
    backdate(dir_url, old, 7200)
    backdate(dir_url, recent, 600)
    backdoor.write("blobs/.a1b2.tmp", b"left by a writer that died")  # never listed
    backdate(dir_url, "blobs/.a1b2.tmp", 7200)

    rc, out = cli("prune", "--remote", dir_url, "--older-than", "30d")
    assert rc == 0, out
    assert "removed 1 temporary file left by writers that died" in out, out
    assert "blobs/.a1b2.tmp" not in backdoor.names()
    assert "blob grace period: 3600s (--blob-grace)" in out, out
    assert "kept 1 blob no entry uses, written within the last 3600s" in out, out
    assert blobs(backdoor) == {recent}
    rc, out = cli("prune", "--remote", dir_url, "--older-than", "30d", "--blob-grace", "5m")
    assert rc == 0, out
    assert "blob grace period: 300s" in out, out
    assert blobs(backdoor) == set()


def wrap(remote: Remote, name: str, before: Callable[[tuple[Any, ...]], None],
         monkeypatch: pytest.MonkeyPatch) -> None:
    """Call ``before(args)`` each time ``remote.<name>`` is called, then the primitive."""
    real = getattr(remote, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        before(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(remote, name, wrapper)


def test_an_upload_that_reuses_a_blob_prune_judged_unused_does_not_lose_it(
        remote_url: str, tmp_path: Path, request: pytest.FixtureRequest,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Item 8's defect. A comment-only edit: new key, same bytes. Prune lists the blobs,
    then the manifests, and judges the blob of the old entry (created 10 days ago)
    unused; another machine's upload of the new key reuses that blob after prune's
    listing and before its removals (run from inside prune's first removal, the old
    manifest's), on a store that cannot touch a blob and with no grace period. The blob
    must survive: prune lists the manifests again before it removes blobs."""
    backdoor = door(remote_url, request)
    remote = open_remote(remote_url, signing_key=None)
    data = os.urandom(2000)
    old = publish(remote, tmp_path, "before-edit", data, age_days=10)
    # The other machine's requests go through the same client (prune touches nothing).
    other = remote
    monkeypatch.setattr(other, "_touch", lambda name: None, raising=False)
    uploaded: list[tuple[str, str, str]] = []

    def upload_now(args: tuple[Any, ...]) -> None:
        if not uploaded:
            uploaded.append(publish(other, tmp_path / "b", "after-edit", data, age_days=0))

    wrap(remote, "_delete", upload_now, monkeypatch)
    removed = remote.prune(7 * DAY, blob_grace_seconds=0)
    assert uploaded, "the interleaving did not happen"
    assert [url.rsplit("/", 3)[-3:] for url in removed] == [
        ["entries", old[0], f"{old[1]}.json"]]
    assert f"blobs/{old[2]}" in backdoor.names()
    assert other.verify() == []


def test_an_upload_that_touches_a_blob_while_prune_looks_at_it_keeps_it(
        dir_url: str, tmp_path: Path, request: pytest.FixtureRequest,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The same edit, later: the upload comes after prune listed the manifests again, right
    before it removes the blob (written 2 hours ago, past the grace period): run from
    inside prune's last look at the blob. The upload touches the blob it reuses, prune
    sees it written within the grace period and keeps it; the new entry downloads."""
    backdoor = door(dir_url, request)
    remote = open_remote(dir_url, signing_key=None)
    data = os.urandom(2000)
    old = publish(remote, tmp_path, "before-edit", data, age_days=10)
    backdate(dir_url, f"blobs/{old[2]}", 7200)
    dry = PruneReport()
    prune_remote(remote, 7 * DAY, dry_run=True, report=dry)
    assert dry.blobs == [remote._location(f"blobs/{old[2]}")], "not a candidate: no test"

    other = open_remote(dir_url, signing_key=None)
    uploaded: list[tuple[str, str, str]] = []

    def upload_now(args: tuple[Any, ...]) -> None:
        if args[0] == f"blobs/{old[2]}" and not uploaded:
            uploaded.append(publish(other, tmp_path / "b", "after-edit", data, age_days=0))

    wrap(remote, "_stat", upload_now, monkeypatch)
    report = PruneReport()
    prune_remote(remote, 7 * DAY, report=report)
    assert uploaded, "the interleaving did not happen"
    assert f"blobs/{old[2]}" in backdoor.names()
    assert [why for _, why in report.blobs_rescued] == [
        "written again within the grace period (an upload reuses it)"]
    assert manifests(backdoor) == {f"entries/{uploaded[0][0]}/{uploaded[0][1]}.json"}
    [entry] = other.list_manifests(uploaded[0][0])
    assert entry.manifest is not None
    other.download(entry.manifest, tmp_path / "downloaded.so")
    assert (tmp_path / "downloaded.so").read_bytes() == data


# -- bad input -----------------------------------------------------------------------------
@pytest.mark.parametrize(("args", "message"), [
    (["prune", "--max-size", "10X"],
     "invalid --max-size '10X': expected a number of bytes with an optional unit K, M, G, T"),
    (["prune", "--max-size=-1G"], "invalid --max-size '-1G'"),
    (["prune", "--older-than", "1d", "--blob-grace", "soon"], "invalid --blob-grace 'soon'"),
    (["prune"], "remote prune needs --older-than AGE, --max-size SIZE or both"),
    (["rm", "xyz"], "invalid ENTRY|KEY 'xyz': expected KEY/ENTRY"),
    (["rm", "abc"], "invalid ENTRY|KEY 'abc'"),
    (["rm", "abcd/ef01/2345"], "invalid ENTRY|KEY 'abcd/ef01/2345'"),
])
def test_bad_input_is_a_usage_error_naming_the_value(
        args: list[str], message: str, dir_url: str) -> None:
    rc, out = cli(*args, "--remote", dir_url)
    assert rc == 2, out
    assert message in out, out
    assert "Traceback" not in out, out


# -- in a prepare run ----------------------------------------------------------------------
def test_a_prepare_run_applies_the_remote_budget(
        project: Project, dir_url: str, tmp_path: Path,
        request: pytest.FixtureRequest) -> None:
    """A prepare job with --mlc-jit-remote-max-size: after it uploaded its library, the
    controller removes the least recently used entries (two old ones of 200 kB, the older
    first) until the budget holds, keeps the run's own upload, and the summary says so;
    MLC_JIT_REMOTE_MAX_SIZE junk is a usage error."""
    backdoor = door(dir_url, request)
    remote = open_remote(dir_url, signing_key=None)
    older = publish(remote, tmp_path, "older", os.urandom(200_000), age_days=20)
    newer = publish(remote, tmp_path, "newer", os.urandom(200_000), age_days=10)
    for sha in (older[2], newer[2]):
        backdate(dir_url, f"blobs/{sha}", 2 * 3600)
    project.write_tests([{"hidden": 4}])

    result = project.run("--mlc-device=cpu", "--mlc-jit-prepare", f"--mlc-jit-remote={dir_url}",
                         "--mlc-jit-remote-max-size=300K")
    out = result.stdout.str()
    assert result.ret == 0, out
    assert len(project.compiles()) == 1
    [line] = [ln for ln in out.splitlines() if ln.startswith("--mlc-jit-remote-max-size=")]
    assert "after removing 1 least recently used entry and 1 blob" in line, out
    names = manifests(backdoor)
    assert f"entries/{older[0]}/{older[1]}.json" not in names
    assert f"entries/{newer[0]}/{newer[1]}.json" in names
    [mine] = project.manifests()
    assert f"entries/{mine['key_digest']}/{mine['digest']}.json" in names
    assert blobs(backdoor) == {f"blobs/{newer[2]}", f"blobs/{mine['sha256']}"}

    bad = project.run("--mlc-jit-prepare", "--mlc-jit-remote-max-size=lots")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    assert "invalid --mlc-jit-remote-max-size 'lots'" in bad.stderr.str()


def test_access_records_that_are_junk_are_skipped(dir_url: str,
                                                  request: pytest.FixtureRequest) -> None:
    """Junk under access/ (not JSON, too deep, wrong types, a time no float holds, a
    forged future time) never fails a prune, counts for nothing (a future time for its
    object's own), and goes with the next prune once no kept entry needs it."""
    backdoor = door(dir_url, request)
    remote = open_remote(dir_url, signing_key=None)
    ref = f"{digest('k')}/{digest('e')}"
    for name, body in (("a", b"\xff\xfe"), ("b", b"[" * 100_000), ("c", b'{"time": "x"}'),
                       ("d", json.dumps({"time": 10**400, "used": [ref]}).encode()),
                       ("e", json.dumps({"time": 1.0, "used": "all"}).encode()),
                       ("f", json.dumps({"time": time.time() + 1e9, "used": [ref, 7]}).encode())):
        backdoor.write(f"access/{name}.json", body)
    used = last_use(remote)
    assert list(used) == [ref]
    stored: StoredObject | None = remote._stat("access/f.json")
    assert stored is not None
    assert used[ref] == stored.modified, "a forged future time counts as its object's"
    assert len(maintenance.access_records(remote)) == 6
    removed = prune_remote(remote, 30 * DAY)  # no entry is kept: no record is needed
    assert len(removed) == 6
    assert backdoor.names() == set()


def test_a_manifest_time_no_float_holds_fails_no_command(
        dir_url: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """A bucket writer's manifest whose ``created`` is 10**400 (valid JSON; no float holds
    it) or NaN: ``remote ls`` and ``prune`` go on, and the entry's last use is its
    object's time (as for a future time)."""
    backdoor = door(dir_url, request)
    remote = open_remote(dir_url, signing_key=None)
    key, entry, _ = publish(remote, tmp_path, "junk time", b"bytes", age_days=0)
    name = f"entries/{key}/{entry}.json"
    stored = json.loads(backdoor.read(name))
    for created in ("1" + "0" * 400, "NaN"):
        backdoor.write(name, json.dumps(stored).replace(
            f'"created": {json.dumps(stored["created"])}', f'"created": {created}').encode())
        backdate(dir_url, name, 3 * DAY)
        [found] = remote.list_manifests(key)
        assert found.created == found.modified, created
        for args, says in ((["ls"], "1 entry"), (["prune", "--older-than", "4d"],
                                                 "removed 0 entries")):
            rc, out = cli(*args, "--remote", dir_url)
            assert (rc, says in out) == (0, True), out
    rc, out = cli("prune", "--older-than", "2d", "--remote", dir_url)
    assert (rc, "removed 1 entry" in out) == (0, True), out
    assert manifests(backdoor) == set()
