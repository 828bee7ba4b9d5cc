"""Model specs: what a test asks to have compiled.

A spec is immutable, validated on construction, hashable, and knows nothing of how it is
compiled. :class:`TVMModel` names an importable factory and a JSON config; the MLC-LLM
model-directory spec lives in :mod:`pytest_mlcjit.backends.mlc`.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import json
import os
import re
from collections.abc import Mapping
from typing import Any

from .device import TargetJSON, parse_target
from .errors import ConfigError, SpecError
from .key import canonical_json

_FACTORY_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")


def _frozen_json(value: Any, what: str) -> Any:
    """A deep copy of ``value`` that is plain JSON (string keys, no NaN), or SpecError."""
    try:
        return json.loads(canonical_json(value))
    except (TypeError, ValueError) as exc:
        raise SpecError(f"{what} must be JSON-serializable (str keys, no NaN): {exc}") from None


class TVMModel:
    """A Relax model built by an importable factory, compiled with apache-tvm.

    ``factory`` is ``"package.module:function"``. The function is called with ``config`` as
    keyword arguments and returns an ``IRModule``, or a tuple ``(nn.Module, export_spec)``
    for :mod:`tvm.relax.frontend.nn` (its parameters are then initialized deterministically
    from ``seed`` unless the test passes its own).

    ``target`` (a TVM target string or dict, for example ``{"kind": "cuda", "arch": "sm_90"}``)
    makes the spec cross-compile: it is built for that target whatever the test's device,
    so a machine without the GPU can compile (not run) the library. ``opt_level`` is the
    TVM pass-context optimization level.
    """

    backend = "tvm"
    __slots__ = ("_target", "config", "factory", "name", "opt_level", "seed")

    def __init__(
        self,
        factory: str,
        config: Mapping[str, Any] | None = None,
        *,
        target: str | Mapping[str, Any] | None = None,
        opt_level: int = 3,
        seed: int = 0,
        name: str | None = None,
    ) -> None:
        if not isinstance(factory, str) or not _FACTORY_RE.match(factory):
            raise SpecError(
                f"invalid factory {factory!r}: expected 'package.module:function', "
                "for example 'examples.models.mlp:build'"
            )
        if config is None:
            config = {}
        if not isinstance(config, Mapping):
            raise SpecError(
                f"invalid config {config!r} for {factory}: expected a dict of keyword arguments"
            )
        if not all(isinstance(k, str) and k.isidentifier() for k in config):
            bad = [k for k in config if not (isinstance(k, str) and k.isidentifier())]
            raise SpecError(f"invalid config keys {bad!r} for {factory}: keys must be identifiers")
        if isinstance(opt_level, bool) or not isinstance(opt_level, int) or not 0 <= opt_level <= 3:
            raise SpecError(f"invalid opt_level {opt_level!r} for {factory}: expected 0, 1, 2 or 3")
        if name is not None and (not isinstance(name, str) or not name.strip()):
            raise SpecError(f"invalid name {name!r} for {factory}: expected a non-empty string")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise SpecError(f"invalid seed {seed!r} for {factory}: expected an int")
        try:
            parsed_target = None if target is None else parse_target(target)
        except ConfigError as exc:
            raise SpecError(f"{exc} (in the spec for {factory})") from None
        self.factory = factory
        self.config: dict[str, Any] = _frozen_json(dict(config), f"config of {factory}")
        self._target = parsed_target
        self.opt_level = opt_level
        self.seed = seed
        self.name = name or factory.rpartition(":")[0].rpartition(".")[2]

    @property
    def target(self) -> TargetJSON | str | None:
        """The explicit cross-compile target, or None to compile for the test's device."""
        return self._target

    def identity(self) -> dict[str, Any]:
        """The JSON fields that identify this spec (the key adds target and toolchain)."""
        return {
            "factory": self.factory,
            "config": self.config,
            "target": self._target,
            "opt_level": self.opt_level,
            "seed": self.seed,
        }

    @property
    def id(self) -> str:
        """A short, readable pytest id: ``mlp-hidden=128``."""
        parts = [f"{k}={v}" for k, v in sorted(self.config.items())]
        return "-".join([self.name, *parts])

    def __repr__(self) -> str:
        extra = f", target={self._target!r}" if self._target is not None else ""
        return f"TVMModel({self.factory!r}, config={self.config!r}{extra})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TVMModel) and self.identity() == other.identity()

    def __hash__(self) -> int:
        return hash(canonical_json(self.identity()))

    def source_digest(self) -> str:
        """SHA-256 of the factory module's source; SpecError if it cannot be found.

        The module is located with the import system (parent packages are imported, the
        module itself is not) and its source is checked to define the factory name.
        """
        module, _, func = self.factory.partition(":")
        try:
            found = importlib.util.find_spec(module)
        except (ImportError, ValueError) as exc:
            found = None
            cause = f": {type(exc).__name__}: {exc}"
        else:
            cause = ""
        if found is None or not found.origin or not os.path.isfile(found.origin):
            raise SpecError(
                f"cannot import factory module {module!r} for {self!r}{cause}; "
                "is it on sys.path (a module beside the test file, or an installed package)?"
            )
        return _module_digest(found.origin, os.stat(found.origin).st_mtime_ns, func)


@functools.lru_cache(maxsize=256)
def _module_digest(path: str, _mtime_ns: int, func: str) -> str:
    with open(path, "rb") as f:
        source = f.read()
    if path.endswith(".py"):
        try:
            tree = ast.parse(source, filename=path)
        except SyntaxError as exc:
            raise SpecError(f"factory module {path} has a syntax error: {exc}") from None
        if func not in _top_level_names(tree):
            raise SpecError(
                f"factory module {path} defines no top-level name {func!r} "
                f"(it defines: {', '.join(sorted(_top_level_names(tree))) or 'nothing'})"
            )
    return hashlib.sha256(source).hexdigest()


def _top_level_names(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.ImportFrom | ast.Import):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names
