"""A small decoder-only transformer: logits against numpy, causality, and GPU libraries
cross-compiled on a machine that may have no GPU."""

from __future__ import annotations

import numpy as np
import pytest

from examples.reference import transformer_forward
from pytest_mlcjit import CompiledModel, TVMModel

TWO_LAYERS = TVMModel("examples.models.transformer:build", config={"layers": 2, "heads": 2})
FOUR_HEADS = TVMModel("examples.models.transformer:build",
                      config={"layers": 3, "heads": 4, "hidden": 64, "ffn": 128})


def _tokens(seed: int, vocab: int = 64, seq: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(1, seq)).astype("int32")


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("compiled_model", [TWO_LAYERS, FOUR_HEADS], indirect=True)
def test_logits_match_numpy(compiled_model: CompiledModel, seed: int) -> None:
    tokens = _tokens(seed)
    logits = compiled_model.run("forward", tokens)
    heads = compiled_model.spec.config["heads"]
    expected = transformer_forward(compiled_model.params, tokens, heads=heads)
    assert logits.shape == (1, 8, 64)
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.mlc_model(TWO_LAYERS)
def test_attention_is_causal(compiled_model: CompiledModel) -> None:
    tokens = _tokens(3)
    changed = tokens.copy()
    changed[0, -1] = (changed[0, -1] + 1) % 64
    a = compiled_model.run("forward", tokens)
    b = compiled_model.run("forward", changed)
    np.testing.assert_array_equal(a[:, :-1], b[:, :-1])
    assert not np.allclose(a[:, -1], b[:, -1])


GPU_TARGETS = {
    "cuda-sm90": {"kind": "cuda", "arch": "sm_90"},
    "opencl": {"kind": "opencl"},
    "webgpu": {"kind": "webgpu"},
}


@pytest.mark.parametrize(
    "compiled_model",
    [TVMModel("examples.models.transformer:build", config={"layers": 2}, target=target)
     for target in GPU_TARGETS.values()],
    ids=list(GPU_TARGETS), indirect=True)
def test_cross_compiles_for_gpus(compiled_model: CompiledModel) -> None:
    """Compile-only: GPU libraries built here, whether or not the GPU is present."""
    kind = compiled_model.target["kind"]
    assert compiled_model.device.kind == kind
    assert compiled_model.path.stat().st_size > 0
    assert compiled_model.manifest["target_str"].startswith(f'{{"kind":"{kind}"')
