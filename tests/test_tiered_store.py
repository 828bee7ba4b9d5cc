"""The tiered store (the local cache, then a remote) through the storage interface only:
what the engine asks of a :class:`~pytest_mlcjit.cache.store.interface.Store` (``lookup``,
``fetch``, ``publish``, ``lock``, staging), and nothing else of the package.

The requests are an :class:`Entry` of this file (an ``EntryQuery``: a key digest, its
library at ``<root>/tvm/<digest>.so``, no recorded inputs, never stale), and the libraries
real files of random bytes (a store never loads them). Each scenario runs against a
``file://`` directory and moto's S3 server, and where the remote works, against a third
adapter registered for the test only (``mem://``: a :class:`Remote` subclass over a dict,
one line in ``ADAPTERS``): the seam holds if it works with no other change. What a remote
holds is read behind the store's back (:class:`s3server.Backdoor`), what a cache holds from
its directory: never from the store's own account.

Failures are real: a remote directory that is gone, an S3 server that is stopped
(connections refused) and later started again on the same port, moto checking
credentials (it then refuses the dummy ones), a directory the user may not read (file
permissions enforced for real, as root too: :func:`s3server.permissions_enforced`), bytes
changed on the remote behind its back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar, Protocol

import pytest
from s3server import Backdoor, SpareServer, permissions_enforced

from pytest_mlcjit.cache.layout import EntryPaths
from pytest_mlcjit.cache.manifest import Manifest
from pytest_mlcjit.cache.store import Stores
from pytest_mlcjit.cache.store.interface import Hit, Missing, Store
from pytest_mlcjit.cache.store.remote import (
    ADAPTERS,
    Adapter,
    Remote,
    RemoteOptions,
    RemoteURL,
    open_remote,
    parse_remote_url,
)
from pytest_mlcjit.cache.store.remote.base import Chunks, StoredObject
from pytest_mlcjit.cache.store.remote_stats import RemoteStats
from pytest_mlcjit.errors import (
    BadURL,
    RemoteAuthError,
    RemoteConfigError,
    RemoteError,
    RemoteIntegrityError,
    RemoteUnavailableError,
)

pytest_plugins = ["s3server"]

#: How the tests reach a remote: no retries, so that a failure is one request.
FAST = RemoteOptions(retries=0, connect_timeout=2.0, read_timeout=10.0)
LOCK_WAIT_S = 60.0


# -- the request: a tiny backend of this file -------------------------------------------------
class Entry:
    """An ``EntryQuery`` for a key named ``name``: one entry per key (no recorded inputs),
    at ``<root>/tvm/<digest>.so``, never stale, nothing to adopt."""

    def __init__(self, name: str) -> None:
        self.digest = hashlib.sha256(name.encode()).hexdigest()
        self.describe = f"test entry {name!r}"

    def locate(self, root: Path, entry: str | None = None) -> EntryPaths:
        digest = entry or self.digest
        return EntryPaths(digest, root / "tvm" / f"{digest}.so")

    def inputs_base(self) -> Path | None:
        return None

    def stale(self, manifest: Any) -> str | None:
        return None

    def adopt(self, paths: EntryPaths) -> Manifest | None:
        return None


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def compile_into(store: Store, query: Entry, data: bytes) -> Hit:
    """What the engine does after a miss everywhere: under the key's lock, "compile" (write
    ``data`` into a staging directory) and publish."""
    with store.lock(query.digest, LOCK_WAIT_S, query.describe):
        staging = store.new_staging_dir(query.digest)
        try:
            library = staging / "library.so"
            library.write_bytes(data)
            manifest: Manifest = {"digest": query.digest, "sha256": sha256(data),
                                  "size": len(data), "created": time.time()}
            return store.publish(query, library, None, manifest)
        finally:
            store.remove_staging(staging)


def fetch(store: Store, query: Entry) -> Hit | Missing:
    """What the engine does after a local miss: ask the further tiers (under the key's lock
    when the store takes writes)."""
    if store.writable:
        with store.lock(query.digest, LOCK_WAIT_S, query.describe):
            found = store.fetch(query)
    else:
        found = store.fetch(query)
    assert isinstance(found, Hit | Missing), found
    return found


def library_at(root: Path, query: Entry) -> Path:
    """Where a cache at ``root`` keeps ``query``'s library (the oracle: this file's
    layout, not the store's answer)."""
    return root / "tvm" / f"{query.digest}.so"


def staged(root: Path) -> list[Path]:
    """What is left in the cache's staging directory."""
    staging = root / ".mlcjit" / "staging"
    return sorted(staging.iterdir()) if staging.is_dir() else []


# -- a third kind of remote, for the seam ----------------------------------------------------
class MemRemote(Remote):
    """A remote over a dict of this process (``mem://NAME``): a third adapter, registered
    in ``ADAPTERS`` by the tests that use it, to show a new kind of remote needs a class
    and a registry line, nothing else."""

    #: NAME → object name → (bytes, when written).
    STORES: ClassVar[dict[str, dict[str, tuple[bytes, float]]]] = {}
    _lock = threading.Lock()

    def __init__(self, url: RemoteURL, options: RemoteOptions) -> None:
        super().__init__(url, options)
        self.objects = self.STORES.setdefault(url.bucket, {})

    @classmethod
    def parse_url(cls, parts: urllib.parse.SplitResult) -> RemoteURL:
        if not parts.netloc or parts.path not in ("", "/"):
            raise BadURL("expected mem://NAME")
        return RemoteURL("mem", parts.netloc, "", "", f"mem://{parts.netloc}")

    def _location(self, name: str) -> str:
        return f"{self.url}/{name}"

    def _list(self, prefix: str) -> Iterator[StoredObject]:
        with self._lock:
            found = sorted((n, item) for n, item in self.objects.items() if n.startswith(prefix))
        for name, (data, when) in found:
            yield StoredObject(name, len(data), when)

    def _open_stream(self, name: str) -> Chunks | None:
        item = self.objects.get(name)
        return None if item is None else self._chunks(item[0])

    @staticmethod
    def _chunks(data: bytes) -> Chunks:
        yield data

    def _blob_present(self, name: str, sha256: str, size: int) -> bool:
        item = self.objects.get(name)
        return item is not None and len(item[0]) == size and hashlib.sha256(
            item[0]).hexdigest() == sha256

    def _put_blob(self, name: str, library: Path, sha256: str, size: int) -> None:
        data = library.read_bytes()
        if hashlib.sha256(data).hexdigest() != sha256:
            raise RemoteIntegrityError(f"uploading {library} to {self._location(name)}: it "
                                       "changed while being read")
        with self._lock:
            self.objects[name] = (data, time.time())

    def _put_manifest(self, name: str, data: bytes, *, create_only: bool) -> bool:
        with self._lock:
            if create_only and name in self.objects:
                return False
            self.objects[name] = (data, time.time())
        return True

    def _delete(self, name: str) -> None:
        with self._lock:
            self.objects.pop(name, None)


MEM_ADAPTER = Adapter(f"{__name__}:MemRemote", "mem://NAME")


class MemDoor:
    """A ``mem://`` remote's raw objects, behind its back (as :class:`Backdoor`)."""

    def __init__(self, name: str) -> None:
        self.objects = MemRemote.STORES.setdefault(name, {})

    def write(self, name: str, data: bytes) -> None:
        self.objects[name] = (data, time.time())

    def read(self, name: str) -> bytes:
        return self.objects[name][0]

    def delete(self, name: str) -> None:
        del self.objects[name]

    def names(self) -> set[str]:
        return set(self.objects)

    def snapshot(self) -> dict[str, bytes]:
        return {name: data for name, (data, _) in self.objects.items()}


# -- the remote and the machines --------------------------------------------------------------
class Door(Protocol):
    def write(self, name: str, data: bytes) -> None: ...
    def read(self, name: str) -> bytes: ...
    def delete(self, name: str) -> None: ...
    def names(self) -> set[str]: ...
    def snapshot(self) -> dict[str, bytes]: ...


@dataclasses.dataclass
class Shared:
    """A remote several machines share: its URL, the way to its raw objects, the options
    to reach it and, for the failure tests, a way to take it down and bring it back."""

    kind: str
    url: str
    door: Door
    options: RemoteOptions = FAST
    directory: Path | None = None  #: a file:// remote's directory
    spare: SpareServer | None = None  #: an s3:// remote reached through a spare server

    def blob(self, data: bytes) -> str:
        return f"blobs/{sha256(data)}"

    def manifest(self, query: Entry) -> str:
        return f"entries/{query.digest}/{query.digest}.json"

    def take_down(self) -> None:
        """The remote becomes unreachable: its directory is gone (an unmounted share) or
        its server stops (connections refused)."""
        if self.directory is not None:
            self.directory.rename(self.directory.with_name("remote-away"))
        else:
            assert self.spare is not None, "reach the remote through a spare server"
            self.spare.stop()

    def bring_back(self) -> None:
        """The remote is back, with everything it held."""
        if self.directory is not None:
            self.directory.with_name("remote-away").rename(self.directory)
        else:
            assert self.spare is not None
            self.spare.start()


@pytest.fixture
def shared(request: pytest.FixtureRequest, tmp_path: Path,
           monkeypatch: pytest.MonkeyPatch) -> Iterator[Shared]:
    """A new, empty remote of the kind ``request.param`` names (file, s3, mem)."""
    kind = request.param
    if kind == "file":
        directory = tmp_path / "remote"
        directory.mkdir()
        yield Shared(kind, directory.as_uri(), Backdoor(directory.as_uri(), None),
                     directory=directory)
    elif kind == "s3":
        url = f"s3://{request.getfixturevalue('s3_bucket')}/shared"
        yield Shared(kind, url, Backdoor(url, request.getfixturevalue("s3_admin")))
    else:
        name = f"m{os.urandom(6).hex()}"
        monkeypatch.setitem(ADAPTERS, "mem", MEM_ADAPTER)
        try:
            yield Shared(kind, f"mem://{name}", MemDoor(name))
        finally:
            MemRemote.STORES.pop(name, None)


def through_spare_server(shared: Shared, request: pytest.FixtureRequest) -> None:
    """An s3 remote reached through a server of its own, which the test may stop."""
    if shared.kind == "s3":
        spare: SpareServer = request.getfixturevalue("spare_s3_server")
        shared.spare = spare
        shared.options = dataclasses.replace(shared.options, endpoint_url=spare.endpoint)


class Machine:
    """One machine's run: its cache root and the run's stores (``Stores``: the remote tier,
    its statistics and warnings belong to the run)."""

    def __init__(self, root: Path, shared: Shared, *, required: bool = False,
                 mode: str = "readwrite") -> None:
        self.root = root
        self.stores = Stores(remote=shared.url, remote_required=required, remote_mode=mode,
                             remote_options=shared.options)

    def store(self, *, writes: bool = True) -> Store:
        return self.stores.get(self.root, writes=writes)

    @property
    def stats(self) -> RemoteStats:
        stats = self.stores.remote_stats
        assert stats is not None, "the remote was never opened"
        return stats


@pytest.fixture
def machine(shared: Shared, tmp_path: Path) -> Iterator[Callable[..., Machine]]:
    """Makes a machine's run on the shared remote: ``machine(name, required=..., mode=...)``
    (its cache at ``tmp_path / name``); the runs are closed at teardown."""
    made: list[Machine] = []

    def new(name: str, **how: Any) -> Machine:
        made.append(Machine(tmp_path / name, shared, **how))
        return made[-1]

    yield new
    for run in made:
        run.stores.close()


ALL = ["file", "s3", "mem"]
REAL = ["file", "s3"]
DOWN = ["file", "s3"]


# -- the tiers at work ------------------------------------------------------------------------
@pytest.mark.parametrize("shared", ALL, indirect=True)
def test_a_miss_everywhere_is_uploaded_then_another_machine_downloads_and_keeps_it(
        shared: Shared, machine: Callable[..., Machine], tmp_path: Path) -> None:
    """Machine A misses locally and remotely, compiles and publishes: the library goes to
    its cache and to the remote. Machine B misses locally, gets a remote hit, and the
    download is backfilled into its cache: its next run finds it there even with the
    remote emptied. B uploads nothing."""
    query, data = Entry("first"), os.urandom(200_000)
    a = machine("a").store()
    assert isinstance(a.lookup(query), Missing)
    assert isinstance(fetch(a, query), Missing)

    published = compile_into(a, query, data)

    assert published.source == "local"
    assert library_at(tmp_path / "a", query).read_bytes() == data
    assert shared.door.names() == {shared.blob(data), shared.manifest(query)}
    assert shared.door.read(shared.blob(data)) == data

    remote_before = shared.door.snapshot()
    b = machine("b").store()
    assert isinstance(b.lookup(query), Missing)

    hit = fetch(b, query)

    assert isinstance(hit, Hit)
    assert hit.source == "remote"
    assert hit.paths.library == library_at(tmp_path / "b", query)
    assert hit.paths.library.read_bytes() == data
    assert shared.manifest(query) in hit.manifest.get("remote", "")
    assert staged(tmp_path / "b") == []
    backfilled = b.lookup(query)
    assert isinstance(backfilled, Hit)
    assert backfilled.source == "local"
    assert shared.door.snapshot() == remote_before, "B uploaded what it downloaded"

    for name in shared.door.names():
        shared.door.delete(name)
    next_run = machine("b").store()
    assert isinstance(next_run.lookup(query), Hit)
    assert library_at(tmp_path / "b", query).read_bytes() == data


@pytest.mark.parametrize("shared", ALL, indirect=True)
def test_two_machines_cold_at_once_leave_one_entry_the_first_publishers(
        shared: Shared, machine: Callable[..., Machine], tmp_path: Path) -> None:
    """Both machines miss everywhere and compile (different bytes: builds need not be
    reproducible); the first to publish owns the remote entry, the second's upload
    changes no entry and each keeps its own library; a third machine gets the first's."""
    query = Entry("raced")
    first, second = os.urandom(50_000), os.urandom(60_000)
    a = machine("a").store()
    b = machine("b").store()
    assert isinstance(fetch(a, query), Missing)
    assert isinstance(fetch(b, query), Missing)

    compile_into(a, query, first)
    compile_into(b, query, second)

    manifests = {n for n in shared.door.names() if n.startswith("entries/")}
    assert manifests == {shared.manifest(query)}
    assert sha256(first).encode() in shared.door.read(shared.manifest(query))
    assert library_at(tmp_path / "a", query).read_bytes() == first
    assert library_at(tmp_path / "b", query).read_bytes() == second
    c = machine("c").store()
    hit = fetch(c, query)
    assert isinstance(hit, Hit)
    assert hit.paths.library.read_bytes() == first


@pytest.mark.parametrize("shared", ALL, indirect=True)
def test_remote_mode_read_downloads_and_uploads_nothing(
        shared: Shared, machine: Callable[..., Machine], tmp_path: Path) -> None:
    """--mlc-jit-remote-mode=read: remote hits as usual; what the machine compiles stays
    in its cache (the remote is unchanged)."""
    seeded, data = Entry("seeded"), os.urandom(10_000)
    compile_into(machine("a").store(), seeded, data)
    before = shared.door.snapshot()
    reader = machine("b", mode="read").store()

    hit = fetch(reader, seeded)
    compile_into(reader, Entry("not shared"), os.urandom(10_000))

    assert isinstance(hit, Hit)
    assert hit.paths.library.read_bytes() == data
    assert shared.door.snapshot() == before


# -- READONLY ---------------------------------------------------------------------------------
@pytest.mark.parametrize("shared", ALL, indirect=True)
def test_readonly_reads_the_remote_and_writes_nothing_anywhere(
        shared: Shared, machine: Callable[..., Machine], tmp_path: Path) -> None:
    """READONLY (``Stores.get(root, writes=False)``: the read-only view of the cache under
    the tiered store) gets a remote hit into a private directory of its run, removed when
    the run ends: its cache directory is never made, the remote never written, and a
    publish or a lock is refused."""
    query, data = Entry("first"), os.urandom(100_000)
    compile_into(machine("a").store(), query, data)
    before = shared.door.snapshot()
    root = tmp_path / "readonly-cache"
    run = machine("readonly-cache")
    store = run.store(writes=False)

    assert not store.writable
    assert isinstance(store.lookup(query), Missing)
    hit = fetch(store, query)
    again = fetch(store, query)
    missing = fetch(store, Entry("nowhere"))

    assert isinstance(hit, Hit)
    assert hit.source == "remote"
    assert hit.paths.library.read_bytes() == data
    assert again == hit
    assert isinstance(missing, Missing)
    assert root not in hit.paths.library.parents
    with pytest.raises(AssertionError, match="read-only store does not publish"):
        store.publish(query, hit.paths.library, None, hit.manifest)
    with pytest.raises(AssertionError, match="read-only store does not take locks"), \
            store.lock(query.digest, LOCK_WAIT_S):
        pass
    assert not root.exists(), "READONLY made the cache directory"
    assert shared.door.snapshot() == before, "READONLY wrote to the remote"
    run.stores.close()
    assert not hit.paths.library.exists(), "the private download outlived its run"


# -- failures ---------------------------------------------------------------------------------
@pytest.mark.parametrize("shared", DOWN, indirect=True)
def test_a_remote_that_goes_down_is_reported_once_then_left_alone(
        shared: Shared, machine: Callable[..., Machine], tmp_path: Path,
        request: pytest.FixtureRequest) -> None:
    """The remote goes down mid-run: the next remote request fails, the run warns once
    (naming the remote and the error) and falls back to the local cache; later requests
    skip the remote even after it is back (it holds an entry they miss), and publish
    locally without uploading: each such upload is a write not made, counted and said once
    (one line, however many). The next run uses the remote again."""
    through_spare_server(shared, request)
    held, data = Entry("held"), os.urandom(20_000)
    compile_into(machine("a").store(), held, data)
    run = machine("b")
    store = run.store()
    shared.take_down()

    assert isinstance(fetch(store, held), Missing)
    assert len(run.stats.warnings) == 1, run.stats.warnings
    warning = run.stats.warnings[0]
    assert f"remote {shared.url} failed while listing the entries of key" in warning
    assert "it is not used for the rest of this run" in warning
    assert "--mlc-jit-remote-required" in warning
    compile_into(store, Entry("during"), os.urandom(1000))
    shared.bring_back()
    assert isinstance(fetch(store, held), Missing), "the run asked the remote again"
    compile_into(store, Entry("after"), os.urandom(1000))

    assert run.stats.warnings == [warning]
    assert run.stats.uploads_failed == 2
    assert run.stats.upload_failures == [
        "not uploaded: the remote was down for the rest of the run"]
    assert {n for n in shared.door.names() if n.startswith("entries/")} == {
        shared.manifest(held)}, "the run uploaded after the remote went down"
    assert not library_at(tmp_path / "b", held).exists()
    assert library_at(tmp_path / "b", Entry("after")).exists()
    next_run = machine("b").store()
    hit = fetch(next_run, held)
    assert isinstance(hit, Hit)
    assert hit.paths.library.read_bytes() == data


@pytest.mark.parametrize("shared", DOWN, indirect=True)
def test_with_remote_required_a_down_remote_fails_the_request(
        shared: Shared, machine: Callable[..., Machine], tmp_path: Path,
        request: pytest.FixtureRequest) -> None:
    """--mlc-jit-remote-required: the request that meets the down remote fails with the
    remote's error (a directory that is gone is a configuration error, a refused
    connection an unavailable server); nothing is warned, made or left staged."""
    through_spare_server(shared, request)
    expected = RemoteConfigError if shared.kind == "file" else RemoteUnavailableError
    run = machine("b", required=True)
    store = run.store()
    shared.take_down()

    with pytest.raises(expected, match="entries/"):
        fetch(store, Entry("wanted"))

    assert run.stats.warnings == []
    assert not library_at(tmp_path / "b", Entry("wanted")).exists()
    assert staged(tmp_path / "b") == []


@pytest.mark.parametrize("shared", DOWN, indirect=True)
def test_with_remote_required_every_later_request_fails_too(
        shared: Shared, machine: Callable[..., Machine], tmp_path: Path,
        request: pytest.FixtureRequest) -> None:
    """--mlc-jit-remote-required, the remote down: not only the first request fails;
    a later fetch fails too (it does not fall back to compiling), and a library compiled
    meanwhile, whole in the local cache, fails its upload."""
    through_spare_server(shared, request)
    expected = RemoteConfigError if shared.kind == "file" else RemoteUnavailableError
    store = machine("b", required=True).store()
    shared.take_down()
    with pytest.raises(expected):
        fetch(store, Entry("first"))

    with pytest.raises(expected):
        fetch(store, Entry("second"))
    compiled = Entry("compiled")
    with pytest.raises(expected):
        compile_into(store, compiled, b"library bytes")
    assert library_at(tmp_path / "b", compiled).read_bytes() == b"library bytes"
    assert isinstance(store.lookup(compiled), Hit)


@pytest.mark.parametrize("shared", REAL, indirect=True)
def test_an_auth_error_fails_the_request_without_taking_the_remote_down(
        shared: Shared, machine: Callable[..., Machine], tmp_path: Path,
        request: pytest.FixtureRequest) -> None:
    """Refused credentials are never a miss nor an outage, even without
    --mlc-jit-remote-required: the fetch and the upload fail with RemoteAuthError, nothing
    is warned, and once access is restored the same run uses the remote. S3: moto checks
    credentials (it does not know the dummy ones); a directory: it may not be read."""
    held, data = Entry("held"), os.urandom(20_000)
    compile_into(machine("a").store(), held, data)
    run = machine("b")
    store = run.store()

    if shared.directory is None:
        auth = request.getfixturevalue("moto_auth")
        auth.on()
        with pytest.raises(RemoteAuthError, match="InvalidAccessKeyId"):
            fetch(store, held)
        with pytest.raises(RemoteAuthError):
            compile_into(store, Entry("new"), b"new library")
        auth.off()
    else:
        unreadable = [shared.directory / "entries", shared.directory / "blobs"]
        for path in unreadable:
            path.chmod(0)
        try:
            with permissions_enforced():
                with pytest.raises(RemoteAuthError, match="Permission denied"):
                    fetch(store, held)
                with pytest.raises(RemoteAuthError):
                    compile_into(store, Entry("new"), b"new library")
        finally:
            for path in unreadable:
                path.chmod(0o755)

    assert run.stats.warnings == []
    assert not library_at(tmp_path / "b", held).exists()
    hit = fetch(store, held)
    assert isinstance(hit, Hit), "an auth error took the remote down for the run"
    assert hit.paths.library.read_bytes() == data


@pytest.mark.parametrize("shared", ALL, indirect=True)
def test_a_library_that_does_not_match_its_manifest_is_never_loaded(
        shared: Shared, machine: Callable[..., Machine], tmp_path: Path) -> None:
    """Bytes changed on the remote (tampered, same size) or another entry's valid library
    in place of this one's (swapped): the download is refused and deleted, nothing is
    published or left staged, the request misses (it compiles instead) and each refusal
    is warned; with --mlc-jit-remote-required it fails with RemoteIntegrityError. A job
    that writes sets the refused entry aside (test_remote_quarantine.py: then rebuilt)."""
    tampered, swapped = Entry("tampered"), Entry("swapped")
    original, other = os.urandom(30_000), os.urandom(40_000)
    a = machine("a").store()
    compile_into(a, tampered, original)
    compile_into(a, swapped, other)
    shared.door.write(shared.blob(original), bytes(b ^ 0xFF for b in original))
    shared.door.write(shared.blob(other), original)

    run = machine("b", mode="read")  # a reader: it leaves the refused entries in place
    store = run.store()
    for query in (tampered, swapped):
        assert isinstance(fetch(store, query), Missing)
        assert not library_at(tmp_path / "b", query).exists()
    assert staged(tmp_path / "b") == []
    assert len(run.stats.warnings) == 2
    assert all("(not loaded)" in w for w in run.stats.warnings), run.stats.warnings
    assert sha256(original) in run.stats.warnings[0]

    readonly = machine("c").store(writes=False)
    assert isinstance(fetch(readonly, tampered), Missing)
    assert not (tmp_path / "c").exists()
    required = machine("d", required=True).store()
    with pytest.raises(RemoteIntegrityError, match="is corrupt"):
        fetch(required, swapped)
    assert not library_at(tmp_path / "d", swapped).exists()
    assert shared.manifest(swapped) not in shared.door.names(), "not set aside"


# -- the seam ---------------------------------------------------------------------------------
def test_a_new_kind_of_remote_is_a_class_and_a_registry_line(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``mem://`` is unknown until its adapter is registered; then it is parsed, opened and
    named among the valid forms like the two built-in kinds (the tests above run the
    tiered store through it)."""
    with pytest.raises(RemoteConfigError, match="unsupported scheme 'mem'"):
        parse_remote_url("mem://x")

    monkeypatch.setitem(ADAPTERS, "mem", MEM_ADAPTER)

    assert isinstance(open_remote("mem://x"), MemRemote)
    assert parse_remote_url("mem://x").redacted == "mem://x"
    with pytest.raises(RemoteConfigError, match="or mem://NAME") as info:
        parse_remote_url("gs://bucket")
    assert isinstance(info.value, RemoteError)
    MemRemote.STORES.pop("x", None)
