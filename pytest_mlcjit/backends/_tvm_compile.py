"""Subprocess entry point: ``python -m pytest_mlcjit.backends._tvm_compile request.json``.

Imports the factory, builds the Relax module, compiles it with ``tvm.compile`` and exports
the library to the requested path, then writes ``meta.json`` (parameters, functions, the
canonical target) beside it. Everything it prints goes to the entry's compile log.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from typing import Any


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


def main(argv: list[str]) -> int:
    with open(argv[0], encoding="utf-8") as f:
        job = json.load(f)
    t0 = time.perf_counter()
    print(f"[pytest-mlcjit] building {job['factory']} with config {json.dumps(job['config'])}",
          flush=True)
    import tvm
    from tvm import relax

    mod, params = _build_module(_load_factory(job["factory"]), job["config"])
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
    meta = {"params": params, "functions": functions, "target_str": str(target),
            "tvm_version": tvm.__version__}
    with open(job["meta"], "w", encoding="utf-8") as f:
        json.dump(meta, f)
    print(f"[pytest-mlcjit] compiled in {time.perf_counter() - t0:.2f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
