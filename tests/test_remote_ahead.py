"""Remote hits ahead of time: right after collection, the libraries a run's tests need
are downloaded from the remote tier in the background, several at once, before the tests
ask; nothing is compiled for them, and none of it is counted as a request.

The remote is a file:// directory shared by the "machines" (cache directories of one
pytester project, runs in this process). Its downloads are observed from the outside by
wrapping the file remote's one read primitive (``FileRemote._open_stream``): each blob
read records its start and its end, and the first two wait for each other at a barrier,
which only two downloads in flight at once can pass (the tests of a run ask one at a
time). The barrier's timeout is a safety limit against a hang, never a timing assertion:
without downloads ahead of time the reads come one by one, the barrier breaks, and the
test fails on what was recorded. Compiles are counted by the factory itself.

The first library the tests use is one the remote lacks: that one is fetched before the
tests start, alone (it finds whether the remote answers at all, so that a remote that
does not answer costs one timeout), the others in the background, together.
"""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Project, accounting
from pytest_mlcjit.cache.store.remote.file import FileRemote

#: The libraries on the remote, and those the tests use: first one the remote lacks.
ON_REMOTE = [{"hidden": 4}, {"hidden": 6}]
CONFIGS = [{"hidden": 3}, *ON_REMOTE]

#: Holds every test until the machine's cache holds ``count`` libraries (each test's
#: autouse fixture runs before its compiled_model): "every library was downloaded before
#: a test asked for it" is then a fact the run asserts; a run that does not fetch ahead
#: fails here instead of hanging (the limit is a safety limit; once it was reached, the
#: run's later tests fail at once).
HOLD_TESTS = '''
import pathlib, time
import pytest


GAVE_UP = []


@pytest.fixture(autouse=True)
def _hold_until_fetched():
    libraries = pathlib.Path({root!r})
    deadline = time.monotonic() + (0 if GAVE_UP else 30)
    while len(list(libraries.glob("*.manifest.json"))) < {count}:
        if time.monotonic() > deadline:
            GAVE_UP.append(True)
            pytest.fail("the remote hits were not fetched ahead of time")
        time.sleep(0.01)
    with open({record!r}, "a") as f:
        f.write(f"setup {{time.monotonic()}}\\n")
'''


#: The same for READONLY, whose downloads go to the run's private directories under
#: ``tmp`` (a library appears there once its download started).
HOLD_PRIVATE = '''
import pathlib, time
import pytest


GAVE_UP = []


@pytest.fixture(autouse=True)
def _hold_until_fetching():
    deadline = time.monotonic() + (0 if GAVE_UP else 30)
    while len(list(pathlib.Path({tmp!r}).glob("mlcjit-remote-*/tvm/*.so"))) < {count}:
        if time.monotonic() > deadline:
            GAVE_UP.append(True)
            pytest.fail("the remote hits were not fetched ahead of time")
        time.sleep(0.01)
'''


class Downloads:
    """The blob reads of a file remote in this process, in order: ``(event, name, time)``
    with event ``start``, ``end`` or ``alone`` (the barrier broke: no other download was
    in flight); the first two reads meet at a barrier before either sends a byte."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.events: list[tuple[str, str, float]] = []
        self._lock = threading.Lock()
        self._barrier = threading.Barrier(2)
        original = FileRemote._open_stream

        def _open_stream(remote: FileRemote, name: str) -> Any:
            stream = original(remote, name)
            if stream is None or not name.startswith("blobs/"):
                return stream
            self._note("start", name)
            try:
                self._barrier.wait(timeout=30)  # a safety limit: broken, it is recorded
            except threading.BrokenBarrierError:
                self._note("alone", name)
            return self._chunks(stream, name)

        monkeypatch.setattr(FileRemote, "_open_stream", _open_stream)

    def reset(self) -> None:
        """Forget what was recorded; the next two reads meet at a new barrier."""
        self.events.clear()
        self._barrier = threading.Barrier(2)

    def _chunks(self, stream: Iterator[bytes], name: str) -> Iterator[bytes]:
        try:
            yield from stream
        finally:
            self._note("end", name)

    def _note(self, event: str, name: str) -> None:
        import time

        with self._lock:
            self.events.append((event, name, time.monotonic()))

    def of(self, event: str) -> list[tuple[str, float]]:
        return [(name, t) for e, name, t in self.events if e == event]


def machine(project: Project, name: str) -> Project:
    """The same project as seen from another machine: a cache directory of its own."""
    return Project(project.pytester, project.cache.parent / f"cache-{name}", project.counter)


@pytest.fixture
def remote(project: Project, tmp_path: Path) -> str:
    """A file:// remote holding the libraries of :data:`ON_REMOTE`, compiled and uploaded
    by a first machine; the project's tests then use :data:`CONFIGS`, the first of which
    the remote lacks."""
    shared = tmp_path / "remote"
    shared.mkdir()
    url = shared.as_uri()
    project.write_tests(ON_REMOTE)
    first = machine(project, "a")
    first.run("-p", "no:xdist", "--mlc-device=cpu", f"--mlc-jit-remote={url}",
              ).assert_outcomes(passed=2)
    assert len(project.compiles()) == 2
    assert len(list(shared.glob("entries/*/*.json"))) == 2, "not uploaded"
    project.write_tests(CONFIGS, per_config=2)
    return url


def compiled_since(project: Project, before: int) -> list[str]:
    """The configs the factory compiled since it had compiled ``before`` times."""
    return [line.split()[1] for line in project.compiles()[before:]]


def test_remote_hits_are_downloaded_at_once_before_the_tests_ask_and_never_compiled(
        project: Project, remote: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh machine (no xdist): the remote's two libraries are downloaded at the same
    time, each once, before any test's setup (the tests are held until the cache holds
    both) and not compiled; the library the remote lacks is not compiled ahead of time
    either (its first test compiles it). The summary counts the tests' requests only
    (a remote hit each where the run downloaded the library).

    Then another fresh machine with the compile prefetch on: the remote's two are
    downloaded at once, never compiled, and the one it lacks is compiled ahead of time,
    once (the tests are held until the cache holds all three)."""
    downloads = Downloads(monkeypatch)
    fresh = machine(project, "b")
    record = tmp_path / "setups.txt"
    project.pytester.makeconftest(HOLD_TESTS.format(root=str(fresh.cache / "tvm"), count=2,
                                                    record=str(record)))

    result = fresh.run("-p", "no:xdist", "--mlc-device=cpu", f"--mlc-jit-remote={remote}",
                       "--mlc-jit-remote-mode=read")  # (the remote still lacks hidden=3)

    result.assert_outcomes(passed=6)
    assert compiled_since(project, 2) == ["hidden=3"], "compiled what the remote has"
    assert len(fresh.libraries()) == 3
    starts, ends = downloads.of("start"), downloads.of("end")
    assert len(starts) == len(ends) == 2, downloads.events
    assert len({name for name, _ in starts}) == 2, "a library was downloaded twice"
    assert not downloads.of("alone"), f"one download at a time: {downloads.events}"
    assert max(t for _, t in starts) < min(t for _, t in ends), "not in flight at once"
    setups = [float(line.split()[1]) for line in record.read_text().splitlines()]
    assert len(setups) == 6
    assert max(t for _, t in ends) < min(setups), "a test started before its download ended"
    assert "ahead of time" not in result.stdout.str()
    counts = accounting(result)
    assert counts == {"requests": 6, "remote_hit": 4, "compiled": 1, "hit": 1}, counts

    downloads.reset()
    prefetched = machine(project, "d")
    project.pytester.makeconftest(HOLD_TESTS.format(
        root=str(prefetched.cache / "tvm"), count=3, record=str(tmp_path / "setups-d.txt")))

    result = prefetched.run("-p", "no:xdist", "--mlc-device=cpu", "--mlc-jit-prefetch=on",
                            f"--mlc-jit-remote={remote}")

    result.assert_outcomes(passed=6)
    assert compiled_since(project, 3) == ["hidden=3"], "compiled what the remote has"
    assert len(prefetched.libraries()) == 3
    assert len(downloads.of("start")) == 2, downloads.events
    assert not downloads.of("alone"), f"one download at a time: {downloads.events}"
    result.stdout.fnmatch_lines(["6 requests: * 1 library compiled ahead of time*"])
    counts = accounting(result)  # hidden=3's: hits, or a wait for the prefetch to finish
    assert counts["remote_hit"] == 4, counts
    assert "compiled" not in counts, counts


def test_readonly_gets_its_remote_hits_ahead_of_time_too(
        project: Project, remote: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """READONLY on a cache directory it may not write: the remote's two libraries are
    downloaded at once into the run's private directory; nothing is compiled or written
    to the cache, and the private directory goes with the run; every request of theirs is
    a remote hit (as READONLY counts them), and the tests of the library the remote lacks
    fail as READONLY misses do (the tests are held until both downloads started)."""
    downloads = Downloads(monkeypatch)
    readonly = machine(project, "c")
    readonly.cache.mkdir(mode=0o555)
    private = tmp_path / "tmp"
    private.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private))
    project.pytester.makeconftest(HOLD_PRIVATE.format(tmp=str(private), count=2))

    result = readonly.run("-p", "no:xdist", "--mlc-device=cpu", "--mlc-jit-policy=READONLY",
                          f"--mlc-jit-remote={remote}")

    result.assert_outcomes(passed=4, errors=2)
    assert len(project.compiles()) == 2, "READONLY compiled"
    assert not list(readonly.cache.iterdir()), "READONLY wrote into the cache"
    assert not list(private.glob("mlcjit-remote-*")), "the private downloads outlived the run"
    starts = downloads.of("start")
    assert len(starts) == 2, downloads.events
    assert not downloads.of("alone"), f"one download at a time: {downloads.events}"
    assert max(t for _, t in starts) < min(t for _, t in downloads.of("end"))
    counts = accounting(result)
    assert counts == {"requests": 6, "remote_hit": 4, "missed": 2}, counts
