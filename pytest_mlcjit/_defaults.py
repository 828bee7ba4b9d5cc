"""Defaults the plugin needs at start-up, kept apart so reading them imports nothing heavy."""

from __future__ import annotations

import os
from pathlib import Path

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
