"""Compile backends. Each turns a spec and a device into a plain-data :class:`BuildRequest`
and knows where its entries live and how to compile one in a child process; they know
nothing of pytest, locking or policies (:mod:`pytest_mlcjit.engine` drives them).

To add a backend: subclass :class:`Backend` in a module of this package, give the spec
class a ``backend`` attribute naming it, and add the name to :data:`REGISTRY`.
"""

from __future__ import annotations

from pytest_mlcjit.compiler.backends.base import (
    Backend,
    BuildContext,
    BuildRequest,
    backend_for,
    get_backend,
    locate,
)

__all__ = ["Backend", "BuildContext", "BuildRequest", "backend_for", "get_backend", "locate"]
