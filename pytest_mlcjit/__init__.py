"""pytest-mlcjit: compile TVM / MLC-LLM model libraries once, just in time, into a cache
shared by every pytest-xdist worker, every later run and every CI job.

Importing this package is cheap: the names below are imported on first use (PEP 562), so
loading the pytest plugin costs a few modules, and TVM and numpy are imported only when
a library is compiled, loaded or run.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    CacheMissError,
    CompileError,
    ConfigError,
    CorruptEntryError,
    InputError,
    JitDisabledError,
    LockTimeoutError,
    MlcJitError,
    SpecError,
    UntrustedCacheError,
)

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .device import Device
    from .engine import JIT, Stats, jit
    from .layout import default_cache_dir
    from .model import ArgSpec, CompiledModel, Shape, Signature
    from .policy import Policy
    from .settings import Settings
    from .spec import TVMModel

#: Public name -> the module that defines it, imported when the name is first read.
_LAZY = {
    "Device": "device",
    "JIT": "engine",
    "Settings": "settings",
    "Stats": "engine",
    "jit": "engine",
    "CompiledModel": "model",
    "ArgSpec": "model",
    "Shape": "model",
    "Signature": "model",
    "Policy": "policy",
    "TVMModel": "spec",
    "default_cache_dir": "layout",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "JIT",
    "ArgSpec",
    "CacheMissError",
    "CompileError",
    "CompiledModel",
    "ConfigError",
    "CorruptEntryError",
    "Device",
    "InputError",
    "JitDisabledError",
    "LockTimeoutError",
    "MlcJitError",
    "Policy",
    "Settings",
    "Shape",
    "Signature",
    "SpecError",
    "Stats",
    "TVMModel",
    "UntrustedCacheError",
    "__version__",
    "default_cache_dir",
    "jit",
]
