"""The tutorial (docs/tutorial.md) as a reader follows it: its files, taken from the page
(each block whose first line is ``# <path>``), written into a fresh project, then the
cold run, the warm run, the edit, the READONLY run and ``pytest-mlcjit explain``.

One real compile: the runs select the tutorial's ``hidden=16`` tests (two tests, one
library); what was compiled is counted from the cache directory, not from the summary."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from conftest import inprocess
from pytest_mlcjit.cli import main as cli_main

TUTORIAL = Path(__file__).resolve().parent.parent / "docs" / "tutorial.md"
#: The runs' selection: the tutorial's SMALL config only (test_forward and test_shape).
ONE_LIBRARY = ("-p", "no:cacheprovider", "-k", "not 64")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.M | re.S)


def tutorial_files(text: str) -> dict[str, str]:
    """``{path: content}`` of each fenced block whose first line names its file."""
    files = {}
    for _, body in FENCE.findall(text):
        first = body.split("\n", 1)[0]
        named = re.fullmatch(r"# ([\w./-]+\.(?:py|ini))", first)
        if named:
            files[named.group(1)] = body
    return files


def tutorial_edit(text: str) -> str:
    """The line the tutorial's step 7 changes the factory's ``def build(`` line to."""
    step = text.split("## 7.", 1)[1].split("\n## ", 1)[0]
    edits: list[str] = [line for _, body in FENCE.findall(step) for line in body.splitlines()
                        if line.startswith("def build(")]
    assert len(edits) == 1, "step 7 shows one new `def build(` line"
    return edits[0]


def libraries(cache: Path) -> dict[str, tuple[int, int]]:
    """Each library file under the cache: its inode and modification time."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (cache / "tvm").glob("*.so")}


def test_the_tutorial_runs_as_written(pytester: pytest.Pytester,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    text = TUTORIAL.read_text(encoding="utf-8")
    files = tutorial_files(text)
    assert set(files) == {"models/tiny.py", "pytest.ini", "tests/test_tiny.py"}
    for name, content in files.items():
        path = pytester.path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, encoding="utf-8")
    (pytester.path / "models" / "__init__.py").write_text("", encoding="utf-8")
    cache = pytester.path / ".mlcjit-cache"  # the ini's mlc_jit_cache_dir

    cold = inprocess(pytester, *ONE_LIBRARY)
    cold.assert_outcomes(passed=2)
    built = libraries(cache)
    assert len(built) == 1, "one library for the two tests of one config"

    warm = inprocess(pytester, *ONE_LIBRARY)
    warm.assert_outcomes(passed=2)
    assert libraries(cache) == built, "the warm run compiled nothing"

    factory = pytester.path / "models" / "tiny.py"
    source = factory.read_text(encoding="utf-8")
    old = [line for line in source.splitlines() if line.startswith("def build(")]
    new = tutorial_edit(text)
    assert old
    assert old[0] != new
    factory.write_text(source.replace(old[0], new), encoding="utf-8")
    readonly = inprocess(pytester, "--mlc-jit-policy=READONLY", *ONE_LIBRARY)
    readonly.assert_outcomes(errors=2)
    readonly.stdout.fnmatch_lines(["*CacheMissError: no cached library for key *"
                                   "the policy is READONLY*"])
    assert libraries(cache) == built, "READONLY wrote nothing"

    capsys.readouterr()
    cwd = os.getcwd()
    os.chdir(pytester.path)
    try:
        status = cli_main(["explain", "--check", "--", *ONE_LIBRARY])
    finally:
        os.chdir(cwd)
    out = capsys.readouterr().out
    assert status == 1, out
    assert "1 would miss under READONLY" in out
    assert "differs in 1 key field" in out
    assert "factory_sha256" in out
