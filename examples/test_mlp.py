"""The MLP example: numerics against numpy, on every selected device, one compile per
config for all xdist workers."""

from __future__ import annotations

import numpy as np
import pytest

from examples.reference import mlp_forward
from pytest_mlcjit import CompiledModel, TVMModel

SMALL = TVMModel("examples.models.mlp:build", config={"hidden": 32})
WIDE = TVMModel("examples.models.mlp:build", config={"hidden": 128, "batch": 4})


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.mlc_model(SMALL)
def test_forward_matches_numpy(compiled_model: CompiledModel, seed: int) -> None:
    x = np.random.default_rng(seed).standard_normal((2, 16)).astype("float32")
    out = compiled_model.run("forward", x)
    np.testing.assert_allclose(out, mlp_forward(compiled_model.params, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("compiled_model", [SMALL, WIDE], indirect=True)
def test_configs_by_indirect_parametrization(compiled_model: CompiledModel) -> None:
    batch = compiled_model.spec.config.get("batch", 2)
    x = np.ones((batch, 16), dtype="float32")
    out = compiled_model.run("forward", x)
    assert out.shape == (batch, 4)
    np.testing.assert_allclose(out, mlp_forward(compiled_model.params, x), rtol=1e-5, atol=1e-6)


@pytest.mark.mlc_model(SMALL)
def test_own_parameters(compiled_model: CompiledModel) -> None:
    params = {p["name"]: np.zeros([int(d) for d in p["shape"]], p["dtype"])
              for p in compiled_model.param_specs}
    params["fc2.bias"] = np.arange(4, dtype="float32")
    out = compiled_model.run("forward", np.ones((2, 16), "float32"), params=params)
    np.testing.assert_array_equal(out, np.tile(np.arange(4, dtype="float32"), (2, 1)))


@pytest.mark.mlc_model(SMALL)
def test_manifest_describes_the_library(compiled_model: CompiledModel) -> None:
    manifest = compiled_model.manifest
    assert manifest["functions"] == ["forward"]
    assert [p["name"] for p in compiled_model.param_specs] == [
        "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert manifest["size"] == compiled_model.path.stat().st_size
    assert manifest["key"]["config"] == {"hidden": 32}
