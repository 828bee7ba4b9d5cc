"""Defaults the plugin needs at start-up, kept apart so reading them imports nothing heavy."""

from __future__ import annotations

import os
from pathlib import Path

#: The environment variable that names the cache root.
ENV_CACHE_DIR = "MLC_JIT_CACHE_DIR"
#: The limit for one compilation, in seconds (``--mlc-jit-timeout``).
DEFAULT_COMPILE_TIMEOUT_S = 1800.0


def _cache_base() -> str:
    return os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/pytest-mlcjit``, else ``~/.cache/pytest-mlcjit``."""
    return Path(_cache_base()) / "pytest-mlcjit"


def mlc_llm_home() -> Path:
    """``$MLC_LLM_HOME``, else ``$XDG_CACHE_HOME/mlc_llm``, else ``~/.cache/mlc_llm``."""
    if home := os.environ.get("MLC_LLM_HOME"):
        return Path(home).expanduser()
    return Path(_cache_base()) / "mlc_llm"


def default_roots(cache_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """The roots the plugin uses: ``cache_dir`` if given, else ``$MLC_JIT_CACHE_DIR``, else
    the default TVM cache and MLC-LLM's home (where MLC entries live by default)."""
    if cache_dir:
        return [Path(cache_dir).expanduser().absolute()]
    if env := os.environ.get(ENV_CACHE_DIR):
        return [Path(env).expanduser().absolute()]
    roots = [default_cache_dir().absolute(), mlc_llm_home().absolute()]
    return list(dict.fromkeys(roots))
