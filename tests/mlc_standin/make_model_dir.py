"""Write a model directory (``mlc-chat-config.json`` only) for the stand-in ``mlc_llm``.

The file has the shape ``mlc_llm gen_config`` writes: ``model_type``, ``quantization``, a
``model_config`` object, the compile-relevant top-level fields (which the compiler merges
over ``model_config``), and fields that do not matter to compilation (``conv_template``,
sampling defaults, tokenizer info). No weights are written: compilation never reads them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CONFIG_NAME = "mlc-chat-config.json"

#: Small ``model_config`` objects per model type, so a compile takes about a second.
DEFAULT_MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_attention_heads": 2,
        "num_hidden_layers": 2,
        "rms_norm_eps": 1e-5,
        "vocab_size": 64,
        "context_window_size": 256,
        "prefill_chunk_size": 64,
        "tensor_parallel_shards": 1,
        "max_batch_size": 4,
        "max_position_embeddings": 256,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
    },
    "mistral": {
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_attention_heads": 2,
        "num_hidden_layers": 2,
        "rms_norm_eps": 1e-5,
        "vocab_size": 64,
        "context_window_size": 256,
        "sliding_window_size": 128,
        "attention_sink_size": 4,
        "prefill_chunk_size": 64,
        "tensor_parallel_shards": 1,
        "max_batch_size": 4,
    },
    "tiny_mlp": {
        "hidden_size": 8,
        "intermediate_size": 16,
        "vocab_size": 32,
        "context_window_size": 128,
        "prefill_chunk_size": 32,
    },
}


def make_model_dir(
    path: Path,
    *,
    model_type: str = "llama",
    quantization: str = "q4f16_1",
    model_config: dict[str, Any] | None = None,
    **top_level: Any,
) -> Path:
    """Create ``path`` (and parents) with an ``mlc-chat-config.json``; return ``path``.

    ``model_config`` is merged over the defaults for ``model_type`` (unknown model types
    have none); ``top_level`` is merged over the default top-level fields. In both, a value
    of ``None`` removes that field, e.g. ``conv_template=None``. The top-level
    ``vocab_size``, ``context_window_size`` and ``prefill_chunk_size`` default to the merged
    ``model_config``'s values, as ``gen_config`` writes them.
    """
    inner = {**DEFAULT_MODEL_CONFIGS.get(model_type, {}), **(model_config or {})}
    config: dict[str, Any] = {
        "version": "0.1.0",
        "model_type": model_type,
        "quantization": quantization,
        "model_config": {k: v for k, v in inner.items() if v is not None},
        "vocab_size": inner.get("vocab_size", 64),
        "context_window_size": inner.get("context_window_size", -1),
        "sliding_window_size": inner.get("sliding_window_size", -1),
        "prefill_chunk_size": inner.get("prefill_chunk_size", 64),
        "attention_sink_size": inner.get("attention_sink_size", -1),
        "tensor_parallel_shards": inner.get("tensor_parallel_shards", 1),
        "pipeline_parallel_stages": 1,
        "active_vocab_size": inner.get("vocab_size", 64),
        "temperature": 1.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "repetition_penalty": 1.0,
        "top_p": 1.0,
        "tokenizer_files": ["tokenizer.json"],
        "tokenizer_info": {
            "token_postproc_method": "byte_fallback",
            "prepend_space_in_encode": True,
            "strip_space_in_decode": True,
        },
        "conv_template": {
            "name": "llama-2",
            "system_template": "[INST] <<SYS>>\n{system_message}\n<</SYS>>\n\n",
            "system_message": "You are a helpful assistant.",
            "roles": {"user": "[INST]", "assistant": "[/INST]"},
            "seps": [" "],
            "stop_str": ["[INST]"],
            "stop_token_ids": [2],
        },
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    config.update(top_level)
    config = {k: v for k, v in config.items() if v is not None}
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return path
