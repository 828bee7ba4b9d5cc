"""Building the stand-in's library with TVM (the only module that imports TVM at the top).

The network is small and stores no weights: each weight matrix is computed inside the
library from its shape (``mlc_llm.standin.weight``), so the library stays a few hundred KiB
whatever the config's sizes, and its numerics can be checked with
``mlc_llm.standin.reference_forward``.
"""

from __future__ import annotations

import json
import math
from typing import Any

import tvm
from tvm import relax, te
from tvm.relax.frontend import nn

from mlc_llm.model import Model
from mlc_llm.standin import (
    FORWARD_FUNCTION,
    METADATA_FUNCTION,
    WEIGHT_FREQUENCY,
    WEIGHT_PERIOD,
)
from mlc_llm.support.config import ConfigBase


def _weight(rows: int, cols: int, phase: float) -> nn.Tensor:
    scale = 1.0 / math.sqrt(cols)

    def compute() -> te.Tensor:
        return te.compute(
            (rows, cols),
            lambda r, c: (
                te.cos(
                    ((r * cols + c) % WEIGHT_PERIOD).astype("float32") * WEIGHT_FREQUENCY + phase
                )
                * scale
            ),
            name="weight",
        )

    return nn.op.tensor_expr_op(compute, "standin_weight", args=[])


def _ones(size: int) -> nn.Tensor:
    return nn.op.tensor_expr_op(
        lambda: te.compute((size,), lambda _: tvm.tirx.const(1.0, "float32"), name="ones"),
        "standin_ones",
        args=[],
    )


class _Network(nn.Module):  # type: ignore[misc]
    """``mlp``: ``x + mlp(x)``; ``residual_mlp``: per layer ``x + mlp(norm(x))``, then
    ``norm``, with ``mlp(v) = silu(v @ up.T) @ down.T`` and an unweighted RMS norm."""

    def __init__(self, network: str, config: ConfigBase) -> None:
        self.network = network
        self.hidden = int(config.hidden_size)  # type: ignore[attr-defined]
        self.inner = int(config.intermediate_size)  # type: ignore[attr-defined]
        self.layers = int(getattr(config, "num_hidden_layers", 1))
        self.eps = float(getattr(config, "rms_norm_eps", 1e-5))

    def _mlp(self, x: nn.Tensor, layer: int) -> nn.Tensor:
        up = nn.op.matmul(x, nn.op.permute_dims(_weight(self.inner, self.hidden, 2.0 * layer)))
        down = nn.op.permute_dims(_weight(self.hidden, self.inner, 2.0 * layer + 1.0))
        return nn.op.matmul(nn.op.silu(up), down)

    def _norm(self, x: nn.Tensor) -> nn.Tensor:
        return nn.op.rms_norm(x, _ones(self.hidden), axes=[-1], epsilon=self.eps)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        if self.network == "mlp":
            return x + self._mlp(x, 0)
        for layer in range(self.layers):
            x = x + self._mlp(self._norm(x), layer)
        return self._norm(x)


def check_config(model: Model, config: ConfigBase) -> None:
    """The errors the real model constructors raise for a config they cannot build."""
    shards = int(getattr(config, "tensor_parallel_shards", 1))
    inner = int(config.intermediate_size)  # type: ignore[attr-defined]
    if shards <= 0 or inner % shards:
        raise ValueError(f"Cannot split MLP intermediate size {inner} evenly to {shards} GPUs.")
    heads = getattr(config, "num_attention_heads", None)
    if heads is not None and config.hidden_size % heads:  # type: ignore[attr-defined]
        raise ValueError(
            f"hidden_size {config.hidden_size} is not divisible by "  # type: ignore[attr-defined]
            f"num_attention_heads {heads}"
        )


def build_module(model: Model, config: ConfigBase, metadata: dict[str, Any]) -> tvm.IRModule:
    """The Relax module: ``forward(x: float32[n, hidden_size])`` and ``_metadata()``."""
    network = _Network(model.network, config)
    spec = {FORWARD_FUNCTION: {"x": nn.spec.Tensor(["n", network.hidden], "float32")}}
    mod, params = network.export_tvm(spec=spec)
    assert not params, "the stand-in network must not take weights as inputs"
    builder = relax.BlockBuilder(mod)
    with builder.function(METADATA_FUNCTION, params=[]):
        builder.emit_func_output(tvm.ir.StringImm(json.dumps(metadata, sort_keys=True)))
    return builder.get()


def _gpu_pipeline(target: tvm.target.Target) -> tvm.transform.Pass:
    """The generic GPU pipeline with only the fallback schedule: the ``Matmul`` rule of
    TVM 0.27's default pipeline crashes the process for Metal targets."""
    from tvm.relax.backend import gpu_generic
    from tvm.s_tir import dlight

    passes = [
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        dlight.ApplyDefaultSchedule(dlight.gpu.Fallback()),
        *gpu_generic.dataflow_lower_passes(target),
        *gpu_generic.finalize_passes(target),
    ]

    @tvm.transform.module_pass(opt_level=0)  # type: ignore[untyped-decorator]
    def pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        with target:
            return tvm.transform.Sequential(passes)(mod)

    return pipeline


def build(
    mod: tvm.IRModule, target: tvm.target.Target, *, system_lib: bool, system_lib_prefix: str
) -> relax.VMExecutable:
    """Compile ``mod`` for ``target``; a system library carries ``system_lib_prefix`` on
    its symbols. Export the result with ``export_library(path)`` (``.tar``: object files,
    no linker needed; ``.so``/``.dylib``/``.dll``: linked by the host compiler)."""
    kind = target.kind.name
    if tvm.get_global_func(f"target.build.{kind}", allow_missing=True) is None:
        raise ValueError(f"This TVM build has no code generator for {kind!r} targets")
    if system_lib:
        # Attached here instead of passing system_lib=True: TVM 0.27's relax.build reads the
        # attribute back and fails on short strings such as "".
        mod = mod.with_attr("system_lib_prefix", system_lib_prefix)
    pipeline: Any = _gpu_pipeline(target) if "gpu" in target.keys else "default"
    return relax.build(mod, target, relax_pipeline=pipeline)
