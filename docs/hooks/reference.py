"""The generated reference: a mkdocs hook (``hooks:`` in mkdocs.yml).

A page asks for a generated section with a comment of its own line,
``<!-- generated: NAME -->``, and the hook puts the Markdown that :data:`SECTIONS` makes
for NAME in its place when the site is built. The sources are the code itself, so the
reference cannot drift from it:

- ``options``: the option table (:func:`pytest_mlcjit.engine.settings.rows`): every
  command-line flag, ini key and environment variable, env-only rows included;
- ``cli``: the parser of the ``pytest-mlcjit`` command (:func:`pytest_mlcjit.cli.build_parser`),
  every subcommand and its options, recursively;
- ``markers``: the markers the plugin registers (``pytest_mlcjit.plugin.MARKERS``);
- ``fixtures``: the fixtures the plugin defines, with their docstrings.

``tests/test_docs.py`` renders these in-process (no build) and checks that every row,
subcommand, marker and fixture is in them.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import inspect
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError

from pytest_mlcjit import plugin
from pytest_mlcjit.cli import build_parser
from pytest_mlcjit.engine import settings

#: ``<!-- generated: NAME -->`` on a line of its own.
MARKER = re.compile(r"^<!--\s*generated:\s*([a-z-]+)\s*-->[ \t]*$", re.MULTILINE)

#: The pages that must ask for a generated section (a page rewritten without its marker
#: would otherwise silently stop being generated).
REQUIRED = {"reference/options.md": "options", "reference/cli.md": "cli",
            "reference/api.md": "markers"}

_CLI_WIDTH = 88


def _cell(text: str) -> str:
    """Text for a Markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")


def _code(text: str) -> str:
    return f"`{text}`"


def _default(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, tuple):
        return ", ".join(map(str, value)) if value else "none"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _anchor(name: str) -> str:
    return name.replace("_", "-")


# -- the option table ---------------------------------------------------------------------------
def options_markdown() -> str:
    """Every row of the option table: a summary table, then a section per row."""
    defaults = {f.name: f.default for f in dataclasses.fields(settings.Settings)}
    lines = ["| Option | ini key | Environment variable | Default |",
             "| --- | --- | --- | --- |"]
    sections: list[str] = []
    for name, row in settings.rows():
        envs = [v for v in (row.env, row.env_fallback[0] if row.env_fallback else None) if v]
        first = row.flag or row.ini or envs[0]
        link = f"[{_code(first)}](#{_anchor(name)})"
        lines.append(" | ".join((
            f"| {link}" if row.flag else f"| {link} (no flag)",
            _code(row.ini) if row.ini else "",
            ", ".join(map(_code, envs)),
            f"{_code(_default(defaults[name]))} |")))
        usage = row.flag or ""
        if row.flag and row.kind != "switch":
            usage += f" {row.metavar or 'VALUE'}"
        where = []
        if row.flag:
            where.append(f"Command line: {_code(usage)}" +
                         (" (a switch)" if row.kind == "switch" else ""))
        if row.ini:
            ini = f"ini key: {_code(row.ini)}"
            if row.ini_help:
                ini += f" ({_cell(row.ini_help)})"
            if row.kind == "path":
                ini += ", relative to the ini file"
            where.append(ini)
        if row.env:
            where.append(f"Environment: {_code(row.env)}")
        if row.env_fallback:
            where.append(f"Environment, read after the one above: {_code(row.env_fallback[0])}")
        if not row.workers:
            where.append("Read by the controller only (xdist workers do not receive it)")
        where.append(f"Default: {_code(_default(defaults[name]))}")
        sections += [f"### {_code(first)} {{#{_anchor(name)}}}", "",
                     _cell(row.help), "", *(f"- {w}" for w in where), ""]
    return "\n".join([*lines, "", *sections])


# -- the command line ---------------------------------------------------------------------------
def _usage(parser: argparse.ArgumentParser) -> str:
    formatter = argparse.HelpFormatter(parser.prog, width=_CLI_WIDTH)
    formatter.add_usage(parser.usage, parser._actions,
                        parser._mutually_exclusive_groups)
    return formatter.format_help().strip()


def _help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    if not action.help:
        return ""
    params = {**vars(action), "prog": parser.prog}
    try:
        return action.help % params
    except (KeyError, TypeError, ValueError):
        return action.help


def _commands(parser: argparse.ArgumentParser
              ) -> Iterator[tuple[argparse.ArgumentParser, str]]:
    """``parser`` and every subcommand's parser below it, with its one-line help."""
    yield parser, parser.description or ""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, sub in action.choices.items():
                for child, text in _commands(sub):
                    yield child, text if child is not sub else (helps.get(name) or text)


def cli_commands() -> list[str]:
    """Every command's full name: ``pytest-mlcjit``, ``pytest-mlcjit remote ls``…"""
    return [p.prog for p, _ in _commands(build_parser())]


def cli_markdown() -> str:
    """Every command of the ``pytest-mlcjit`` parser: usage, description, options."""
    out: list[str] = []
    for parser, text in _commands(build_parser()):
        depth = min(parser.prog.count(" ") + 1, 4)
        out += [f"{'#' * (depth + 1)} {_code(parser.prog)}", ""]
        if text:
            out += [_cell(text), ""]
        out += ["```text", _usage(parser), "```", ""]
        rows = []
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for choice in action._choices_actions:
                    rows.append((_code(f"{parser.prog} {choice.dest}"), choice.help or ""))
                continue
            names = ", ".join(action.option_strings) or (action.metavar or action.dest)
            takes = action.nargs != 0 and action.option_strings
            metavar = action.metavar or (action.dest.upper() if takes else None)
            shown = f"{names} {metavar}" if takes and metavar else str(names)
            rows.append((_code(str(shown)), _help(parser, action)))
        if rows:
            out += ["| Argument | What it does |", "| --- | --- |"]
            out += [f"| {name} | {_cell(help_)} |" for name, help_ in rows]
            out.append("")
    return "\n".join(out)


# -- markers and fixtures -----------------------------------------------------------------------
def markers() -> list[tuple[str, str]]:
    """``(signature, description)`` of every marker the plugin registers."""
    return [(m.split(":", 1)[0].strip(), m.split(":", 1)[1].strip()) for m in plugin.MARKERS]


def markers_markdown() -> str:
    return "\n".join(f"### {_code('@pytest.mark.' + sig)}\n\n{_cell(text)}\n"
                     for sig, text in markers())


def fixtures() -> list[tuple[str, str, str]]:
    """``(name, scope, docstring)`` of every fixture the plugin defines."""
    found = []
    for name, value in vars(plugin).items():
        if type(value).__name__ != "FixtureFunctionDefinition":
            continue
        marker = getattr(value, "_fixture_function_marker", None)
        scope = getattr(marker, "scope", "function")
        unwrap = getattr(value, "_get_wrapped_function", None)
        function = unwrap() if unwrap is not None else value
        found.append((name, str(scope), inspect.getdoc(function) or ""))
    return found


def fixtures_markdown() -> str:
    out = []
    for name, scope, doc in fixtures():
        text = re.sub(r":\w+:`~?\.?([^`]+)`", r"`\1`", doc).replace("``", "`")
        out += [f"### {_code(name)}", "", f"Scope: {scope}.", "", _cell(text), ""]
    return "\n".join(out)


#: NAME of ``<!-- generated: NAME -->`` -> what makes its Markdown.
SECTIONS: dict[str, Callable[[], str]] = {
    "options": options_markdown,
    "cli": cli_markdown,
    "markers": markers_markdown,
    "fixtures": fixtures_markdown,
}


def expand(markdown: str, where: str) -> str:
    """``markdown`` with each ``<!-- generated: NAME -->`` replaced by its section."""

    def one(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in SECTIONS:
            raise ValueError(f"{where}: no generated section {name!r} (known: "
                             f"{', '.join(SECTIONS)})")
        return SECTIONS[name]()

    return MARKER.sub(one, markdown)


# -- the mkdocs hook ----------------------------------------------------------------------------
#: A Sphinx role left in a docstring as mkdocstrings renders it: ``:class:<code>X</code>``.
_ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj|const):(?=<code>)")


def on_page_content(html: str, page: Any, config: Any, files: Any) -> str:
    """The docstrings' Sphinx roles (``:class:`X```) shown as the code they name."""
    return _ROLE.sub("", html)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    src = Path(page.file.src_uri).as_posix()
    wanted = REQUIRED.get(src)
    names = MARKER.findall(markdown)
    if wanted is not None and wanted not in names:
        raise PluginError(f"{src} must contain <!-- generated: {wanted} --> (docs/hooks/)")
    try:
        return expand(markdown, src)
    except ValueError as exc:
        raise PluginError(str(exc)) from None
