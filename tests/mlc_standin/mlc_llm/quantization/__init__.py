"""Quantization names, shaped like ``mlc_llm.quantization.QUANTIZATION`` in the real package.

The stand-in only checks the name and records it in the library's metadata; the library it
builds always computes in float32.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Quantization:
    """A quantization scheme: its name and the kind of scheme it is."""

    name: str
    kind: str


def _kind(name: str) -> str:
    if name.startswith(("e4m3", "e5m2")):
        return "per-tensor-quant"
    if name.startswith("q0"):
        return "no-quant"
    if name.endswith("_ft"):
        return "ft-quant"
    if name.endswith("awq"):
        return "awq"
    return "group-quant"


QUANTIZATION: dict[str, Quantization] = {
    name: Quantization(name, _kind(name))
    for name in (
        "q0f16",
        "q0bf16",
        "q0f32",
        "q3f16_0",
        "q3f16_1",
        "q4f16_0",
        "q4f16_1",
        "q4bf16_1",
        "q4f32_1",
        "q4f16_2",
        "q4f16_autoawq",
        "q4f16_ft",
        "e5m2_e5m2_f16",
        "e4m3_e4m3_f16",
        "e4m3_e4m3_f16_max_calibrate",
    )
}

__all__ = ["QUANTIZATION", "Quantization"]
