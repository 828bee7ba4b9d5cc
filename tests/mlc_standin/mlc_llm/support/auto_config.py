"""Finding and reading ``mlc-chat-config.json``, shaped like ``mlc_llm.support.auto_config``.

No TVM import here. Errors are ``ValueError`` with a message that names the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mlc_llm.model import MODELS, Model
from mlc_llm.quantization import QUANTIZATION, Quantization

CONFIG_NAME = "mlc-chat-config.json"


def detect_mlc_chat_config(mlc_chat_config: str) -> Path:
    """The path of ``mlc-chat-config.json``: ``mlc_chat_config`` itself when it is a file,
    else the file of that name inside the directory. (The real one also accepts preset
    names and ``HF://`` URLs; the stand-in does not.)"""
    path = Path(mlc_chat_config)
    if not path.exists():
        raise ValueError(f"{path} does not exist.")
    if path.is_dir():
        path = path / CONFIG_NAME
        if not path.is_file():
            raise ValueError(f"Fail to find {CONFIG_NAME} under {path.parent}.")
    return path


def load_config(path: Path) -> dict[str, Any]:
    """The parsed config file; ``ValueError`` when it is not a JSON object."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"Cannot read {path}: {err}") from err
    if not isinstance(config, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return config


def detect_model_type(model_type: str, config: dict[str, Any], path: Path) -> Model:
    """``MODELS[model_type]``; ``"auto"`` reads ``model_type`` from the config (top level,
    else inside ``model_config``). ``ValueError`` names the valid types when unknown."""
    if model_type == "auto":
        inner = config.get("model_config")
        if "model_type" in config:
            model_type = config["model_type"]
        elif isinstance(inner, dict) and "model_type" in inner:
            model_type = inner["model_type"]
        else:
            raise ValueError(
                f"'model_type' not found in: {path}. "
                "Please explicitly specify `--model-type` instead."
            )
    if model_type not in MODELS:
        raise ValueError(f"Unknown model type: {model_type}. Available ones: {list(MODELS)}")
    return MODELS[model_type]


def detect_quantization(
    quantization: str | None, config: dict[str, Any], path: Path
) -> Quantization:
    """``--quantization`` when given, else the config's ``quantization`` field."""
    if quantization is None:
        if "quantization" not in config:
            raise ValueError(
                f"'quantization' not found in: {path}. "
                "Please explicitly specify `--quantization` instead."
            )
        quantization = config["quantization"]
    if quantization not in QUANTIZATION:
        raise ValueError(
            f"Unknown quantization: {quantization}. Available ones: {list(QUANTIZATION)}"
        )
    return QUANTIZATION[quantization]
