"""Pure-numpy reference implementations of the example models.

This module imports only numpy, so example tests can import it without pulling in
TVM. Every function computes in float32 and mirrors, operation for operation, the
corresponding model in :mod:`examples.models`:

* :func:`mlp_forward` <-> ``examples.models.mlp``
* :func:`transformer_forward` <-> ``examples.models.transformer``

``params`` is a mapping from the parameter names returned by ``export_tvm`` (for
example ``"fc1.weight"``) to numpy arrays. Linear weights are laid out
``(out_features, in_features)`` as in ``tvm.relax.frontend.nn.Linear``, so a linear
layer is ``x @ weight.T (+ bias)``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

__all__ = ["NORM_EPS", "mlp_forward", "transformer_forward"]

Array = npt.NDArray[np.float32]

#: RMSNorm epsilon; must equal ``examples.models.transformer.NORM_EPS``.
NORM_EPS = 1e-5
# Additive causal-mask value used by the float32 model.
_MASK_VALUE = np.float32(-1.0e9)


def _f32(array: npt.ArrayLike) -> Array:
    """View ``array`` as float32 (no copy when it already is)."""
    return np.asarray(array, dtype=np.float32)


def _linear(x: Array, weight: Array, bias: Array | None = None) -> Array:
    """``x @ weight.T + bias`` with ``weight`` shaped ``(out_features, in_features)``."""
    out = x @ _f32(weight).T
    if bias is not None:
        out = out + _f32(bias)
    return _f32(out)


def _rms_norm(x: Array, weight: Array, eps: float = NORM_EPS) -> Array:
    """Scale-only RMSNorm over the last axis."""
    mean_sq = np.mean(np.square(x), axis=-1, keepdims=True)
    return _f32(x / np.sqrt(mean_sq + np.float32(eps)) * _f32(weight))


def _softmax(x: Array, axis: int = -1) -> Array:
    shifted = x - np.max(x, axis=axis, keepdims=True)
    e = np.exp(shifted)
    return _f32(e / np.sum(e, axis=axis, keepdims=True))


def _silu(x: Array) -> Array:
    return _f32(x / (np.float32(1.0) + np.exp(-x)))


def mlp_forward(params: Mapping[str, npt.ArrayLike], x: npt.ArrayLike) -> Array:
    """Reference for ``examples.models.mlp``: ``fc2(relu(fc1(x)))``.

    ``x`` has shape ``(batch, in_features)``; the result ``(batch, out_features)``.
    """
    p = {name: _f32(value) for name, value in params.items()}
    h = _linear(_f32(x), p["fc1.weight"], p["fc1.bias"])
    h = np.maximum(h, np.float32(0.0))
    return _linear(h, p["fc2.weight"], p["fc2.bias"])


def _attention(x: Array, p: Mapping[str, Array], prefix: str, heads: int) -> Array:
    """Causal multi-head self-attention on ``x`` of shape ``(batch, seq, hidden)``."""
    batch, seq, hidden = x.shape
    head_dim = hidden // heads

    def split(t: Array) -> Array:  # (B, S, hidden) -> (B, H, S, head_dim)
        return _f32(t.reshape(batch, seq, heads, head_dim).transpose(0, 2, 1, 3))

    q = split(_linear(x, p[f"{prefix}.q_proj.weight"]))
    k = split(_linear(x, p[f"{prefix}.k_proj.weight"]))
    v = split(_linear(x, p[f"{prefix}.v_proj.weight"]))
    scores = (q @ k.transpose(0, 1, 3, 2)) * np.float32(1.0 / np.sqrt(head_dim))
    mask = np.triu(np.full((seq, seq), _MASK_VALUE, dtype=np.float32), k=1)
    probs = _softmax(scores + mask, axis=-1)
    out = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, seq, hidden)
    return _linear(out, p[f"{prefix}.o_proj.weight"])


def transformer_forward(
    params: Mapping[str, npt.ArrayLike],
    tokens: npt.ArrayLike,
    *,
    heads: int,
) -> Array:
    """Reference for ``examples.models.transformer``.

    ``tokens`` is an integer array of shape ``(1, seq_len)``; the result is the float32
    logits ``(1, seq_len, vocab_size)``. Out-of-range ids are clipped into
    ``[0, vocab_size)``, like the model does. ``heads`` must match the ``heads`` the model
    was built with (it is not recoverable from the parameter shapes). The number of
    layers is inferred from the ``blocks.{i}.*`` parameter names.
    """
    p = {name: _f32(value) for name, value in params.items()}
    table = p["embed.weight"]
    ids = np.clip(np.asarray(tokens, dtype=np.int64), 0, table.shape[0] - 1)
    x = table[ids] + p["pos_embed"]
    layers = 0
    while f"blocks.{layers}.attn_norm.weight" in p:
        layers += 1
    if layers == 0:
        raise KeyError("no 'blocks.0.*' parameters found")
    for i in range(layers):
        prefix = f"blocks.{i}"
        x = x + _attention(
            _rms_norm(x, p[f"{prefix}.attn_norm.weight"]), p, f"{prefix}.attn", heads
        )
        h = _rms_norm(x, p[f"{prefix}.mlp_norm.weight"])
        h = _linear(
            _silu(_linear(h, p[f"{prefix}.mlp.up_proj.weight"])),
            p[f"{prefix}.mlp.down_proj.weight"],
        )
        x = x + h
    return _linear(_rms_norm(x, p["norm.weight"]), p["lm_head.weight"])
