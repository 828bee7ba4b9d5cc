"""Child entry point: ``python -m pytest_mlcjit.compiler.backends._mlc_key job.json``.

Does the two parts of MLC-LLM's cache key that need the installed ``mlc_llm`` itself:
the model family's config normalization (``MODELS[model_type].config.from_dict(d).asdict()``)
and the ``repr`` of the parsed optimization flags. Importing ``mlc_llm`` (and with it its
TVM) costs seconds, so the test process never does it: it asks this script, once per
distinct request per run.

Input: ``{"model_type", "model_config", "opt"}``. Output (last stdout line): JSON with
``model_config``, ``opt``, and ``mlc_llm`` (version and commit).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import sys
from typing import Any


def _jsonable(value: Any) -> Any:
    """``asdict()`` results may hold enums or tuples; make them plain JSON like MLC's dump."""
    return json.loads(json.dumps(value, default=lambda v: getattr(v, "value", str(v))))


def _version(mlc_llm: Any) -> dict[str, Any]:
    commit = None
    with contextlib.suppress(Exception):
        from mlc_llm import libinfo

        commit = getattr(libinfo, "__commit__", None) or getattr(libinfo, "GIT_COMMIT", None)
    return {"version": getattr(mlc_llm, "__version__", None), "commit": commit,
            "path": str(getattr(mlc_llm, "__file__", ""))}


def main(argv: list[str]) -> int:
    with open(argv[0], encoding="utf-8") as f:
        job = json.load(f)
    import mlc_llm
    from mlc_llm.interface.compiler_flags import OptimizationFlags
    from mlc_llm.model import MODELS

    model_type = job["model_type"]
    if model_type not in MODELS:
        print(f"error: unknown model_type {model_type!r}; this mlc_llm knows: "
              f"{', '.join(sorted(MODELS))}", file=sys.stderr)
        return 3
    try:
        config = MODELS[model_type].config.from_dict(job["model_config"])
    except (ValueError, TypeError) as exc:
        print(f"error: invalid model_config for {model_type!r}: {exc}", file=sys.stderr)
        return 5
    normalized = config.asdict() if hasattr(config, "asdict") else dataclasses.asdict(config)
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            opt = repr(OptimizationFlags.from_str(job["opt"]))
    except SystemExit:
        print(f"error: invalid opt {job['opt']!r}: {stderr.getvalue().strip()}", file=sys.stderr)
        return 4
    print(json.dumps({"model_config": _jsonable(normalized), "opt": opt,
                      "mlc_llm": _version(mlc_llm)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
