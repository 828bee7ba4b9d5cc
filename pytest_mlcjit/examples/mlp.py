"""A two-layer perceptron, ``Linear -> ReLU -> Linear``: a model factory shipped with the
plugin, and its numpy twin::

    MLP = TVMModel("pytest_mlcjit.examples.mlp:build", config={"hidden": 128})

    @pytest.mark.mlc_model(MLP)
    def test_forward(compiled_model):
        x = np.ones((2, 16), "float32")
        out = compiled_model.run("forward", x)
        np.testing.assert_allclose(out, reference(compiled_model.params, x), rtol=1e-5)

A factory of your own looks the same: a module-level function that returns an
``IRModule``, or ``(nn.Module, export_spec)`` as :func:`build` does. TVM is imported only
inside :func:`build`, which runs in the compile subprocess; numpy only inside
:func:`reference`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["build", "reference"]


def build(*, in_features: int = 16, hidden: int = 128, out_features: int = 4, batch: int = 2,
          dtype: str = "float32") -> tuple[Any, dict[str, Any]]:
    """``(module, export_spec)``: ``forward(x)`` maps ``x`` of shape ``(batch,
    in_features)`` to ``(batch, out_features)``. Parameters, in call order: ``fc1.weight``
    ``(hidden, in_features)``, ``fc1.bias``, ``fc2.weight`` ``(out_features, hidden)``,
    ``fc2.bias``."""
    from tvm.relax.frontend import nn

    class MLP(nn.Module):  # type: ignore[misc]  # tvm is untyped: nn.Module is Any
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(in_features, hidden, bias=True, dtype=dtype)
            self.fc2 = nn.Linear(hidden, out_features, bias=True, dtype=dtype)

        def forward(self, x: Any) -> Any:
            return self.fc2(nn.op.relu(self.fc1(x)))

    spec = {"forward": {"x": nn.spec.Tensor((batch, in_features), dtype)}}
    return MLP(), spec


def reference(params: Mapping[str, Any], x: Any) -> Any:
    """What :func:`build`'s ``forward`` computes, in numpy (``nn.Linear`` computes
    ``x @ weight.T + bias``)."""
    import numpy as np

    hidden = np.maximum(x @ params["fc1.weight"].T + params["fc1.bias"], 0)
    return hidden @ params["fc2.weight"].T + params["fc2.bias"]
