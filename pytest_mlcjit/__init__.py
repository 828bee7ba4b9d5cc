"""pytest-mlcjit: compile TVM / MLC-LLM model libraries once, just in time, into a cache
shared by every pytest-xdist worker, every later run and every CI job.

Importing this package is cheap: TVM and numpy are imported only when a library is
compiled, loaded or run.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .device import Device
from .errors import (
    CacheMissError,
    CompileError,
    ConfigError,
    CorruptEntryError,
    JitDisabledError,
    LockTimeoutError,
    MlcJitError,
    SpecError,
    UntrustedCacheError,
)
from .jit import JIT, Settings, Stats, default_cache_dir, jit
from .model import CompiledModel
from .policy import Policy
from .spec import TVMModel

__all__ = [
    "JIT",
    "CacheMissError",
    "CompileError",
    "CompiledModel",
    "ConfigError",
    "CorruptEntryError",
    "Device",
    "JitDisabledError",
    "LockTimeoutError",
    "MlcJitError",
    "Policy",
    "Settings",
    "SpecError",
    "Stats",
    "TVMModel",
    "UntrustedCacheError",
    "__version__",
    "default_cache_dir",
    "jit",
]
