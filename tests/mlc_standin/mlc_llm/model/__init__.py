"""The model registry, shaped like ``mlc_llm.model`` in the real package.

``MODELS[model_type].config`` is a dataclass with ``from_dict`` / ``asdict``. Every field
has a default (the real classes require some), and ``from_dict`` drops unknown keys.

Model types:

- ``llama``: RMS-normed residual MLP blocks, with the real Llama config's field set.
- ``mistral``: ``llama`` plus ``sliding_window_size`` and ``attention_sink_size``.
- ``tiny_mlp``: one residual MLP block; has no sliding-window, attention-sink,
  pipeline-parallel or disaggregation fields, so those overrides are dropped from its
  normalized config (as the real classes drop fields they do not have).
"""

from __future__ import annotations

import dataclasses

from mlc_llm.support.config import ConfigBase


def _default_prefill_chunk_size(context_window_size: int) -> int:
    return min(context_window_size, 8192) if context_window_size > 0 else 2048


@dataclasses.dataclass
class LlamaConfig(ConfigBase):
    """Config of the stand-in ``llama`` model (field order follows the real ``LlamaConfig``).

    Normalization done by ``__post_init__`` (as in the real class): ``num_key_value_heads``
    and ``head_dim`` of 0 are derived from the head count; a ``prefill_chunk_size`` of 0 (or
    larger than a positive ``context_window_size``) becomes ``min(context_window_size, 8192)``
    (2048 when the context window is unbounded, -1). ``pipeline_parallel_stages`` must lie in
    ``1..num_hidden_layers`` and ``num_attention_heads`` must be positive (``ValueError``).
    """

    hidden_size: int = 64
    intermediate_size: int = 128
    num_attention_heads: int = 4
    num_hidden_layers: int = 2
    rms_norm_eps: float = 1e-5
    vocab_size: int = 256
    tie_word_embeddings: bool = False
    position_embedding_base: int = 10000
    context_window_size: int = -1
    prefill_chunk_size: int = 0
    num_key_value_heads: int = 0
    head_dim: int = 0
    tensor_parallel_shards: int = 1
    pipeline_parallel_stages: int = 1
    max_batch_size: int = 1
    disaggregation: bool = False

    def __post_init__(self) -> None:
        if self.num_attention_heads <= 0:
            raise ValueError(f"num_attention_heads must be positive: {self.num_attention_heads}")
        if not 0 < self.pipeline_parallel_stages <= self.num_hidden_layers:
            raise ValueError(
                f'Invalid "pipeline_parallel_stages" value ({self.pipeline_parallel_stages}).'
            )
        if self.num_key_value_heads == 0:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim == 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.prefill_chunk_size == 0 or (0 < self.context_window_size < self.prefill_chunk_size):
            self.prefill_chunk_size = _default_prefill_chunk_size(self.context_window_size)


@dataclasses.dataclass
class MistralConfig(LlamaConfig):
    """Config of the stand-in ``mistral`` model: ``llama`` plus a sliding window."""

    sliding_window_size: int = -1
    attention_sink_size: int = 4


@dataclasses.dataclass
class TinyMLPConfig(ConfigBase):
    """Config of the stand-in ``tiny_mlp`` model (one residual MLP block)."""

    hidden_size: int = 16
    intermediate_size: int = 32
    vocab_size: int = 32
    context_window_size: int = -1
    prefill_chunk_size: int = 0
    tensor_parallel_shards: int = 1
    max_batch_size: int = 1

    def __post_init__(self) -> None:
        if self.prefill_chunk_size == 0 or (0 < self.context_window_size < self.prefill_chunk_size):
            self.prefill_chunk_size = _default_prefill_chunk_size(self.context_window_size)


@dataclasses.dataclass(frozen=True)
class Model:
    """One model family: its name, config class, and the network the stand-in builds.

    ``network`` is ``"residual_mlp"`` (RMS norm before each block and at the end) or
    ``"mlp"`` (one block, no norm); see ``mlc_llm.standin.reference_forward``.
    """

    name: str
    config: type[ConfigBase]
    network: str


MODELS: dict[str, Model] = {
    "llama": Model("llama", LlamaConfig, "residual_mlp"),
    "mistral": Model("mistral", MistralConfig, "residual_mlp"),
    "tiny_mlp": Model("tiny_mlp", TinyMLPConfig, "mlp"),
}

__all__ = ["MODELS", "LlamaConfig", "MistralConfig", "Model", "TinyMLPConfig"]
