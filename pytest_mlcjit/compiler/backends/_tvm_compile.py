"""Child entry point: ``python -m pytest_mlcjit.compiler.backends._tvm_compile request.json``.

Imports the factory (recording what it uses: :mod:`pytest_mlcjit.inputs.record`), builds the
Relax module, compiles it with ``tvm.compile`` and exports
the library to the requested path, then writes ``meta.json`` (parameters, functions, the
canonical target) beside it. Everything it prints goes to the entry's compile log.

Local modules are compiled from their source, never from a ``.pyc``
(:mod:`pytest_mlcjit.inputs.sources`). When an input changed while the factory ran, the
reasons are written as ``unstable``: the engine does not publish that library.

When the factory or the compiler raises, it still writes ``meta.json``: the error, the
inputs recorded so far, the files the factory tried to read and did not find, and whether
the failure is the factory's or the compiler's own verdict (``deterministic``: not a
missing module or file, a full disk, no memory, nor a factory whose recorded inputs are
incomplete: a tool or worker it ran), which the engine remembers across runs
for this exact key and input state; then it exits non-zero as before.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
import time
from typing import Any

from pytest_mlcjit.inputs.record import InputRecorder
from pytest_mlcjit.inputs.sources import fresh_local_sources
from pytest_mlcjit.key import file_sha256


def _load_factory(name: str) -> Any:
    module_name, _, func_name = name.partition(":")
    module = importlib.import_module(module_name)
    try:
        return getattr(module, func_name)
    except AttributeError:
        raise SystemExit(f"error: module {module_name!r} has no attribute {func_name!r}") from None


def _build_module(factory: Any, config: dict[str, Any]) -> tuple[Any, list[dict[str, Any]]]:
    import tvm

    built = factory(**config)
    if isinstance(built, tvm.IRModule):
        return built, []
    if isinstance(built, tuple) and len(built) == 2:
        module, export_spec = built
        mod, params = module.export_tvm(spec=export_spec)
        meta = [{"name": name, "shape": [int(s) for s in p.shape], "dtype": str(p.dtype)}
                for name, p in params]
        return mod, meta
    raise SystemExit(
        f"error: the factory returned {type(built).__name__}; expected an IRModule or a tuple "
        "(nn.Module, export_spec)"
    )


# -- signatures: what each function takes, for CompiledModel.signature() and run() -------------
def _dim(value: Any) -> int | str:
    """A shape dimension: an int, a symbolic variable by its name, or an expression's text."""
    if hasattr(value, "value") and isinstance(value.value, int):
        return int(value.value)
    name = getattr(value, "name", None)
    return name if isinstance(name, str) and name else str(value)


def _describe(ty: Any) -> dict[str, Any]:
    """The JSON form of a Relax parameter's type: ``{"kind": "tensor", "shape": [..] or
    None, "ndim", "dtype"}``, ``{"kind": "shape", "shape", "ndim"}``, ``{"kind": "prim",
    "dtype"}``, ``{"kind": "tuple", "fields": [..]}``, else ``{"kind": "object"}``."""
    kind = type(ty).__name__
    if kind in ("TensorType", "TensorStructInfo"):
        values = getattr(ty.shape, "values", None)
        return {"kind": "tensor", "ndim": int(ty.ndim),
                "shape": None if values is None else [_dim(v) for v in values],
                "dtype": None if ty.dtype is None or not str(ty.dtype) or str(ty.dtype) == "void"
                else str(ty.dtype)}
    if kind in ("ShapeType", "ShapeStructInfo"):
        values = ty.values
        return {"kind": "shape", "ndim": int(ty.ndim),
                "shape": None if values is None else [_dim(v) for v in values]}
    if kind in ("PrimType", "PrimStructInfo"):
        return {"kind": "prim", "dtype": str(ty.dtype)}
    if kind in ("TupleType", "TupleStructInfo"):
        return {"kind": "tuple", "fields": [_describe(f) for f in ty.fields]}
    return {"kind": "object"}


def _signatures(mod: Any) -> dict[str, dict[str, Any]]:
    """Each Relax function's inputs and trailing parameters (those after its ``num_input``
    attribute: what ``nn.Module.export_tvm`` and importers with ``keep_params_in_input``
    append), with names, shapes (symbolic dims by name) and dtypes, and its output."""
    from tvm import relax

    out: dict[str, dict[str, Any]] = {}
    for gv, fn in mod.functions.items():
        if not isinstance(fn, relax.Function):
            continue
        args = []
        for var in fn.params:
            ty = getattr(var, "ty", None) or getattr(var, "struct_info", None)
            name = getattr(var, "name", None) or getattr(var, "name_hint", "")
            args.append({"name": str(name), **_describe(ty)})
        num_input = fn.attrs.get("num_input") if fn.attrs is not None else None
        split = len(args) if num_input is None else min(int(num_input), len(args))
        ret = getattr(fn, "ret_ty", None) or getattr(fn, "ret_struct_info", None)
        out[gv.name_hint] = {"inputs": args[:split], "params": args[split:],
                             "output": _describe(ret)}
    return out


def _trailing_params(signatures: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The parameter specs of an IRModule that keeps its parameters as inputs: the trailing
    parameters of ``main`` (else of the first function that has any), if all are tensors."""
    names = sorted(signatures, key=lambda n: (n != "main", n))
    for name in names:
        params = signatures[name]["params"]
        if params and all(p["kind"] == "tensor" and p["shape"] is not None for p in params):
            return [{"name": p["name"], "shape": p["shape"], "dtype": p["dtype"]}
                    for p in params]
    return []


#: Failures that are no verdict of the factory or the compiler on this input state but a
#: circumstance (a module or file missing, a full disk, no memory, an interrupt): they are
#: not written down as failures to remember across runs.
CIRCUMSTANTIAL = (ImportError, OSError, MemoryError, KeyboardInterrupt)


def _missing_reads(recorder: Any) -> list[str]:
    """Files the factory tried to read that do not exist (relative to the recorder's base
    when under it): a failure that depends on their absence is retried once one appears."""
    base = str(recorder.base)
    out = []
    for path in getattr(recorder, "_reads", {}):
        if not os.path.lexists(path):
            rel = os.path.relpath(path, base)
            out.append(path if rel.startswith("..") else rel.replace(os.sep, "/"))
    return sorted(out)


def _write_failure(job: dict[str, Any], recorder: Any, exc: BaseException) -> None:
    """Write ``meta.json`` for a compile that raised: the error, whether it is the
    factory's or the compiler's own (``deterministic``), and the inputs recorded so far,
    so that the engine can remember it for this exact input state."""
    deterministic = not isinstance(exc, CIRCUMSTANTIAL) and not (
        isinstance(exc, SystemExit) and exc.code in (None, 0))
    inputs = None
    if recorder is not None:
        try:
            inputs = recorder.result()
        except Exception:  # without inputs it is not remembered
            deterministic = False
    text = str(exc) if not isinstance(exc, SystemExit) else str(exc.code)
    if recorder is not None and getattr(recorder, "unstable", None):
        deterministic = False  # built from a state no record names: not remembered
    if isinstance(inputs, dict) and inputs.get("incomplete"):
        deterministic = False  # it ran what no record follows (a tool): not remembered
    meta = {"error": f"{type(exc).__name__}: {text}"[:2000], "deterministic": deterministic,
            "inputs": inputs, "missing": _missing_reads(recorder) if recorder else []}
    with contextlib.suppress(OSError), open(job["meta"], "w", encoding="utf-8") as f:
        json.dump(meta, f)


def _declared_changed(job: dict[str, Any]) -> list[str]:
    """The declared input files (``files=``, hashed into the key before the compile) whose
    content is not what the key says now that the compile is over."""
    base, out = job.get("files_base") or "", []
    for item in job.get("files", ()):
        path = os.path.join(base, item["path"])
        try:
            same = file_sha256(path) == item["sha256"]
        except OSError:
            same = False
        if not same:
            out.append(f"{item['path']} changed during the compile (declared in files=)")
    return out


def main(argv: list[str]) -> int:
    with open(argv[0], encoding="utf-8") as f:
        job = json.load(f)
    state: dict[str, Any] = {}
    try:
        return _compile(job, state)
    except BaseException as exc:
        _write_failure(job, state.get("recorder"), exc)
        raise


def _compile(job: dict[str, Any], state: dict[str, Any]) -> int:
    """Build, compile and export; ``state["recorder"]``: the input recorder, once made."""
    t0 = time.perf_counter()
    print(f"[pytest-mlcjit] building {job['factory']} with config {json.dumps(job['config'])}",
          flush=True)
    import tvm
    from tvm import relax

    # What the factory really uses, from importing its module to returning the model
    # (the harness's own imports above are not the factory's).
    recorder = InputRecorder.for_module(job["factory"].partition(":")[0],
                                        exclude=job.get("exclude", ()))
    state["recorder"] = recorder
    # Never a stale .pyc of a local module (tvm.compile's own imports: as usual).
    with fresh_local_sources(recorder.base), recorder:
        mod, params = _build_module(_load_factory(job["factory"]), job["config"])
    inputs = recorder.result()
    raw = job["target"]
    target = tvm.target.Target(raw)  # a TVM target string or a JSON dict
    if target.kind.name not in ("llvm", "c") and target.host is None:
        target = tvm.target.Target(target, host="llvm")
    print(f"[pytest-mlcjit] target {target}", flush=True)
    with tvm.transform.PassContext(opt_level=int(job["opt_level"])):
        executable = tvm.compile(mod, target=target)
    executable.export_library(job["output"])
    functions = sorted(gv.name_hint for gv, fn in mod.functions.items()
                       if isinstance(fn, relax.Function))
    signatures = _signatures(mod)
    if not params:  # an IRModule whose functions take their parameters after num_input
        params = _trailing_params(signatures)
    meta = {"params": params, "functions": functions, "target_str": str(target),
            "tvm_version": tvm.__version__, "inputs": inputs, "signatures": signatures}
    unstable = recorder.unstable + _declared_changed(job)
    if unstable:  # built from what no record names: not to be published
        meta["unstable"] = unstable
    with open(job["meta"], "w", encoding="utf-8") as f:
        json.dump(meta, f)
    print(f"[pytest-mlcjit] compiled in {time.perf_counter() - t0:.2f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
