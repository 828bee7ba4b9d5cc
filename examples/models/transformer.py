"""A tiny decoder-only transformer (pre-norm, causal self-attention, no KV cache).

Architecture, for ``tokens`` of shape ``(1, seq_len)`` (int32)::

    x = embed[clip(tokens)] + pos_embed           # learned absolute positions
    for block in blocks:                          # ``layers`` of them
        x = x + attn(attn_norm(x))                # causal multi-head self-attention
        x = x + down_proj(silu(up_proj(mlp_norm(x))))
    logits = lm_head(norm(x))                     # (1, seq_len, vocab_size)

* Token ids outside ``[0, vocab_size)`` are clipped into range (never read out of
  bounds), see :class:`TokenEmbedding`.
* Norms are RMSNorm over the last axis, ``epsilon=1e-5``, scale only (no bias):
  ``x / sqrt(mean(x**2) + eps) * weight``.
* Every linear layer is bias-free; ``nn.Linear`` stores ``(out_features, in_features)``
  and computes ``x @ weight.T``.
* Attention: scores ``q @ k.T / sqrt(head_dim)`` plus an additive causal mask (large
  negative above the diagonal), softmax over the key axis, times ``v``.
* Positions are a learned parameter ``pos_embed`` of shape ``(seq_len, hidden)``; the
  model is only defined for exactly ``seq_len`` tokens (static shapes).

Parameters (in ``export_tvm`` order; ``i`` runs over ``0 .. layers-1``)::

    embed.weight                    (vocab_size, hidden)
    pos_embed                       (seq_len, hidden)
    blocks.{i}.attn_norm.weight     (hidden,)
    blocks.{i}.attn.q_proj.weight   (hidden, hidden)
    blocks.{i}.attn.k_proj.weight   (hidden, hidden)
    blocks.{i}.attn.v_proj.weight   (hidden, hidden)
    blocks.{i}.attn.o_proj.weight   (hidden, hidden)
    blocks.{i}.mlp_norm.weight      (hidden,)
    blocks.{i}.mlp.up_proj.weight   (ffn, hidden)
    blocks.{i}.mlp.down_proj.weight (hidden, ffn)
    norm.weight                     (hidden,)
    lm_head.weight                  (vocab_size, hidden)

The module has no effects, so ``export_tvm`` emits only the ``forward`` function (no
``_initialize_effect``). The numpy twin is :func:`examples.reference.transformer_forward`.

TVM is imported at module level: this module is only imported by the process that
exports and compiles the model. Raise ``layers`` to make compilation slower.
"""

from __future__ import annotations

import math
from typing import Any

from tvm import relax
from tvm.relax.frontend import nn

__all__ = [
    "NORM_EPS",
    "Attention",
    "Block",
    "FeedForward",
    "TinyTransformer",
    "TokenEmbedding",
    "build",
]

#: RMSNorm epsilon used by every norm in the model (mirrored by the numpy reference).
NORM_EPS = 1e-5

# Additive causal-mask value: large enough that exp() underflows to exactly zero, small
# enough to stay finite in the model's dtype (float16 tops out at 65504).
_MASK_VALUE = {"float16": -3.0e4}
_DEFAULT_MASK_VALUE = -1.0e9


def _rms_norm(hidden: int, dtype: str) -> Any:
    """Scale-only RMSNorm over the last axis (``nn.RMSNorm`` defaults to ``bias=True``)."""
    return nn.RMSNorm(hidden, axes=-1, epsilon=NORM_EPS, bias=False, dtype=dtype)


class TokenEmbedding(nn.Module):  # type: ignore[misc]  # tvm is untyped: nn.Module is Any
    """Token lookup table whose out-of-range ids are clipped into ``[0, num)``.

    ``nn.Embedding`` lowers to ``take`` in "fast" mode, which reads out of bounds for a
    bad id (and makes TVM log a warning at every compile). This module does the same
    lookup with ``mode="clip"``; the parameter is still called ``weight``.
    """

    def __init__(self, num: int, dim: int, dtype: str) -> None:
        """Create the ``(num, dim)`` table."""
        super().__init__()
        self.num = num
        self.dim = dim
        self.weight = nn.Parameter((num, dim), dtype=dtype)

    def forward(self, ids: nn.Tensor) -> nn.Tensor:
        """Map integer ``ids`` of any shape to ``(*ids.shape, dim)``."""
        flat = nn.op.reshape(ids, (-1,))
        rows = nn.op.wrap_nested(
            relax.op.take(self.weight._expr, flat._expr, axis=0, mode="clip"), name="take"
        )
        return nn.op.reshape(rows, (*ids.shape, self.dim))


class Attention(nn.Module):  # type: ignore[misc]  # tvm is untyped: nn.Module is Any
    """Causal multi-head self-attention with bias-free q/k/v/o projections."""

    def __init__(self, hidden: int, heads: int, seq_len: int, dtype: str) -> None:
        """Create the four projections; ``hidden`` must be divisible by ``heads``."""
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden={hidden} is not divisible by heads={heads}")
        self.hidden = hidden
        self.heads = heads
        self.head_dim = hidden // heads
        self.seq_len = seq_len
        self.dtype = dtype
        self.q_proj = nn.Linear(hidden, hidden, bias=False, dtype=dtype)
        self.k_proj = nn.Linear(hidden, hidden, bias=False, dtype=dtype)
        self.v_proj = nn.Linear(hidden, hidden, bias=False, dtype=dtype)
        self.o_proj = nn.Linear(hidden, hidden, bias=False, dtype=dtype)

    def _split_heads(self, x: nn.Tensor) -> nn.Tensor:
        """``(1, S, hidden)`` -> ``(1, heads, S, head_dim)``."""
        x = nn.op.reshape(x, (1, self.seq_len, self.heads, self.head_dim))
        return nn.op.permute_dims(x, [0, 2, 1, 3])

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        """Attend over ``x`` of shape ``(1, seq_len, hidden)``; same shape out."""
        seq = self.seq_len
        q = self._split_heads(self.q_proj(x))
        k = self._split_heads(self.k_proj(x))
        v = self._split_heads(self.v_proj(x))
        scores = nn.op.matmul(q, nn.op.permute_dims(k, [0, 1, 3, 2]))  # (1, H, S, S)
        scores = scores * (1.0 / math.sqrt(self.head_dim))
        # Zero on and below the diagonal, a large negative value strictly above it.
        mask_value = _MASK_VALUE.get(self.dtype, _DEFAULT_MASK_VALUE)
        mask = nn.op.triu(nn.op.full((seq, seq), mask_value, dtype=self.dtype), diagonal=1)
        probs = nn.op.softmax(scores + mask, axis=-1)
        out = nn.op.matmul(probs, v)  # (1, H, S, head_dim)
        out = nn.op.reshape(nn.op.permute_dims(out, [0, 2, 1, 3]), (1, seq, self.hidden))
        return self.o_proj(out)


class FeedForward(nn.Module):  # type: ignore[misc]  # tvm is untyped: nn.Module is Any
    """``down_proj(silu(up_proj(x)))`` with bias-free projections."""

    def __init__(self, hidden: int, ffn: int, dtype: str) -> None:
        """Create the up and down projections."""
        super().__init__()
        self.up_proj = nn.Linear(hidden, ffn, bias=False, dtype=dtype)
        self.down_proj = nn.Linear(ffn, hidden, bias=False, dtype=dtype)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        """Apply the MLP position-wise."""
        return self.down_proj(nn.op.silu(self.up_proj(x)))


class Block(nn.Module):  # type: ignore[misc]  # tvm is untyped: nn.Module is Any
    """One pre-norm transformer block: attention then MLP, each with a residual."""

    def __init__(self, hidden: int, heads: int, ffn: int, seq_len: int, dtype: str) -> None:
        """Create the norms, attention and MLP of one block."""
        super().__init__()
        self.attn_norm = _rms_norm(hidden, dtype)
        self.attn = Attention(hidden, heads, seq_len, dtype)
        self.mlp_norm = _rms_norm(hidden, dtype)
        self.mlp = FeedForward(hidden, ffn, dtype)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        """Apply the block to ``(1, seq_len, hidden)``."""
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class TinyTransformer(nn.Module):  # type: ignore[misc]  # tvm is untyped: nn.Module is Any
    """Decoder-only language model over a fixed-length token window."""

    def __init__(
        self,
        *,
        vocab_size: int,
        hidden: int,
        heads: int,
        layers: int,
        seq_len: int,
        ffn: int,
        dtype: str,
    ) -> None:
        """Create embeddings, ``layers`` blocks, the final norm and the LM head."""
        super().__init__()
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        self.embed = TokenEmbedding(vocab_size, hidden, dtype)
        self.pos_embed = nn.Parameter((seq_len, hidden), dtype=dtype)
        self.blocks = nn.ModuleList(
            [Block(hidden, heads, ffn, seq_len, dtype) for _ in range(layers)]
        )
        self.norm = _rms_norm(hidden, dtype)
        self.lm_head = nn.Linear(hidden, vocab_size, bias=False, dtype=dtype)

    def forward(self, tokens: nn.Tensor) -> nn.Tensor:
        """Map int32 ``tokens`` ``(1, seq_len)`` to logits ``(1, seq_len, vocab_size)``."""
        x = self.embed(tokens) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x))


def build(
    *,
    vocab_size: int = 64,
    hidden: int = 32,
    heads: int = 2,
    layers: int = 2,
    seq_len: int = 8,
    ffn: int = 64,
    dtype: str = "float32",
) -> tuple[Any, dict[str, Any]]:
    """Return ``(module, export_spec)`` for a static-shape tiny transformer.

    The exported function is ``forward(tokens)`` with ``tokens`` an int32 tensor of
    shape ``(1, seq_len)`` holding ids in ``[0, vocab_size)``; it returns float logits of
    shape ``(1, seq_len, vocab_size)`` in ``dtype``.
    """
    module = TinyTransformer(
        vocab_size=vocab_size,
        hidden=hidden,
        heads=heads,
        layers=layers,
        seq_len=seq_len,
        ffn=ffn,
        dtype=dtype,
    )
    spec: dict[str, Any] = {"forward": {"tokens": nn.spec.Tensor((1, seq_len), "int32")}}
    return module, spec
