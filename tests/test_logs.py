"""Compile logs are bounded, everything the cache stores is counted, and a remembered
failure goes once its key compiles.

The launcher writes the compiler's output to the log as it comes, up to
``runner.LOG_HEAD_BYTES``, keeps the last ``runner.LOG_TAIL_BYTES`` in memory, and at the
end writes a line saying how many bytes were cut, then that tail. ``info`` and
``prune --max-size`` count every file under the root (:func:`manage.disk_usage`), so a
failure's log is no longer invisible to the size cap.

The engine runs in this process (a new engine per run); compiles in processes of their
own.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from faultmodels import add_hold_model, files_under

from conftest import Project
from pytest_mlcjit import JIT, CompiledModel, Policy, Settings, TVMModel
from pytest_mlcjit.cache.manage import info, prune
from pytest_mlcjit.compiler.launch import LOG_HEAD_BYTES, LOG_TAIL_BYTES
from pytest_mlcjit.errors import CompileError

NOISE_MB = 50
#: The longest a log may be: head, tail, the line between them, and the runner's own
#: first line (the command).
LOG_BOUND = LOG_HEAD_BYTES + LOG_TAIL_BYTES + 4096


def _failure_files(project: Project) -> list[Path]:
    return sorted((project.cache / ".mlcjit" / "failed").glob("*"))


def _check_bounded(log: bytes, *, ends_with: bytes) -> None:
    assert len(log) <= LOG_BOUND, f"a {len(log)}-byte log"
    assert log.startswith(b"$ "), "the head is kept: the command line first"
    assert b"bytes of compiler output cut here" in log
    assert ends_with in log[-LOG_TAIL_BYTES:], "the tail is kept"


def test_fifty_megabytes_of_compiler_output(project: Project, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A compile that prints 50 MB and fails: the failure's log keeps its head and tail
    (about 1.25 MB), its record stays small; ``info`` counts both; ``prune --max-size 0``
    removes them and says what really remains. The same key then compiles (printing 50 MB
    again): its failure record goes, and its entry's log is bounded too. Before, the
    50 MB were stored as a 52.4 MB log, again in the failure record, and prune reported
    "→ 0 B" while 51 MB remained."""
    add_hold_model(project)
    monkeypatch.syspath_prepend(str(project.pytester.path))
    flag = tmp_path / "fail"
    flag.touch()
    spec = TVMModel("holdmodel:build",
                    config={"hidden": 4, "noise_mb": NOISE_MB, "fail_if": str(flag)})

    def run(policy: str = "ON") -> CompiledModel:  # a new engine: a new run
        return JIT(Settings(cache_dir=project.cache, policy=Policy.parse(policy))).compile(
            spec, "cpu")

    with pytest.raises(CompileError):
        run()
    record, log = _failure_files(project)
    assert (record.suffix, log.suffix) == (".json", ".log")
    kept = log.stat().st_size
    _check_bounded(log.read_bytes(), ends_with=b"failed on purpose (hidden=4)")
    assert record.stat().st_size < 16 * 1024, "the record keeps only the log's last lines"
    assert "failed on purpose" in json.loads(record.read_text())["message"]

    stored = info(project.cache)
    assert stored["total_size"] == files_under(project.cache)
    assert stored["failed"] == 1
    assert stored["failed_size"] >= log.stat().st_size
    result = prune(project.cache, max_size=0)
    assert result.failures_removed == [record.stem]
    assert result.total_after == files_under(project.cache), "prune says what remains"
    assert _failure_files(project) == []
    print(f"\n{NOISE_MB} MB of output: a {kept}-byte log was kept")

    with pytest.raises(CompileError):  # the failure was pruned: it compiles again
        run()
    assert len(_failure_files(project)) == 2
    flag.unlink()
    # A failure is known across runs while nothing it depends on changes: REDO retries it.
    model = run("REDO")
    assert not model.hit
    assert _failure_files(project) == [], "the failure record goes once the key compiles"
    (entry_log,) = (project.cache / "tvm").glob("*.log")
    _check_bounded(entry_log.read_bytes(), ends_with=b"end of the noise")
    assert info(project.cache)["total_size"] == files_under(project.cache)
    assert len(project.compiles()) == 3
