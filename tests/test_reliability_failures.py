"""A failure is remembered for the rest of its run: a model that fails to compile, needed by
ten tests on two xdist workers, is compiled once per run, and every one of those tests
fails with the same message and the same log."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import Project


def _errors(out: str) -> list[tuple[str, str]]:
    """(first line of the CompileError, log path) for each failing test, in order.

    Only the ERRORS section is read: on CI (``CI`` set) pytest prints the messages again,
    untruncated, in the short test summary."""
    out = out.split("short test summary info", maxsplit=1)[0]
    heads = re.findall(r"^(CompileError: compiling .*)$", out, flags=re.MULTILINE)
    logs = re.findall(r"^compile log: (.*)$", out, flags=re.MULTILINE)
    assert len(heads) == len(logs), out
    return list(zip(heads, logs, strict=True))


def test_a_failing_model_compiles_once_per_run(project: Project) -> None:
    project.write_tests([{"fail": True}], per_config=10)
    first = project.run("-n", "2", "--mlc-device=cpu")
    first.assert_outcomes(errors=10)
    assert len(project.compiles()) == 1, "one compile for ten tests on two workers"
    errors = _errors(first.stdout.str())
    assert len(errors) == 10
    assert len(set(errors)) == 1, f"one message and one log for all: {set(errors)}"
    head, log = errors[0]
    assert "failed: the compiler exited with code 1" in head
    assert "RuntimeError: factory failed on purpose (hidden=4)" in Path(log).read_text()
    # At most one test saw the compile fail (none, if a background prefetch compiled it).
    assert first.stdout.str().count("(remembered from an earlier attempt in this run)") >= 9
    assert project.manifests() == [], "a failure publishes nothing"
    assert project.libraries() == []

    # A new run tries again, once.
    second = project.run("-n", "2", "--mlc-device=cpu")
    second.assert_outcomes(errors=10)
    assert len(project.compiles()) == 2
    assert set(_errors(second.stdout.str())) == {(head, log)}
