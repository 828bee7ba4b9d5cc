"""Optimization flags and model-config overrides, shaped like
``mlc_llm.interface.compiler_flags`` in the real package (no TVM import here).

Like the real ones, ``OptimizationFlags.from_str`` and ``ModelConfigOverride.from_str``
parse with ``argparse``: a string they cannot parse prints a message to stderr and raises
``SystemExit(2)``, not ``ValueError``. On the command line that is exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
from typing import Any

from mlc_llm.support.config import ConfigOverrideBase


class IPCAllReduceStrategyType(enum.IntEnum):
    """The all-reduce strategy (only its name matters to the stand-in)."""

    NONE = 0
    ONESHOT = 1
    TWOSHOT = 2
    AUTO = 3


def bit(value: str) -> bool:
    """``"0"`` or ``"1"``, the only booleans the real flag parser accepts."""
    if value not in ("0", "1"):
        raise ValueError(value)
    return value == "1"


def boolean(value: str) -> bool:
    """A boolean override value: ``True``/``False`` (any case) or ``1``/``0``."""
    lowered = value.lower()
    if lowered not in ("true", "false", "1", "0"):
        raise ValueError(value)
    return lowered in ("true", "1")


def _parse_semicolon_list(parser: argparse.ArgumentParser, source: str) -> argparse.Namespace:
    """Parse ``a=1;b=2`` as the options ``--a=1 --b=2`` (exits 2 on anything unknown)."""
    return parser.parse_args([f"--{item}" for item in source.split(";") if item])


@dataclasses.dataclass
class OptimizationFlags:
    """Optimization flags; ``repr()`` is the canonical string the JIT cache key uses."""

    flashinfer: bool = False
    cublas_gemm: bool = False
    faster_transformer: bool = False
    cudagraph: bool = False
    cutlass: bool = False
    ipc_allreduce_strategy: IPCAllReduceStrategyType = IPCAllReduceStrategyType.NONE

    def __repr__(self) -> str:
        return (
            f"flashinfer={int(self.flashinfer)}"
            f";cublas_gemm={int(self.cublas_gemm)}"
            f";faster_transformer={int(self.faster_transformer)}"
            f";cudagraph={int(self.cudagraph)}"
            f";cutlass={int(self.cutlass)}"
            f";ipc_allreduce_strategy={self.ipc_allreduce_strategy.name}"
        )

    @staticmethod
    def from_str(source: str) -> OptimizationFlags:
        """A preset (``O0``..``O3``) or ``name=value;...`` (booleans as 0/1); names left
        out take the real parser's defaults (``flashinfer`` on, the rest off)."""
        if source in OPT_FLAG_PRESET:
            return dataclasses.replace(OPT_FLAG_PRESET[source])
        parser = argparse.ArgumentParser(prog="optimization flags", add_help=False)
        parser.add_argument("--flashinfer", type=bit, default=True)
        parser.add_argument("--cublas_gemm", type=bit, default=False)
        parser.add_argument("--faster_transformer", type=bit, default=False)
        parser.add_argument("--cudagraph", type=bit, default=False)
        parser.add_argument("--cutlass", type=bit, default=False)
        parser.add_argument(
            "--ipc_allreduce_strategy",
            choices=[member.name for member in IPCAllReduceStrategyType],
            default="NONE",
        )
        parsed = _parse_semicolon_list(parser, source)
        return OptimizationFlags(
            flashinfer=parsed.flashinfer,
            cublas_gemm=parsed.cublas_gemm,
            faster_transformer=parsed.faster_transformer,
            cudagraph=parsed.cudagraph,
            cutlass=parsed.cutlass,
            ipc_allreduce_strategy=IPCAllReduceStrategyType[parsed.ipc_allreduce_strategy],
        )

    def update(self, target: Any, quantization: str) -> None:
        """Turn off what ``target`` (a ``tvm.target.Target``) cannot use, by the real rules:
        everything but the all-reduce strategy is CUDA-only (cuBLAS also ROCm, and only for
        unquantized or fp8 models); FlashInfer needs sm_80 or newer and a TVM built with it.
        """
        kind = target.kind.name
        cuda = kind == "cuda"
        if self.flashinfer and cuda:
            import tvm

            digits = "".join(ch for ch in str(target.attrs.get("arch", "")) if ch.isdigit())
            built_with = tvm.support.libinfo().get("USE_FLASHINFER") == "ON"
            self.flashinfer = built_with and bool(digits) and int(digits) >= 80
        else:
            self.flashinfer = False
        self.cublas_gemm = (
            self.cublas_gemm
            and kind in ("cuda", "rocm")
            and (
                quantization in ("q0f16", "q0f32")
                or "e4m3" in quantization
                or "e5m2" in quantization
            )
        )
        self.faster_transformer = self.faster_transformer and cuda
        self.cutlass = self.cutlass and cuda
        self.cudagraph = self.cudagraph and cuda


OPT_FLAG_PRESET: dict[str, OptimizationFlags] = {
    "O0": OptimizationFlags(),
    "O1": OptimizationFlags(cublas_gemm=True, faster_transformer=True, cutlass=True),
    "O2": OptimizationFlags(flashinfer=True, cublas_gemm=True, cudagraph=True, cutlass=True),
    "O3": OptimizationFlags(
        flashinfer=True,
        cublas_gemm=True,
        faster_transformer=True,
        cudagraph=True,
        cutlass=True,
        ipc_allreduce_strategy=IPCAllReduceStrategyType.AUTO,
    ),
}


@dataclasses.dataclass
class ModelConfigOverride(ConfigOverrideBase):
    """Overrides of model-config fields; the field order is the order of the JIT key's
    ``overrides`` string."""

    context_window_size: int | None = None
    sliding_window_size: int | None = None
    prefill_chunk_size: int | None = None
    attention_sink_size: int | None = None
    max_batch_size: int | None = None
    tensor_parallel_shards: int | None = None
    pipeline_parallel_stages: int | None = None
    disaggregation: bool | None = None

    def __repr__(self) -> str:
        return ";".join(
            f"{field.name}={getattr(self, field.name)}" for field in dataclasses.fields(self)
        )

    @staticmethod
    def from_str(source: str) -> ModelConfigOverride:
        """Parse ``context_window_size=2048;prefill_chunk_size=512`` (integers; the
        ``disaggregation`` value is ``True``/``False``/``1``/``0``)."""
        parser = argparse.ArgumentParser(prog="model config override values", add_help=False)
        for field in dataclasses.fields(ModelConfigOverride):
            converter = boolean if field.name == "disaggregation" else int
            parser.add_argument(f"--{field.name}", type=converter, default=None)
        return ModelConfigOverride(**vars(_parse_semicolon_list(parser, source)))
