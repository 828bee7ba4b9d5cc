"""Inputs the filesystem or UTF-8 cannot carry are refused up front, with an error that
names them and the fix, instead of failing after a compile (a path too long for the
filesystem) or on every request (a config string that cannot be encoded)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from conftest import Engine, Project
from pytest_mlcjit import SpecError, TVMModel
from pytest_mlcjit.cache.layout import PATH_ROOM_WRITE
from pytest_mlcjit.cache.store.local import LocalStore
from pytest_mlcjit.errors import ConfigError

PATH_LENGTH = 4000


def _long_path(base: Path, length: int) -> Path:
    """A path of ``length`` characters under ``base``, in components of 200 characters
    (each below NAME_MAX), not created."""
    path = str(base)
    while len(path) < length:
        path += "/" + "d" * min(200, length - len(path) - 1)
    assert len(path) == length
    return Path(path)


def test_a_cache_path_too_long_is_refused_before_compiling(engine: Engine,
                                                          project: Project) -> None:
    """A 4,000-character cache path: every request fails at once with a ConfigError that
    names the length, the limit and the option to change, and compiles nothing, however
    often it is asked. Before, it compiled fully, then failed at publish with a bare
    ``OSError: File name too long``, and was not remembered, so every attempt recompiled."""
    project.cache = _long_path(project.pytester.path, PATH_LENGTH)
    first, second = engine.run([{"hidden": 4}, {"hidden": 4}])
    for result in (first, second):
        assert result["error"] == "ConfigError", result
        message = result["message"]
        assert f"is {PATH_LENGTH} bytes long, too long for a cache" in message, message
        assert "PATH_MAX" in message, message
        assert "--mlc-jit-cache-dir" in message, message
    assert project.compiles() == [], "nothing was compiled"


def test_the_longest_cache_path_that_fits_is_accepted(tmp_path: Path) -> None:
    """The limit is the filesystem's (PATH_MAX) less what the cache writes below its root;
    one byte less than the limit works, and so does reading (READONLY) at the limit."""
    fits = _long_path(tmp_path, 4095 - 1 - PATH_ROOM_WRITE)
    LocalStore(fits).open_for_writing()
    assert (fits / ".mlcjit" / "locks").is_dir()
    with pytest.raises(ConfigError, match="too long for a cache"):
        LocalStore(_long_path(tmp_path, 4096 - 1 - PATH_ROOM_WRITE)).open_for_writing()
    LocalStore(_long_path(tmp_path, 4096 - 1 - PATH_ROOM_WRITE))


@pytest.mark.parametrize("where", [
    {"config": {"text": "\ud800"}},
    {"config": {"nested": {"deeper": ["ok", "a\udfffb"]}}},
    {"config": {"mapping": {"\ud83d": 1}}},
    {"name": "model\ud800"},
    {"target": {"kind": "llvm", "mcpu": "\udc80"}},
], ids=["config", "nested", "key", "name", "target"])
def test_a_lone_surrogate_is_a_spec_error(where: dict[str, Any]) -> None:
    """A string Python holds but UTF-8 cannot encode (a lone surrogate such as "\\ud800",
    from a bad decode): a SpecError when the spec is made, naming the string. Before, the
    spec was accepted and every request failed with UnicodeEncodeError from the key's
    digest."""
    with pytest.raises(SpecError, match=r"holds a lone surrogate \('\\u[0-9a-f]{4}' at index"):
        TVMModel("tinymodel:build", **where)
