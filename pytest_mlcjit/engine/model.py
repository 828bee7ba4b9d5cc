"""What a test receives: a compiled library, where it came from, and how to run it."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, overload

from pytest_mlcjit.cache.manifest import Manifest, ParamSpec
from pytest_mlcjit.device import Device
from pytest_mlcjit.errors import InputError, MlcJitError


def init_params(specs: list[ParamSpec], seed: int) -> dict[str, Any]:
    """Deterministic parameters: each one seeded by (``seed``, its name), so adding a
    parameter never changes the others. Floats are uniform in ±1/sqrt(last dim), like
    PyTorch's Linear; integers are zeros."""
    import numpy as np

    out: dict[str, Any] = {}
    for spec in specs:
        name, dtype = spec["name"], spec["dtype"]
        shape = tuple(d for d in spec["shape"] if isinstance(d, int))
        if len(shape) != len(spec["shape"]):
            raise MlcJitError(
                f"parameter {name!r} has the symbolic shape {list(spec['shape'])}, so it gets "
                "no default value: assign compiled_model.params (numpy arrays by name) "
                "yourself")
        sub = int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")
        rng = np.random.default_rng(sub)
        if np.dtype(dtype).kind == "f" or dtype in ("bfloat16", "float16"):
            bound = 1.0 / float(np.sqrt(shape[-1])) if shape and shape[-1] else 1.0
            value = rng.uniform(-bound, bound, size=shape).astype("float32")
            out[name] = value.astype(dtype) if dtype != "bfloat16" else value
        else:
            out[name] = np.zeros(shape, dtype=dtype)
    return out


class Shape(Sequence[int]):
    """What a function returning ``R.Shape`` gives back: its dims as ints. Not a tuple, so
    it is never mistaken for a multi-output result (a ``tuple`` of arrays); it compares
    equal to a tuple or list of the same ints (``out == (2, 8)``)."""

    __slots__ = ("dims",)

    def __init__(self, dims: Iterable[int]) -> None:
        self.dims: tuple[int, ...] = tuple(int(d) for d in dims)

    @overload
    def __getitem__(self, index: int) -> int: ...
    @overload
    def __getitem__(self, index: slice) -> tuple[int, ...]: ...
    def __getitem__(self, index: int | slice) -> int | tuple[int, ...]:
        return self.dims[index]

    def __len__(self) -> int:
        return len(self.dims)

    def __iter__(self) -> Iterator[int]:
        return iter(self.dims)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Shape):
            return self.dims == other.dims
        if isinstance(other, tuple | list):
            return self.dims == tuple(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.dims)

    def __repr__(self) -> str:
        return f"Shape({', '.join(map(str, self.dims))})"


@dataclasses.dataclass(frozen=True)
class ArgSpec:
    """One argument of a compiled function, as recorded at compile time: its ``name``, its
    ``kind`` (``tensor``, ``shape``, ``prim``, ``tuple`` or ``object``), its ``shape`` (ints,
    and symbolic dims by name such as ``"n"``; None if unknown) and ``dtype``."""

    name: str
    kind: str = "tensor"
    shape: tuple[int | str, ...] | None = None
    dtype: str | None = None
    ndim: int = -1

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ArgSpec:
        shape = data.get("shape")
        ndim = data.get("ndim")
        return cls(name=str(data.get("name", "")), kind=str(data.get("kind", "object")),
                   shape=None if shape is None else tuple(shape), dtype=data.get("dtype"),
                   ndim=ndim if isinstance(ndim, int) else (-1 if shape is None
                                                            else len(shape)))

    def type_text(self) -> str:
        """``float32[n, 8]``, ``Shape[2]``, ``int64``…"""
        if self.kind == "tensor":
            dims = ("?" if self.ndim < 0 else ", ".join(["?"] * self.ndim)) \
                if self.shape is None else ", ".join(map(str, self.shape))
            return f"{self.dtype or '?'}[{dims}]"
        if self.kind == "shape":
            dims = "?" if self.shape is None else ", ".join(map(str, self.shape))
            return f"Shape[{dims}]"
        if self.kind == "prim":
            return str(self.dtype)
        return self.kind

    def __str__(self) -> str:
        return f"{self.name}: {self.type_text()}" if self.name else self.type_text()


@dataclasses.dataclass(frozen=True)
class Signature:
    """A compiled function's ``inputs`` (what ``run`` takes, by position or by name) and
    its ``params`` (the model parameters ``run`` appends from :attr:`CompiledModel.params`),
    recorded from the Relax function at compile time, and its ``output``."""

    function: str
    inputs: tuple[ArgSpec, ...]
    params: tuple[ArgSpec, ...] = ()
    output: ArgSpec | None = None

    @classmethod
    def from_json(cls, function: str, data: Mapping[str, Any]) -> Signature:
        output = data.get("output")
        return cls(function=function,
                   inputs=tuple(ArgSpec.from_json(a) for a in data.get("inputs", ())),
                   params=tuple(ArgSpec.from_json(a) for a in data.get("params", ())),
                   output=None if output is None else ArgSpec.from_json(output))

    @property
    def input_names(self) -> list[str]:
        return [a.name for a in self.inputs]

    def __str__(self) -> str:
        text = f"{self.function}({', '.join(map(str, self.inputs))})"
        if self.params:
            n = len(self.params)
            text += f" + {n} parameter{'s' if n != 1 else ''} from params"
        return text


def _given_text(value: Any) -> str:
    shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
    if shape is not None and dtype is not None:
        return f"{dtype}[{', '.join(str(int(d)) for d in shape)}]"
    return type(value).__name__


@dataclasses.dataclass
class CompiledModel:
    """A library compiled (or found) for one spec on one device.

    ``path`` is the shared-library file in the cache, ``key`` the full key dict, ``digest``
    its SHA-256 (MD5 for MLC-compatible entries), ``hit`` whether it came from the cache
    without compiling in this request, ``compile_seconds`` how long its compile took
    (whenever it was compiled), and ``manifest`` the entry's manifest.
    """

    spec: Any
    device: Device
    path: Path
    key: dict[str, Any]
    digest: str
    hit: bool
    compile_seconds: float
    manifest: Manifest
    loadable: bool = True
    _vm: Any = dataclasses.field(default=None, repr=False)
    _params: dict[str, Any] | None = dataclasses.field(default=None, repr=False)
    _signatures: dict[str, Signature] | None = dataclasses.field(default=None, repr=False)

    @property
    def target(self) -> Any:
        """The target the library was compiled for (JSON form)."""
        return self.key.get("target")

    @property
    def model_path(self) -> Path | None:
        """The MLC model directory (for ``MLCEngine(model_path, model_lib=path)``)."""
        model_dir = getattr(self.spec, "model_dir", None)
        return Path(model_dir) if model_dir is not None else None

    @property
    def system_lib_prefix(self) -> str | None:
        """The system-lib prefix an MLC packaging target was built with, if any."""
        prefix = self.manifest.get("system_lib_prefix")
        return str(prefix) if prefix else None

    @property
    def param_specs(self) -> list[ParamSpec]:
        """``[{"name", "shape", "dtype"}]`` of the model's parameters, in call order."""
        return list(self.manifest.get("params", []))

    @property
    def params(self) -> dict[str, Any]:
        """The parameters ``run`` passes (numpy arrays by name): seeded defaults, or yours."""
        if self._params is None:
            self._params = init_params(self.param_specs, getattr(self.spec, "seed", 0))
        return self._params

    @params.setter
    def params(self, value: Mapping[str, Any]) -> None:
        names = [p["name"] for p in self.param_specs]
        missing = [n for n in names if n not in value]
        unknown = [n for n in value if n not in names]
        if missing or unknown:
            raise MlcJitError(f"params must have exactly {names}; missing {missing}, "
                              f"unknown {unknown}")
        self._params = dict(value)

    def tvm_device(self) -> Any:
        import tvm

        return tvm.runtime.device(self.device.kind, self.device.index)

    def load(self) -> Any:
        """Load the library into a Relax VM on this model's device (cached per object)."""
        if self._vm is None:
            if not self.loadable:
                raise MlcJitError(
                    f"{self.path} was cross-compiled for {self.target} and cannot be loaded "
                    f"here: device {self.device} is not present, or the target is a "
                    "packaging target (iphone, macabi, android) that no device here runs"
                )
            import tvm
            from tvm import relax

            lib = tvm.runtime.load_module(str(self.path))
            self._vm = relax.VirtualMachine(lib, self.tvm_device())
        return self._vm

    # -- signatures ----------------------------------------------------------------------
    def _recorded_signatures(self) -> dict[str, Signature] | None:
        if self._signatures is None:
            raw = self.manifest.get("signatures")
            if not isinstance(raw, Mapping):
                return None
            self._signatures = {name: Signature.from_json(name, sig)
                                for name, sig in sorted(raw.items())}
        return self._signatures

    def _function_names(self) -> list[str]:
        sigs = self._recorded_signatures()
        if sigs is not None:
            return list(sigs)
        functions = self.manifest.get("functions")
        return [str(f) for f in functions] if isinstance(functions, list) else []

    def _unknown_function(self, function: str) -> InputError:
        sigs = self._recorded_signatures()
        listed = [str(s) for s in sigs.values()] if sigs is not None else self._function_names()
        return InputError(
            f"the library of {self.spec!r} has no function {function!r}; its functions: "
            + ("; ".join(listed) if listed else "none recorded"))

    @overload
    def signature(self, function: None = None) -> dict[str, Signature]: ...
    @overload
    def signature(self, function: str) -> Signature: ...
    def signature(self, function: str | None = None) -> Signature | dict[str, Signature]:
        """What ``function`` takes: its inputs' names, shapes (symbolic dims by name) and
        dtypes, and the parameters ``run`` appends; without ``function``, every function's,
        by name. Recorded from the Relax functions at compile time (the manifest's
        ``signatures``)."""
        sigs = self._recorded_signatures()
        if sigs is None:
            raise MlcJitError(
                f"the manifest of {self.path.name} records no signatures: an MLC-LLM library, "
                "or a TVM library compiled by an older pytest-mlcjit (recompile it with "
                "--mlc-jit-policy=REDO)")
        if function is None:
            return dict(sigs)
        if function not in sigs:
            raise self._unknown_function(function)
        return sigs[function]

    # -- running ---------------------------------------------------------------------------
    def run(self, function: str, *inputs: Any, params: Mapping[str, Any] | None = None,
            **named_inputs: Any) -> Any:
        """Call ``function`` with inputs by position or by name (numpy arrays, or anything
        ``numpy.asarray`` takes), then the parameters; return numpy output(s).

        The inputs are checked against the function's recorded signature before TVM is
        called: their number and names, their dtypes (an array of another dtype is an
        error; a list or scalar is converted to the input's dtype) and shapes (a symbolic
        dim must have one value across the inputs); an :class:`InputError` names the
        function, what it takes and what was given. Parameters are ``params`` if given,
        else :attr:`params`. A tuple result comes back as a tuple, an ``R.Shape`` result
        as a :class:`Shape`. The parameters are checked too: each must have the shape and
        dtype the library was compiled with (an :class:`InputError` names it).
        """
        sigs = self._recorded_signatures()
        if (sigs is not None or self._function_names()) \
                and function not in self._function_names():
            raise self._unknown_function(function)
        if params is not None:
            self.params = params
        import tvm

        dev = self.tvm_device()
        if sigs is None:  # an entry compiled before signatures were recorded
            if named_inputs:
                raise InputError(
                    f"{self.path.name} records no signatures, so {function} takes its inputs "
                    f"by position only (given by name: {sorted(named_inputs)}); recompile it "
                    "with --mlc-jit-policy=REDO")
            args = [_to_device(x, None, dev) for x in inputs]
            param_names = [str(p["name"]) for p in self.param_specs]
        else:
            sig = sigs[function]
            args = [_to_device(v, a, dev)
                    for v, a in zip(self._bind(sig, inputs, named_inputs), sig.inputs,
                                    strict=True)]
            param_names = [p.name for p in sig.params]
        values = self.params
        if missing := [n for n in param_names if n not in values]:
            raise InputError(f"{function} takes the parameters {param_names}, but "
                             f"compiled_model.params lacks {missing}")
        specs = {str(p["name"]): p for p in self.param_specs}
        for n in param_names:
            value = _param_array(n, values[n], specs.get(n))
            if n in specs and (why := _param_mismatch(value, specs[n])) is not None:
                raise InputError(f"parameter {n!r} of {function} {why}")
            args.append(tvm.runtime.tensor(value, dev))  # a tensor elsewhere is copied over
        vm = self.load()
        return _to_numpy(vm[function](*args))

    def _bind(self, sig: Signature, inputs: tuple[Any, ...],
              named: Mapping[str, Any]) -> list[Any]:
        """The inputs in the function's order, checked (count, names, dtypes, shapes)."""
        names = sig.input_names
        given = ", ".join([*(_given_text(v) for v in inputs),
                           *(f"{k}={_given_text(v)}" for k, v in named.items())]) or "nothing"

        def fail(problem: str) -> InputError:
            return InputError(f"{problem}. Expected {sig}; given ({given})")

        if len(inputs) > len(names):
            raise fail(f"{sig.function} takes {len(names)} input"
                       f"{'s' if len(names) != 1 else ''}, {len(inputs)} were given by "
                       "position")
        bound = dict(zip(names, inputs, strict=False))
        if unknown := [n for n in named if n not in names]:
            raise fail(f"{sig.function} has no input named {', '.join(unknown)}")
        if twice := [n for n in named if n in bound]:
            raise fail(f"input {twice[0]!r} of {sig.function} was given both by position "
                       "and by name")
        bound.update(named)
        if missing := [n for n in names if n not in bound]:
            raise fail(f"{sig.function} is missing input{'s' if len(missing) > 1 else ''} "
                       f"{', '.join(missing)}")
        dims: dict[str, tuple[int, str]] = {}
        out = []
        for arg in sig.inputs:
            value = bound[arg.name]
            if arg.kind == "tensor":
                value = _as_array(value, arg)
                if (why := _check_tensor(value, arg, dims)) is not None:
                    raise fail(f"input {arg.name!r} of {sig.function} {why}")
            out.append(value)
        return out


def _is_tvm_tensor(value: Any) -> bool:
    import numpy as np

    return hasattr(value, "numpy") and not isinstance(value, np.ndarray | np.generic)


def _as_array(value: Any, arg: ArgSpec) -> Any:
    """A numpy array (or a TVM tensor, as it is) for a tensor input: an array keeps its
    dtype, to be checked; a list or scalar takes the input's dtype."""
    import numpy as np

    if _is_tvm_tensor(value) or isinstance(value, np.ndarray):
        return value
    try:
        return np.asarray(value, dtype=arg.dtype) if arg.dtype else np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise InputError(f"input {arg.name!r} ({type(value).__name__}) cannot be made a "
                         f"{arg.type_text()} array: {exc}") from None


def _check_tensor(  # noqa: PLR0911 - one answer per mismatch
        value: Any, arg: ArgSpec, dims: dict[str, tuple[int, str]]) -> str | None:
    """Why ``value`` does not fit ``arg`` (dtype, rank, a dim, a symbolic dim bound to
    another value by an earlier input), else None; binds symbolic dims in ``dims``."""
    dtype = str(value.dtype)
    if arg.dtype and dtype != arg.dtype:
        hint = (" (numpy's default for floats)" if dtype == "float64" else "")
        return (f"must be {arg.dtype}, got {dtype}{hint}: pass "
                f"{arg.name}.astype({arg.dtype!r})")
    shape = tuple(int(d) for d in value.shape)
    expected = arg.shape
    if expected is None:
        if arg.ndim >= 0 and len(shape) != arg.ndim:
            return f"must have {arg.ndim} dims, got shape {shape}"
        return None
    if len(shape) != len(expected):
        return f"must have shape {arg.type_text()}, got {dtype}{list(shape)}"
    for want, got in zip(expected, shape, strict=True):
        if isinstance(want, int) and want != got:
            return f"must have shape {arg.type_text()}, got {dtype}{list(shape)}"
        if isinstance(want, str) and want.isidentifier():
            if want in dims and dims[want][0] != got:
                value_was, source = dims[want]
                return (f"has {want}={got} (shape {list(shape)}), but {source} set "
                        f"{want}={value_was}")
            dims.setdefault(want, (got, f"input {arg.name!r}"))
    return None


def _param_array(name: str, value: Any, spec: ParamSpec | None) -> Any:
    """A parameter as an array: a numpy array or TVM tensor as it is (its dtype is
    checked), a list or scalar in the parameter's dtype."""
    import numpy as np

    if _is_tvm_tensor(value) or isinstance(value, np.ndarray):
        return value
    try:
        return np.asarray(value, dtype=spec["dtype"] if spec else None)
    except (TypeError, ValueError) as exc:
        raise InputError(f"parameter {name!r} ({type(value).__name__}) cannot be made an "
                         f"array: {exc}") from None


def _param_mismatch(value: Any, spec: ParamSpec) -> str | None:
    """Why the parameter array ``value`` does not fit its recorded shape and dtype, else
    None (a symbolic dim takes any size)."""
    dtype, shape = str(value.dtype), [int(d) for d in value.shape]
    want = list(spec["shape"])
    fits = len(shape) == len(want) and all(
        not isinstance(w, int) or w == g for w, g in zip(want, shape, strict=True))
    if dtype == spec["dtype"] and fits:
        return None
    return (f"must be {spec['dtype']}{want}, got {dtype}{shape}"
            + (" (numpy's default for floats)" if dtype == "float64" != spec["dtype"] else ""))


def _to_device(value: Any, arg: ArgSpec | None, dev: Any) -> Any:
    import numpy as np
    import tvm

    if arg is not None and arg.kind != "tensor":
        return tuple(value) if isinstance(value, Shape) else value
    if _is_tvm_tensor(value):
        return value
    return tvm.runtime.tensor(np.asarray(value), dev)


def _to_numpy(value: Any) -> Any:
    if hasattr(value, "numpy"):
        return value.numpy()
    if type(value).__name__ in ("Shape", "ShapeTuple"):  # an R.Shape result
        return Shape(value)
    if isinstance(value, list | tuple) or type(value).__name__ in ("Array", "ADT", "Tuple"):
        return tuple(_to_numpy(v) for v in value)
    return value


def served_again(model: CompiledModel, device: Device) -> CompiledModel:
    """``model`` served again from the engine's memory, as a hit, for ``device``: another
    GPU of the same architecture gets a model of its own, not yet loaded."""
    if device == model.device:
        return dataclasses.replace(model, hit=True)
    return dataclasses.replace(model, hit=True, device=device, _vm=None)
