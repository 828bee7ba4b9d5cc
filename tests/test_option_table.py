"""The option table (``pytest_mlcjit/engine/settings.py``) is the one place an option is
declared: its rows are unique, every row has help (the generated options reference of the
docs site is made from it: tests/test_docs.py checks that page), and each row becomes a
pytest option, an ini key and a setting a worker receives."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pytest_mlcjit.engine import settings
from pytest_mlcjit.engine.settings import Settings
from pytest_mlcjit.policy import Policy


def test_no_two_rows_share_a_flag_an_ini_key_or_a_variable() -> None:
    settings.check_rows()
    assert len(settings.rows()) >= 20


@pytest.mark.parametrize(("name", "row"), settings.rows(), ids=[n for n, _ in settings.rows()])
def test_every_row_has_help(name: str, row: settings.Option) -> None:
    assert row.help.strip(), f"{name} has no help"
    assert any(key is not None for key in (row.flag, row.ini, row.env)), (
        f"{name} can be set neither by a flag, an ini key nor a variable")


def test_every_row_is_an_option_an_ini_key_and_reaches_workers(
        pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_inprocess("--help")
    out = result.stdout.str()
    for name, row in settings.rows():
        for key in (row.flag, row.ini):
            if key is not None:
                assert key in out, f"{name}: {key} is not in pytest --help"
    sent = Settings().to_json(workers=True)
    for field in dataclasses.fields(Settings):
        option = field.metadata.get("option")
        assert (field.name in sent) == (option is None or option.workers), field.name
    chosen = Settings(policy=Policy.REDO, cache_dir=Path("/x"), shard=(2, 4),
                      devices=("cpu",), compile_timeout=5.0)
    assert Settings.from_json(chosen.to_json()) == chosen, "what a worker gets is the same"
