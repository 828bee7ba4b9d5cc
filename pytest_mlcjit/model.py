"""What a test receives: a compiled library, where it came from, and how to run it."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .device import Device
from .errors import MlcJitError


def init_params(specs: list[dict[str, Any]], seed: int) -> dict[str, Any]:
    """Deterministic parameters: each one seeded by (``seed``, its name), so adding a
    parameter never changes the others. Floats are uniform in ±1/sqrt(last dim), like
    PyTorch's Linear; integers are zeros."""
    import numpy as np

    out: dict[str, Any] = {}
    for spec in specs:
        name, shape, dtype = spec["name"], tuple(spec["shape"]), spec["dtype"]
        sub = int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")
        rng = np.random.default_rng(sub)
        if np.dtype(dtype).kind == "f" or dtype in ("bfloat16", "float16"):
            bound = 1.0 / float(np.sqrt(shape[-1])) if shape and shape[-1] else 1.0
            value = rng.uniform(-bound, bound, size=shape).astype("float32")
            out[name] = value.astype(dtype) if dtype != "bfloat16" else value
        else:
            out[name] = np.zeros(shape, dtype=dtype)
    return out


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
    manifest: dict[str, Any]
    loadable: bool = True
    _vm: Any = dataclasses.field(default=None, repr=False)
    _params: dict[str, Any] | None = dataclasses.field(default=None, repr=False)

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
    def param_specs(self) -> list[dict[str, Any]]:
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

    def run(self, function: str, *inputs: Any, params: Mapping[str, Any] | None = None) -> Any:
        """Call ``function`` with numpy inputs (then the parameters); return numpy output(s).

        Parameters are ``params`` if given, else :attr:`params`. A tuple result comes back
        as a tuple of arrays.
        """
        import numpy as np
        import tvm

        vm = self.load()
        dev = self.tvm_device()
        if params is not None:
            self.params = params
        args = [tvm.runtime.tensor(np.asarray(x), dev) for x in inputs]
        args += [tvm.runtime.tensor(self.params[p["name"]], dev) for p in self.param_specs]
        return _to_numpy(vm[function](*args))


def _to_numpy(value: Any) -> Any:
    if hasattr(value, "numpy"):
        return value.numpy()
    if isinstance(value, list | tuple) or type(value).__name__ in ("Array", "ADT", "Tuple"):
        return tuple(_to_numpy(v) for v in value)
    return value
