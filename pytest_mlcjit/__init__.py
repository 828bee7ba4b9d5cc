"""pytest-mlcjit: compile TVM / MLC-LLM model libraries once, just in time, into a cache
shared by every pytest-xdist worker, every later run and every CI job.

Importing this package is cheap: the names below are imported on first use (PEP 562), so
loading the pytest plugin costs a few modules, and TVM and numpy are imported only when
a library is compiled, loaded or run.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from pytest_mlcjit._version import __version__
from pytest_mlcjit.errors import (
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

if TYPE_CHECKING:
    from pytest_mlcjit.cache.layout import default_cache_dir
    from pytest_mlcjit.compiler.backends.mlc import MLCModel
    from pytest_mlcjit.device import Device
    from pytest_mlcjit.device.gpu_lock import gpu_lock
    from pytest_mlcjit.engine.jit import JIT, jit
    from pytest_mlcjit.engine.model import ArgSpec, CompiledModel, Shape, Signature
    from pytest_mlcjit.engine.settings import Settings
    from pytest_mlcjit.engine.stats import Stats
    from pytest_mlcjit.policy import Policy
    from pytest_mlcjit.spec import TVMModel

#: Public name -> the module that defines it, imported when the name is first read.
_LAZY = {
    "Device": "device",
    "JIT": "engine.jit",
    "Settings": "engine.settings",
    "Stats": "engine.stats",
    "jit": "engine.jit",
    "CompiledModel": "engine.model",
    "ArgSpec": "engine.model",
    "Shape": "engine.model",
    "Signature": "engine.model",
    "Policy": "policy",
    "TVMModel": "spec",
    "MLCModel": "compiler.backends.mlc",
    "default_cache_dir": "cache.layout",
    "gpu_lock": "device.gpu_lock",
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
    "MLCModel",
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
    "gpu_lock",
    "jit",
]
