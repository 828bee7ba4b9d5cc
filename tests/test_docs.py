"""The documentation site (mkdocs.yml, docs/): the strict build passes; the generated
reference names every option, ini key, environment variable, command, marker and fixture;
every Python and shell block of docs/ and README.md is run (by these tests or by
.ci/run) or marked as an illustration (the convention: docs/index.md, "Contributing to the
docs")."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from pytest_mlcjit import cli, plugin
from pytest_mlcjit.engine import settings

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
#: The line just before a block's opening fence that makes it an illustration.
ILLUSTRATION = re.compile(r"^\s*<!--\s*illustration\b.*-->\s*$")
PYTHON = {"python", "py"}
SHELL = {"bash", "sh", "shell", "console"}
#: Shell commands these tests run: the CLI's help and version, cheap and side-effect free.
RUNNABLE = re.compile(r"^(?:pytest-mlcjit|python -m pytest_mlcjit(?:\.cli)?)"
                      r"(?: [a-z][a-z-]*)* (?:--help|-h|--version)$")
_FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")


@cache
def hook() -> ModuleType:
    """docs/hooks/reference.py, the mkdocs hook that generates the reference."""
    path = DOCS / "hooks" / "reference.py"
    spec = importlib.util.spec_from_file_location("mlcjit_docs_reference", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def render(section: str) -> str:
    text: str = hook().SECTIONS[section]()
    return text


# -- the build --------------------------------------------------------------------------------
def test_the_site_builds_in_strict_mode(tmp_path: Path) -> None:
    """``mkdocs build --strict`` (a warning, a broken link or anchor, a missing page or a
    docstring that does not parse fails it) builds the site, generated pages included."""
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    options = (site / "reference" / "options" / "index.html").read_text(encoding="utf-8")
    assert "generated:" not in options, "the hook replaced the marker"
    for _, row in settings.rows():
        assert (row.flag or row.ini or row.env or "") in options
    commands = (site / "reference" / "cli" / "index.html").read_text(encoding="utf-8")
    assert "pytest-mlcjit remote ls" in commands
    api = (site / "reference" / "api" / "index.html").read_text(encoding="utf-8")
    assert "compiled_model" in api
    assert "TVMModel" in api
    assert "Compile-or-fetch" in api, "mkdocstrings rendered the docstrings"


# -- the generated reference ------------------------------------------------------------------
@pytest.mark.parametrize(("page", "section"), [("reference/options.md", "options"),
                                               ("reference/cli.md", "cli"),
                                               ("reference/api.md", "markers"),
                                               ("reference/api.md", "fixtures")])
def test_the_reference_pages_ask_for_their_generated_sections(page: str, section: str) -> None:
    text = (DOCS / page).read_text(encoding="utf-8")
    assert f"<!-- generated: {section} -->" in text.splitlines(), page


def test_every_option_ini_key_and_variable_is_in_the_reference() -> None:
    text = render("options")
    rows = settings.rows()
    assert any(r.flag is None and r.ini is None for _, r in rows), "env-only rows exist"
    for name, row in rows:
        keys = [row.flag, row.ini, row.env, row.env_fallback and row.env_fallback[0]]
        for key in filter(None, keys):
            assert f"`{key}`" in text, f"{name}: {key} is not in the options reference"
        assert " ".join(row.help.split()).replace("|", "\\|") in text, f"{name}'s help"
    defaults = {f.name for f in dataclasses.fields(settings.Settings)}
    assert {name for name, _ in rows} <= defaults


def _parsers(parser: argparse.ArgumentParser, words: tuple[str, ...] = ()
             ) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    yield words, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, (*words, name))


def test_every_command_and_its_options_are_in_the_reference() -> None:
    text = render("cli")
    found = list(_parsers(cli.build_parser()))
    assert len(found) >= 10, "the commands and remote's subcommands"
    for words, parser in found:
        name = " ".join(("pytest-mlcjit", *words))
        assert f"`{name}`" in text, f"{name} is not in the CLI reference"
        section = text[text.index(f" `{name}`\n"):]
        for action in parser._actions:
            for flag in action.option_strings:
                assert flag in section.split("\n#", 1)[0], f"{name} {flag}"


def test_every_marker_and_fixture_is_in_the_reference() -> None:
    markers, fixtures = render("markers"), render("fixtures")
    for line in plugin.MARKERS:
        name = line.split(":", 1)[0].split("(", 1)[0]
        assert f"`@pytest.mark.{name}" in markers, name
    names = [n for n, v in vars(plugin).items()
             if type(v).__name__ == "FixtureFunctionDefinition"]
    assert {"compiled_model", "mlc_device", "mlc_jit"} <= set(names)
    for name in names:
        assert f"### `{name}`" in fixtures, name


# -- the snippets -----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    illustration: bool

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """The fenced blocks of a Markdown file (a fence closes only with its own character,
    at least as long: a block shown inside a longer fence is not a block)."""
    found: list[Block] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        indent, fence = len(opening["indent"]), opening["fence"]
        lang = (opening["info"].split() or [""])[0].strip("{}.").lower()
        before = next((ln for ln in reversed(lines[:i]) if ln.strip()), "")
        body: list[str] = []
        i += 1
        while i < len(lines) and not re.fullmatch(
                rf" *{re.escape(fence[0])}{{{len(fence)},}}\s*", lines[i]):
            body.append(lines[i][indent:] if lines[i][:indent].isspace() else lines[i])
            i += 1
        found.append(Block(path, i - len(body), lang, "\n".join(body) + "\n",
                           bool(ILLUSTRATION.match(before))))
        i += 1
    return found


def pages() -> list[Path]:
    return [ROOT / "README.md",
            *sorted(p for p in DOCS.rglob("*.md") if "hooks" not in p.parts)]


def commands(block: Block) -> list[str]:
    """The commands of a shell block (``console``: its ``$ `` lines)."""
    text = block.text.replace("\\\n", " ")
    lines = [ln.strip() for ln in text.splitlines()]
    if block.lang == "console":
        return [ln[2:].strip() for ln in lines if ln.startswith("$ ")]
    return [ln for ln in lines if ln and not ln.startswith("#")]


@cache
def ci_commands() -> frozenset[str]:
    """The one-line commands of .ci/run's steps (``step NAME COMMAND…``), normalised."""
    found = set()
    for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines():
        words = line.split()
        if len(words) > 2 and words[0] == "step" and not line.rstrip().endswith("'"):
            found.add(" ".join(words[2:]))
    return frozenset(found)


def shell_kind(block: Block) -> str:
    """``run`` (these tests run it), ``ci`` (a step of .ci/run) or ``none``."""
    cmds = [" ".join(c.split()) for c in commands(block)]
    if not cmds:
        return "none"
    if all(RUNNABLE.match(c) for c in cmds):
        return "run"
    if all(c in ci_commands() for c in cmds):
        return "ci"
    return "none"


def test_every_shell_block_is_run_or_an_illustration() -> None:
    """Every ``bash``/``sh``/``shell``/``console`` block is run (by these tests, or by
    .ci/run word for word) or marked ``<!-- illustration -->`` on the line before it."""
    unmarked = [f"{b.where}: {b.lang} block is neither run nor marked <!-- illustration -->"
                for p in pages() for b in blocks(p)
                if b.lang in SHELL and not b.illustration and shell_kind(b) == "none"]
    if unmarked:
        pytest.fail("\n".join(unmarked), pytrace=False)


def test_the_runnable_shell_blocks_exit_0(capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI's ``--help``/``--version`` commands the pages show, run through the console
    script's own function (``pytest_mlcjit.cli:main``, in-process: no interpreter start)."""
    ran = 0
    for b in (b for p in pages() for b in blocks(p)
              if b.lang in SHELL and not b.illustration and shell_kind(b) == "run"):
        for command in commands(b):
            words = shlex.split(command)
            args = words[3:] if words[0] == "python" else words[1:]
            with pytest.raises(SystemExit) as stop:
                cli.main(args)
            assert stop.value.code in (0, None), f"{b.where}: {command}"
            assert capsys.readouterr().out.strip(), f"{b.where}: {command} printed nothing"
            ran += 1
    assert ran >= 2, "docs/reference/cli.md shows two"


@pytest.mark.parametrize("page", [p for p in pages()
                                  if any(b.lang in PYTHON for b in blocks(p))],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_the_python_blocks_run(page: Path, tmp_path: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A page's Python blocks that are not illustrations run in order in one namespace,
    in a temporary directory with a cache of its own."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("MLC_JIT_CACHE_DIR", str(tmp_path / "cache"))
    namespace: dict[str, Any] = {"__name__": "__docs__"}
    for b in blocks(page):
        if b.lang not in PYTHON or b.illustration:
            continue
        code = compile(b.text, b.where, "exec")
        try:
            exec(code, namespace)
        except Exception as exc:
            pytest.fail(f"{b.where}: the block raised {exc!r} (mark it <!-- illustration --> "
                        "if it is not meant to run)", pytrace=False)


def test_the_block_reader_sees_markers_and_nesting(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("text\n\n<!-- illustration -->\n```bash\nrm -rf /\n```\n\n"
                    "````markdown\n```python\nraise SystemExit\n```\n````\n\n"
                    "- item\n\n    ```console\n    $ pytest-mlcjit --help\n    usage\n    ```\n",
                    encoding="utf-8")
    found = blocks(page)
    assert [(b.lang, b.line, b.illustration) for b in found] == [
        ("bash", 4, True), ("markdown", 8, False), ("console", 16, False)]
    assert commands(found[2]) == ["pytest-mlcjit --help"]
    assert shell_kind(found[2]) == "run"
    assert shell_kind(dataclasses.replace(found[0], illustration=False)) == "none"
