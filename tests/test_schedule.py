"""Longest first, no idle worker: prefetch orders the run's libraries by the compile times
this cache recorded (pytest_mlcjit.engine.schedule), and a free worker takes the next library no
one holds instead of a fixed share (pytest_mlcjit.plugin.prefetch, JIT.prefetch).

Real compiles of the tiny model; the order is read from the factory's own counter file
(one line per compile, written in the compile process), the worker of each compile from
the run's JSON report.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from conftest import Project, hold_tests
from pytest_mlcjit import JIT, Settings, TVMModel
from pytest_mlcjit.cache.layout import timing_file
from pytest_mlcjit.cache.store.local import LocalStore
from pytest_mlcjit.engine.schedule import expected_seconds, longest_first, spec_digest

#: ``waitmodel:build(hidden, wait_for)``: counts its call, then (``wait_for`` > 0) waits
#: until the counter holds that many lines: a compile that lasts until the others are done.
WAIT_MODEL = '''
import os
import time

from tvm.relax.frontend import nn


class Tiny(nn.Module):
    def __init__(self, hidden):
        self.fc = nn.Linear(8, hidden)

    def forward(self, x):
        return nn.relu(self.fc(x))


def build(hidden=4, wait_for=0):
    counter = os.environ["MLCJIT_TEST_COUNT"]
    with open(counter, "a") as f:
        f.write(f"{os.getpid()} hidden={hidden}\\n")
    deadline = time.monotonic() + 120
    while wait_for and time.monotonic() < deadline:
        with open(counter) as f:
            if len(f.read().splitlines()) >= wait_for:
                break
        time.sleep(0.02)
    return Tiny(hidden), {"forward": {"x": nn.spec.Tensor((2, 8), "float32")}}
'''


def test_longest_first_fills_unknowns_with_the_median_and_keeps_ties_in_order() -> None:
    assert longest_first(list("abcde"), [None, 5.0, 1.0, None, 5.0]) == list("abdec")
    assert longest_first(list("abc"), [None, None, None]) == list("abc")
    assert longest_first(list("abc"), [1.0, 3.0, 2.0]) == list("bca")
    assert longest_first([], []) == []


def test_the_spec_digest_ignores_the_toolchain_and_the_factory_source(
        project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    monkeypatch.syspath_prepend(str(project.pytester.path))
    engine = JIT(Settings(cache_dir=project.cache))
    req = engine.request(TVMModel("tinymodel:build", config={"hidden": 4}), "cpu")
    same = {**req.key, "toolchain": {"tvm": {"version": "0.0"}}, "factory_sha256": "0" * 64,
            "host": {"machine": "elsewhere"}}
    assert spec_digest(dataclasses.replace(req, key=same)) == spec_digest(req)
    for field, value in (("config", {"hidden": 5}), ("opt_level", 2),
                         ("factory", "tinymodel:other"), ("target", {"kind": "c"})):
        other = dataclasses.replace(req, key={**req.key, field: value})
        assert spec_digest(other) != spec_digest(req), field


def test_a_compile_records_its_time_for_the_spec(project: Project,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(project.pytester.path))
    engine = JIT(Settings(cache_dir=project.cache))
    spec = TVMModel("tinymodel:build", config={"hidden": 4})
    model = engine.compile(spec, "cpu")
    req = engine.request(spec, "cpu")
    store = LocalStore(project.cache).open_for_writing()
    memo = json.loads(timing_file(project.cache, spec_digest(req)).read_text())
    assert memo["seconds"] == pytest.approx(model.compile_seconds, abs=0.01)
    assert expected_seconds(engine.query(req), req, store) == memo["seconds"]
    # Without the memo, the key's other input states' manifests still say it.
    timing_file(project.cache, spec_digest(req)).unlink()
    assert expected_seconds(engine.query(req), req, store) == pytest.approx(
        model.compile_seconds, abs=0.01)


def test_prefetch_compiles_longest_first_by_recorded_times(project: Project,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    """Compile times on record (as an earlier run on another toolchain or input state
    leaves them) for three of four libraries: one process's prefetch compiles them
    longest first, the one without a record as the median of the others."""
    monkeypatch.syspath_prepend(str(project.pytester.path))
    recorded = {3: 1.0, 4: 9.0, 5: None, 6: 4.0}  # first-use order 3, 4, 5, 6
    engine = JIT(Settings(cache_dir=project.cache))
    store = LocalStore(project.cache).open_for_writing()  # the cache and its control dir
    for hidden, seconds in recorded.items():
        if seconds is not None:
            req = engine.request(TVMModel("tinymodel:build", config={"hidden": hidden}), "cpu")
            store.record_time(spec_digest(req), req.digest, seconds)
    project.write_tests([{"hidden": h} for h in recorded])
    hold_tests(project, 4)
    result = project.run("-p", "no:xdist", "--mlc-device=cpu", "--mlc-jit-prefetch=on")
    result.assert_outcomes(passed=4)
    order = [int(line.split("hidden=")[1]) for line in project.compiles()]
    assert order == [4, 5, 6, 3], "9 s, then the unknown (median 4 s) and 4 s in first-use " \
                                  "order, then 1 s"


def test_a_free_worker_steals_the_rest(project: Project, tmp_path: Path) -> None:
    """Five libraries on two xdist workers, nothing on record: the first (in first-use
    order) lasts until the four others are compiled. The worker that took it is busy
    throughout, so the other one compiles all four; a fixed share (library j to worker
    j mod 2) would have left two of them to the busy worker (and this test would time
    out)."""
    project.pytester.makepyfile(waitmodel=WAIT_MODEL)
    configs = [{"hidden": 3, "wait_for": 5}] + [{"hidden": h} for h in (4, 5, 6, 7)]
    project.pytester.makepyfile(test_steal=f'''
import pytest
from pytest_mlcjit import TVMModel

SPECS = [TVMModel("waitmodel:build", config=c) for c in {configs!r}]


@pytest.mark.parametrize("compiled_model", SPECS, indirect=True)
def test_model(compiled_model):
    assert compiled_model.path.exists()
''')
    hold_tests(project, 5)
    report = tmp_path / "report.json"
    result = project.run("-n", "2", "--mlc-device=cpu", "--mlc-jit-prefetch=on",
                         f"--mlc-jit-report={report}")
    result.assert_outcomes(passed=5)
    assert len(project.compiles()) == 5
    libraries = json.loads(report.read_text())["libraries"]
    by_worker: dict[str, list[str]] = {}
    for lib in libraries:
        assert lib["prefetched"], lib
        by_worker.setdefault(lib["worker"], []).append(lib["spec"])
    long_one = next(lib["worker"] for lib in libraries if "wait_for=5" in lib["spec"])
    assert by_worker[long_one] == [next(s for s in by_worker[long_one] if "wait_for" in s)]
    (other,) = set(by_worker) - {long_one}
    assert len(by_worker[other]) == 4, by_worker


def test_jit_prefetch_skips_a_key_another_holds(project: Project,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """JIT.prefetch does not wait for a key another process holds: it returns False at
    once (the holder compiles it), and compiles a free one."""
    monkeypatch.syspath_prepend(str(project.pytester.path))
    engine = JIT(Settings(cache_dir=project.cache))
    spec = TVMModel("tinymodel:build", config={"hidden": 4})
    req = engine.request(spec, "cpu")
    store = LocalStore(project.cache).open_for_writing()
    held, release = threading.Event(), threading.Event()

    def hold() -> None:  # the key's flock, held as another process's compile holds it
        with store.lock(req.digest, 10.0):
            held.set()
            release.wait(60)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(60)
        assert engine.prefetch(spec, "cpu") is False
        assert project.compiles() == []
        assert engine.stats.requests == 0, "a prefetch is no request"
    finally:
        release.set()
        holder.join()
    assert engine.prefetch(spec, "cpu") is True
    assert len(project.compiles()) == 1
    assert os.path.exists(engine.compile(spec, "cpu").path)
