"""The engine: a request's policy, its cache and its backend together → a compiled library.

* :mod:`.jit`: :class:`~.jit.JIT`, the protocol (lookup → lock → look again → fetch or
  build → publish) and :func:`~.jit.jit` for plain Python;
* :mod:`.settings`: :class:`~.settings.Settings`, the option table;
* :mod:`.stats`: the accounting of a run; :mod:`.activity`: the jobs a run announces;
* :mod:`.schedule`: the compile order; :mod:`.failures`: what a failed compile says;
* :mod:`.model`: :class:`~.model.CompiledModel`, what a test receives.

No pytest here; importing this package imports none of its modules (its main names are
imported on first use).
"""

from __future__ import annotations

import importlib
from typing import Any

#: The engine's names, imported on first use (PEP 562), so that importing this package
#: stays free: ``from pytest_mlcjit.engine import JIT`` works as ``pytest_mlcjit.JIT`` does.
_LAZY = {"JIT": "jit", "jit": "jit", "Stats": "stats", "OUTCOMES": "stats",
         "Settings": "settings", "CompiledModel": "model"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
