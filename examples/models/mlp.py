"""A two-layer perceptron: ``Linear -> ReLU -> Linear``, both linears with bias.

Parameters (in ``export_tvm`` order)::

    fc1.weight  (hidden, in_features)
    fc1.bias    (hidden,)
    fc2.weight  (out_features, hidden)
    fc2.bias    (out_features,)

``nn.Linear`` stores its weight as ``(out_features, in_features)`` and computes
``x @ weight.T + bias``. The numpy twin is :func:`examples.reference.mlp_forward`.

TVM is imported at module level: this module is only imported by the process that
exports and compiles the model.
"""

from __future__ import annotations

from typing import Any

from tvm.relax.frontend import nn

__all__ = ["MLP", "build"]


class MLP(nn.Module):  # type: ignore[misc]  # tvm is untyped: nn.Module is Any
    """``fc2(relu(fc1(x)))``."""

    def __init__(self, in_features: int, hidden: int, out_features: int, dtype: str) -> None:
        """Create the two linear layers (parameters are left uninitialised)."""
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden, bias=True, dtype=dtype)
        self.fc2 = nn.Linear(hidden, out_features, bias=True, dtype=dtype)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        """Map ``(batch, in_features)`` to ``(batch, out_features)``."""
        return self.fc2(nn.op.relu(self.fc1(x)))


def build(
    *,
    in_features: int = 16,
    hidden: int = 128,
    out_features: int = 4,
    batch: int = 2,
    dtype: str = "float32",
) -> tuple[Any, dict[str, Any]]:
    """Return ``(module, export_spec)`` for a static-shape MLP.

    The exported function is ``forward(x)`` with ``x`` of shape ``(batch, in_features)``
    and dtype ``dtype``; it returns a ``(batch, out_features)`` tensor.
    """
    module = MLP(in_features, hidden, out_features, dtype)
    spec: dict[str, Any] = {"forward": {"x": nn.spec.Tensor((batch, in_features), dtype)}}
    return module, spec
