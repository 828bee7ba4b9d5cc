"""Model specs: what a test asks to have compiled.

A spec is immutable, validated on construction, hashable, and knows nothing of how it is
compiled. :class:`TVMModel` names an importable factory and a JSON config; the MLC-LLM
model-directory spec lives in :mod:`pytest_mlcjit.backends.mlc`.
"""

from __future__ import annotations

import ast
import contextlib
import contextvars
import functools
import hashlib
import importlib.util
import json
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar, cast

from pytest_mlcjit.device import TargetJSON, parse_target
from pytest_mlcjit.errors import ConfigError, SpecError
from pytest_mlcjit.key import canonical_json

_FACTORY_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")


_JSON_VALUES = "use str, int, float, bool, None, lists and dicts with str keys"


def _json_problem(value: Any, path: str) -> tuple[str, str] | None:  # noqa: PLR0911
    """``(where, what is wrong)`` for the first value in ``value`` that JSON would not carry
    to the factory unchanged (``where`` is a key path such as ``layers[0].width``)."""
    if isinstance(value, str):
        return None if (bad := _surrogate(value)) is None else (path, bad)
    if value is None or isinstance(value, bool | int):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else (
            path, f"{value!r} is not JSON (Out of range float values are not JSON compliant)")
    if isinstance(value, tuple):
        return path, f"a tuple {value!r}"
    if isinstance(value, list):
        for i, item in enumerate(value):
            if (found := _json_problem(item, f"{path}[{i}]")) is not None:
                return found
        return None
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                return path, f"has the non-string key {key!r}"
            if (bad := _surrogate(key)) is not None:
                return path, f"has a key that {bad.removeprefix('the string ')}"
            if (found := _json_problem(item, f"{path}.{key}" if path else key)) is not None:
                return found
        return None
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return path, (f"Object of type {type(value).__name__} is not JSON serializable "
                  f"({shown})")


def _surrogate(text: str) -> str | None:
    """Why ``text`` cannot be encoded as UTF-8 (it holds a lone surrogate such as
    ``"\\ud800"``, which the key's digest could not hash), else None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        shown = text if len(text) <= 40 else text[:37] + "..."
        return (f"the string {shown!r} holds a lone surrogate "
                f"({text[exc.start]!r} at index {exc.start}), which UTF-8 cannot encode")
    return None


def _frozen_json(value: Any, what: str) -> Any:
    """A deep copy of ``value`` that is plain JSON (string keys, no NaN), or a SpecError
    that names the offending key and value. A tuple is refused rather than turned into a
    list silently: the factory would receive a list."""
    if (found := _json_problem(value, "")) is not None:
        where, why = found
        place = f"config key {where!r}" if where else "the config"
        if why.startswith("a tuple "):
            raise SpecError(f"{place} of {what.removeprefix('config of ')} is {why}: the "
                            "config travels to the factory as JSON, where it would become a "
                            "list; write it as a list")
        raise SpecError(f"{what} must be JSON-serializable (str keys, no NaN): {why}, at "
                        f"{place}; {_JSON_VALUES}")
    try:
        return json.loads(canonical_json(value))
    except (TypeError, ValueError) as exc:
        raise SpecError(f"{what} must be JSON-serializable (str keys, no NaN): {exc}; "
                        f"{_JSON_VALUES}") from None


#: True while pytest collects (set by the plugin): a spec that fails validation then does
#: not raise, which would abort the collection of its whole module, but becomes an invalid
#: spec that fails each test requesting it, at setup, with the same error.
_DEFER_ERRORS: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "pytest_mlcjit_defer_spec_errors", default=False)

_Init = TypeVar("_Init", bound=Callable[..., None])


@contextlib.contextmanager
def deferring_spec_errors() -> Iterator[None]:
    """Within this block, a spec constructor's SpecError makes an invalid spec instead."""
    token = _DEFER_ERRORS.set(True)
    try:
        yield
    finally:
        _DEFER_ERRORS.reset(token)


def deferrable(init: _Init) -> _Init:
    """Wrap a spec's ``__init__``: under :func:`deferring_spec_errors`, a SpecError calls
    ``self._become_invalid(error, args)`` instead of propagating."""

    @functools.wraps(init)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> None:
        try:
            init(self, *args, **kwargs)
        except SpecError as exc:
            if not _DEFER_ERRORS.get():
                raise
            self._become_invalid(str(exc), args)

    return cast(_Init, wrapper)


def default_name(factory: str) -> str:
    """A spec's name when it is given none: the factory's module (``mlp`` for
    ``models.mlp:build``), and its function too when that is not ``build`` (``mlp.tiny``
    for ``models.mlp:tiny``), so that two factories of one module are told apart."""
    module, colon, function = factory.rpartition(":")
    if not colon:  # not a factory (refused by the validation that asks for a name)
        return factory
    module = module.rpartition(".")[2]
    return module if function in ("build", "") else f"{module}.{function}"


def is_factory_name(text: str) -> bool:
    """Whether ``text`` has the form of a factory, ``package.module:function``."""
    return bool(_FACTORY_RE.match(text))


class TVMModel:
    """A Relax model built by an importable factory, compiled with apache-tvm.

    ``factory`` is ``"package.module:function"``. The function is called with ``config`` as
    keyword arguments and returns an ``IRModule``, or a tuple ``(nn.Module, export_spec)``
    for :mod:`tvm.relax.frontend.nn` (its parameters are then initialized deterministically
    from ``seed`` unless the test passes its own).

    ``files`` names input files the compile reads that Python cannot see being opened (for
    example weights read by C code): glob patterns relative to the factory module's
    directory (``["weights/*.npy"]``); their content is part of the key. Files the factory
    opens from Python, and local modules it imports, are recorded by the compile itself.

    ``target`` (a TVM target string or dict, for example ``{"kind": "cuda", "arch": "sm_90"}``)
    makes the spec cross-compile: it is built for that target whatever the test's device,
    so a machine without the GPU can compile (not run) the library. ``opt_level`` is the
    TVM pass-context optimization level.
    """

    backend = "tvm"
    __slots__ = ("_error", "_target", "config", "factory", "files", "name", "opt_level", "seed")

    @deferrable
    def __init__(
        self,
        factory: str,
        config: Mapping[str, Any] | None = None,
        *,
        target: str | Mapping[str, Any] | None = None,
        opt_level: int = 3,
        seed: int = 0,
        name: str | None = None,
        files: Sequence[str] = (),
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
        if isinstance(files, str) or not all(isinstance(f, str) and f.strip() for f in files):
            raise SpecError(f"invalid files {files!r} for {factory}: expected a list of glob "
                            "patterns relative to the factory module, for example "
                            "['weights/*.npy']")
        try:
            parsed_target = None if target is None else parse_target(target)
        except ConfigError as exc:
            raise SpecError(f"{exc} (in the spec for {factory})") from None
        for what, value in (("name", name), ("target", parsed_target), ("files", list(files))):
            if (found := _json_problem(value, "")) is not None:
                raise SpecError(f"invalid {what} {value!r} for {factory}: {found[1]}; it must "
                                "be encodable as UTF-8")
        self.factory = factory
        self.config: dict[str, Any] = _frozen_json(dict(config), f"config of {factory}")
        self._target = parsed_target
        self.opt_level = opt_level
        self.seed = seed
        self.files: tuple[str, ...] = tuple(files)
        self.name = name or default_name(factory)
        self._error: str | None = None

    def _become_invalid(self, error: str, args: tuple[Any, ...]) -> None:
        """Made during collection with a bad field: every use raises ``error``."""
        factory = args[0] if args and isinstance(args[0], str) else "?:?"
        self.factory, self.config, self._target = factory, {}, None
        self.opt_level, self.seed, self.files = 3, 0, ()
        self.name = default_name(factory) or "TVMModel"
        self._error = error

    @property
    def error(self) -> str | None:
        """Why this spec is invalid (it was made while pytest collected, where a bad spec
        fails the tests that request it instead of the collection), else None."""
        return self._error

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
            "files": list(self.files),
            **({"invalid": self._error} if self._error else {}),
        }

    @property
    def id(self) -> str:
        """A short, readable pytest id: ``mlp-hidden=128``."""
        if self._error:
            return f"{self.name}-invalid"
        parts = [f"{k}={v}" for k, v in sorted(self.config.items())]
        return "-".join([self.name, *parts])

    def __repr__(self) -> str:
        if self._error:
            return f"TVMModel({self.factory!r}, <invalid: {self._error}>)"
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
        if self._error:
            raise SpecError(self._error)
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
