"""What only the stand-in has: its test hooks and a numpy reference of the library it builds.

Hooks (environment variables read by ``python -m mlc_llm compile``):

- ``MLC_STANDIN_COUNT_FILE``: append one JSON line per invocation (see ``record_invocation``).
- ``MLC_STANDIN_SLEEP``: seconds to sleep before the output is written (or the failure).
- ``MLC_STANDIN_FAIL``: ``exit``, ``nooutput``, ``partial`` or ``kill`` (see ``FAIL_MODES``).
- ``MLC_STANDIN_VERSION``: replaces ``mlc_llm.__version__`` (read at import).
- ``MLC_STANDIN_CUDA_ARCH`` / ``MLC_STANDIN_ROCM_ARCH``: the GPU architecture compiled for.

The built library has two functions: ``forward(x)`` with ``x`` a float32 tensor of shape
``(n, hidden_size)`` for any ``n``, returning the same shape, and ``_metadata()`` returning a
JSON string (as real MLC libraries do). ``reference_forward`` computes ``forward`` in numpy.
"""

from __future__ import annotations

import json
import os
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

FORWARD_FUNCTION = "forward"
METADATA_FUNCTION = "_metadata"

COUNT_FILE_ENV = "MLC_STANDIN_COUNT_FILE"
SLEEP_ENV = "MLC_STANDIN_SLEEP"
FAIL_ENV = "MLC_STANDIN_FAIL"

#: ``MLC_STANDIN_FAIL`` values and what the compile command then does.
FAIL_MODES = {
    "exit": "print an error and exit 1 without compiling or writing the output",
    "nooutput": "compile, then exit 0 without writing the output",
    "partial": "compile, write the first half of the library to the output, exit 1",
    "kill": "compile, write the first half of the library, then SIGKILL itself",
}

#: Weight entries repeat with this period, so ``cos`` arguments stay small and exact.
WEIGHT_PERIOD = 97
WEIGHT_FREQUENCY = 0.37


def fail_mode() -> str | None:
    """The requested failure (``None`` when unset); ``ValueError`` for an unknown one."""
    mode = os.environ.get(FAIL_ENV) or None
    if mode is not None and mode not in FAIL_MODES:
        raise ValueError(f"{FAIL_ENV} must be one of {sorted(FAIL_MODES)}, not {mode!r}")
    return mode


def sleep_seconds() -> float:
    """``MLC_STANDIN_SLEEP`` as seconds (0 when unset); ``ValueError`` when not a number."""
    raw = os.environ.get(SLEEP_ENV) or "0"
    try:
        return max(0.0, float(raw))
    except ValueError:
        raise ValueError(f"{SLEEP_ENV} must be a number of seconds, not {raw!r}") from None


def pause(seconds: float) -> None:
    """Sleep ``seconds`` (the value of ``sleep_seconds()``), saying so."""
    if seconds:
        print(f"[standin] sleeping {seconds:g}s ({SLEEP_ENV})", flush=True)
        time.sleep(seconds)


def record_invocation(record: dict[str, Any]) -> None:
    """Append ``record`` plus ``pid`` and ``time`` as one JSON line to the count file, in a
    single ``write`` on an ``O_APPEND`` descriptor, so concurrent compiles never interleave."""
    path = os.environ.get(COUNT_FILE_ENV)
    if not path:
        return
    line = json.dumps({"pid": os.getpid(), "time": time.time(), **record}) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line.encode("utf-8"))
    finally:
        os.close(fd)


def weight(rows: int, cols: int, phase: float) -> np.ndarray:
    """The ``(rows, cols)`` float32 weight the library computes (it stores no weights):
    ``cos(0.37 * ((r * cols + c) % 97) + phase) / sqrt(cols)``."""
    import numpy as np

    index = (np.arange(rows * cols, dtype=np.int64) % WEIGHT_PERIOD).astype(np.float32)
    values = np.cos(index * np.float32(WEIGHT_FREQUENCY) + np.float32(phase))
    return np.asarray(values / np.float32(np.sqrt(cols)), dtype=np.float32).reshape(rows, cols)


def reference_forward(model_type: str, model_config: dict[str, Any], x: np.ndarray) -> np.ndarray:
    """numpy version of the library's ``forward`` for ``model_config`` (as passed to
    ``MODELS[model_type].config.from_dict``, i.e. already normalized or not)."""
    import numpy as np

    from mlc_llm.model import MODELS

    model = MODELS[model_type]
    config = model.config.from_dict(model_config)
    hidden, inner = config.hidden_size, config.intermediate_size  # type: ignore[attr-defined]
    eps = getattr(config, "rms_norm_eps", 1e-5)

    def norm(v: np.ndarray) -> np.ndarray:
        return np.asarray(v / np.sqrt(np.mean(v * v, axis=-1, keepdims=True) + eps))

    def mlp(v: np.ndarray, layer: int) -> np.ndarray:
        up = v @ weight(inner, hidden, 2.0 * layer).T
        return np.asarray((up / (1.0 + np.exp(-up))) @ weight(hidden, inner, 2.0 * layer + 1.0).T)

    out = np.asarray(x, dtype=np.float32)
    if model.network == "mlp":
        return np.asarray(out + mlp(out, 0), dtype=np.float32)
    for layer in range(config.num_hidden_layers):  # type: ignore[attr-defined]
        out = out + mlp(norm(out), layer)
    return np.asarray(norm(out), dtype=np.float32)
