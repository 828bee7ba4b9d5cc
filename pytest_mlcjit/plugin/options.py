"""pytest's side of the option table (:mod:`pytest_mlcjit.engine.settings`): the command-line
options and ini keys, declared from its rows, and resolved once, at configure, into the
run's :class:`Settings` (command line > environment > ini > default). The xdist controller
sends the resolved settings to its workers, which never resolve anything themselves.

Nothing here names an option: a new one is a row of the table.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest

from pytest_mlcjit.engine.settings import Option, Settings, resolve, rows
from pytest_mlcjit.errors import ConfigError, argparse_type

GROUP = ("mlcjit", "pytest-mlcjit: just-in-time compiled model libraries")


def add_options(parser: pytest.Parser) -> None:
    """Every row with a flag as an option of the ``mlcjit`` group; every row with an ini
    key as a string ini value, parsed by the row (so that a bad value's error names the
    key, the value and the valid ones, which pytest's own ``bool`` type does not)."""
    group = parser.getgroup(*GROUP)
    for _name, row in rows():
        if row.flag is not None:
            if row.kind == "switch":
                group.addoption(row.flag, dest=row.dest, action="store_true", default=None,
                                help=row.help)
            else:
                group.addoption(row.flag, dest=row.dest, metavar=row.metavar, default=None,
                                type=argparse_type(functools.partial(row.parse, row.flag)),
                                help=row.help)
        if row.ini is not None:  # parsed by the row: its errors name the key and the values
            parser.addini(row.ini, row.ini_help or row.help, type="string", default=None)


def _from_cli(config: pytest.Config, name: str, row: Option) -> tuple[Any, str] | None:
    if row.flag is None:
        return None
    value = getattr(config.option, row.dest, None)
    if value is None or (row.kind == "switch" and not value):
        return None
    return value, row.flag if row.kind == "switch" else f"{row.flag}={value}"


def _from_ini(config: pytest.Config, name: str, row: Option) -> tuple[Any, str] | None:
    if row.ini is None:
        return None
    try:
        value = config.getini(row.ini)
    except ValueError as exc:  # a typed value pytest could not read
        raise ConfigError(f"invalid ini {row.ini}: {exc}") from None
    if value in ("", None):
        return None
    text = str(value)
    if row.kind == "path":  # relative to the ini file
        base = config.inipath.parent if config.inipath else config.rootpath
        text = str(base / Path(text).expanduser())
    return text, f"ini {row.ini}"


def resolve_settings(config: pytest.Config) -> Settings:
    """Every option, command line > environment > ini > default; bad values raise
    ConfigError naming their source. The devices are not probed yet."""
    values, origins = resolve(cli=functools.partial(_from_cli, config),
                              ini=functools.partial(_from_ini, config))
    return Settings(**values, origins=origins)
