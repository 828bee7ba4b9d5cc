"""CompiledModel.signature() and run() (issue 15, item 3): the functions' inputs recorded at
compile time, inputs by position or by name, checked before TVM is called, errors that list
what the function takes and what was given, ``R.Shape`` results as :class:`Shape`, and the
parameters of IRModules that keep them as inputs.

Every model here is compiled for real (once per session, shared by the xdist workers) and
run on the CPU; the ONNX model is imported by TVM's real ONNX importer.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest

from pytest_mlcjit import (
    CompiledModel,
    CorruptEntryError,
    InputError,
    MlcJitError,
    Shape,
    TVMModel,
    jit,
)
from pytest_mlcjit.cache.manifest import Manifest, parse_manifest

#: An nn.Module with a symbolic batch and two functions sharing the parameters.
NN_MODEL = '''
from tvm.relax.frontend import nn


class Net(nn.Module):
    def __init__(self):
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return nn.relu(self.fc(x))

    def pair(self, x, y):
        return self.fc(x) + self.fc(y)


def build():
    spec = {"forward": {"x": nn.spec.Tensor(("n", 8), "float32")},
            "pair": {"x": nn.spec.Tensor(("n", 8), "float32"),
                     "y": nn.spec.Tensor(("n", 8), "float32")}}
    return Net(), spec
'''

#: A real ONNX model, built with onnx.helper, imported by TVM's own ONNX importer: one Gemm
#: whose input is "gpu_0.data_0", a name the importer renames to "gpu_0_data_0" (it replaces
#: dots; TVM 0.27 keeps a "/" as it is), and whose weights, kept as inputs
#: (keep_params_in_input=True), follow it in `main`, with the attribute num_input=1.
ONNX_MODEL = '''
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from tvm.relax.frontend.onnx import from_onnx


def build(batch=1):
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((4, 3)).astype("float32"), "fc_w_0"),
               numpy_helper.from_array(rng.standard_normal(4).astype("float32"), "fc_b_0")]
    gemm = helper.make_node("Gemm", ["gpu_0.data_0", "fc_w_0", "fc_b_0"], ["fc_0"], transB=1)
    graph = helper.make_graph(
        [gemm], "fc",
        [helper.make_tensor_value_info("gpu_0.data_0", TensorProto.FLOAT, [batch, 3])],
        [helper.make_tensor_value_info("fc_0", TensorProto.FLOAT, [batch, 4])],
        initializer=weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    return from_onnx(model, keep_params_in_input=True)
'''

#: Results that are not one tensor: an R.Shape, and a tuple.
SHAPES = '''
import tvm
from tvm.script import relax as R


@tvm.script.ir_module
class Module:
    @R.function
    def shape_of(x: R.Tensor(("n", "m"), "float32")) -> R.Shape(ndim=2):
        return R.shape_of(x)

    @R.function
    def both(x: R.Tensor(("n", 4), "float32"), y: R.Tensor(("n", 4), "float32")):
        return (R.add(x, y), x)


def build():
    return Module
'''


@dataclasses.dataclass
class Models:
    net: CompiledModel
    onnx: CompiledModel
    shapes: CompiledModel


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Models]:
    """The three models, compiled once per session into one cache that the xdist workers
    share (the plugin's own locks make the second worker wait for, then hit, the first's
    compiles; the factories are written once, under a lock, byte for byte the same)."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    root = base / "mlcjit-run-models"
    with FileLock(f"{root}.lock"):
        root.mkdir(exist_ok=True)
        for name, source in (("runnet", NN_MODEL), ("runonnx", ONNX_MODEL),
                             ("runshapes", SHAPES)):
            if not (root / f"{name}.py").exists():
                (root / f"{name}.py").write_text(source)
    sys.path.insert(0, str(root))  # the compile subprocess gets this process's sys.path
    try:
        cache = root / "cache"
        yield Models(
            net=jit(TVMModel("runnet:build"), "cpu", cache_dir=cache),
            onnx=jit(TVMModel("runonnx:build"), "cpu", cache_dir=cache),
            shapes=jit(TVMModel("runshapes:build"), "cpu", cache_dir=cache))
    finally:
        sys.path.remove(str(root))


# -- signature() ---------------------------------------------------------------------------
def test_signature_names_shapes_and_dtypes(models: Models) -> None:
    sigs = models.net.signature()
    assert sorted(sigs) == ["forward", "pair"]
    forward = models.net.signature("forward")
    assert forward is sigs["forward"]
    (x,) = forward.inputs
    assert (x.name, x.kind, x.shape, x.dtype) == ("x", "tensor", ("n", 8), "float32")
    assert [p.name for p in forward.params] == ["fc.weight", "fc.bias"]
    assert [p.shape for p in forward.params] == [(4, 8), (4,)]
    assert forward.output is not None
    assert forward.output.shape == ("n", 4)
    assert sigs["pair"].input_names == ["x", "y"]
    assert str(forward) == "forward(x: float32[n, 8]) + 2 parameters from params"


def test_signature_of_an_importer_module(models: Models) -> None:
    main = models.onnx.signature("main")
    assert main.input_names == ["gpu_0_data_0"], "the name the importer gave the input"
    assert [(p.name, p.shape) for p in main.params] == [("fc_w_0", (4, 3)), ("fc_b_0", (4,))]
    assert models.onnx.manifest["signatures"]["main"]["inputs"][0]["name"] == "gpu_0_data_0"


def test_signature_of_an_unknown_function_lists_the_functions(models: Models) -> None:
    with pytest.raises(InputError) as info:
        models.net.signature("fwd")
    message = str(info.value)
    assert "has no function 'fwd'" in message
    assert "forward(x: float32[n, 8]) + 2 parameters from params" in message
    assert "pair(x: float32[n, 8], y: float32[n, 8])" in message


# -- run(): by position and by name, checked -------------------------------------------------
def _forward(params: dict[str, Any], x: Any) -> Any:
    return np.maximum(x @ params["fc.weight"].T + params["fc.bias"], 0)


def test_run_by_position_and_by_name(models: Models) -> None:
    net = models.net
    x = np.random.default_rng(0).standard_normal((3, 8)).astype("float32")
    expected = _forward(net.params, x)
    np.testing.assert_allclose(net.run("forward", x), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(net.run("forward", x=x), expected, rtol=1e-5, atol=1e-5)
    y = np.ones((3, 8), "float32")
    by_name = net.run("pair", y=y, x=x)
    np.testing.assert_allclose(by_name, net.run("pair", x, y), rtol=1e-6)
    np.testing.assert_allclose(net.run("pair", x, y=y), by_name, rtol=1e-6)


def test_run_names_inputs_as_the_importer_did(models: Models) -> None:
    onnx = models.onnx
    assert onnx.param_specs == [{"name": "fc_w_0", "shape": [4, 3], "dtype": "float32"},
                                {"name": "fc_b_0", "shape": [4], "dtype": "float32"}]
    x = np.arange(3, dtype="float32").reshape(1, 3)
    params = onnx.params
    expected = x @ params["fc_w_0"].T + params["fc_b_0"]
    np.testing.assert_allclose(onnx.run("main", gpu_0_data_0=x), expected, rtol=1e-6)
    np.testing.assert_allclose(onnx.run("main", x), expected, rtol=1e-6)
    mine = {"fc_w_0": np.ones((4, 3), "float32"), "fc_b_0": np.zeros(4, "float32")}
    np.testing.assert_allclose(onnx.run("main", x, params=mine), [[3.0] * 4])


@pytest.mark.parametrize(("call", "message"), [
    (lambda m: m.run("fwd", np.ones((2, 8), "float32")),
     "has no function 'fwd'; its functions: forward(x: float32[n, 8]) + 2 parameters from "
     "params; pair(x: float32[n, 8], y: float32[n, 8]) + 2 parameters from params"),
    (lambda m: m.run("forward"),
     "forward is missing input x. Expected forward(x: float32[n, 8]) + 2 parameters from "
     "params; given (nothing)"),
    (lambda m: m.run("pair", np.ones((2, 8), "float32")),
     "pair is missing input y. Expected pair(x: float32[n, 8], y: float32[n, 8]) + 2 "
     "parameters from params; given (float32[2, 8])"),
    (lambda m: m.run("forward", np.ones((2, 8), "float32"), np.ones((2, 8), "float32")),
     "forward takes 1 input, 2 were given by position"),
    (lambda m: m.run("forward", data=np.ones((2, 8), "float32")),
     "forward has no input named data. Expected forward(x: float32[n, 8])"),
    (lambda m: m.run("forward", np.ones((2, 8), "float32"), x=np.ones((2, 8), "float32")),
     "input 'x' of forward was given both by position and by name"),
    (lambda m: m.run("forward", np.ones((2, 8))),
     "input 'x' of forward must be float32, got float64 (numpy's default for floats): pass "
     "x.astype('float32'). Expected forward(x: float32[n, 8]) + 2 parameters from params; "
     "given (float64[2, 8])"),
    (lambda m: m.run("forward", np.ones((2, 7), "float32")),
     "input 'x' of forward must have shape float32[n, 8], got float32[2, 7]"),
    (lambda m: m.run("forward", np.ones(8, "float32")),
     "input 'x' of forward must have shape float32[n, 8], got float32[8]"),
    (lambda m: m.run("pair", np.ones((2, 8), "float32"), np.ones((3, 8), "float32")),
     "input 'y' of pair has n=3 (shape [3, 8]), but input 'x' set n=2"),
])
def test_run_checks_its_inputs_before_tvm(models: Models, call: object,
                                          message: str) -> None:
    with pytest.raises(InputError) as info:
        call(models.net)  # type: ignore[operator]
    assert message in str(info.value)
    assert isinstance(info.value, MlcJitError)
    assert isinstance(info.value, TypeError)


def test_run_converts_lists_to_the_input_dtype(models: Models) -> None:
    x = [[0.5] * 8, [1.0] * 8]  # numpy would make float64 of these
    out = models.net.run("forward", x)
    np.testing.assert_allclose(out, _forward(models.net.params,
                                             np.asarray(x, "float32")), rtol=1e-5)
    with pytest.raises(InputError, match="cannot be made a float32"):
        models.net.run("forward", [["a"] * 8])


def test_run_reports_missing_parameters(models: Models) -> None:
    with pytest.raises(MlcJitError, match=r"params must have exactly \['fc.weight', "):
        models.net.run("forward", np.ones((2, 8), "float32"), params={"fc.weight": 0})


# -- results ---------------------------------------------------------------------------------
def test_a_shape_result_is_a_shape_not_a_tuple(models: Models) -> None:
    out = models.shapes.run("shape_of", np.zeros((2, 5), "float32"))
    assert type(out) is Shape
    assert not isinstance(out, tuple)
    assert out == (2, 5)
    assert out == [2, 5]
    assert out == Shape([2, 5])
    assert list(out) == [2, 5]
    assert out[1] == 5
    assert len(out) == 2
    assert repr(out) == "Shape(2, 5)"
    assert models.shapes.signature("shape_of").output.kind == "shape"  # type: ignore[union-attr]


def test_a_tuple_result_is_a_tuple_of_arrays(models: Models) -> None:
    x, y = np.ones((3, 4), "float32"), np.full((3, 4), 2.0, "float32")
    out = models.shapes.run("both", x, y)
    assert type(out) is tuple
    assert len(out) == 2
    np.testing.assert_array_equal(out[0], x + y)
    np.testing.assert_array_equal(out[1], x)
    assert models.shapes.signature("both").params == ()


# -- entries without signatures, and the manifest field ------------------------------------------
def test_an_entry_without_signatures(models: Models) -> None:
    manifest = cast(Manifest, {k: v for k, v in models.net.manifest.items()
                               if k != "signatures"})
    old = dataclasses.replace(models.net, manifest=manifest, _vm=None, _signatures=None)
    with pytest.raises(MlcJitError, match=r"records no signatures.*--mlc-jit-policy=REDO"):
        old.signature()
    x = np.ones((2, 8), "float32")
    np.testing.assert_allclose(old.run("forward", x), _forward(old.params, x), rtol=1e-5)
    with pytest.raises(InputError, match=r"by position only \(given by name: \['x'\]\)"):
        old.run("forward", x=x)
    with pytest.raises(InputError, match="has no function 'fwd'; its functions: forward; pair"):
        old.run("fwd", x)


def test_the_manifest_field_is_validated(models: Models, tmp_path: Path) -> None:
    good: dict[str, Any] = dict(models.net.manifest)
    digest = str(good["digest"])
    assert parse_manifest(json.dumps(good).encode(), tmp_path, digest)["signatures"]
    del good["signatures"]
    assert "signatures" not in parse_manifest(json.dumps(good).encode(), tmp_path, digest)
    with pytest.raises(CorruptEntryError, match="has an invalid name 42"):
        parse_manifest(json.dumps({**good, "name": 42}).encode(), tmp_path, digest)
    bad: Any
    for bad in ([], {"forward": {"inputs": "x"}},
                {"forward": {"inputs": [{"name": "x", "kind": "tensor", "shape": [1.5]}],
                             "params": []}},
                {"forward": {"inputs": [{"name": 1, "kind": "tensor"}], "params": []}}):
        with pytest.raises(CorruptEntryError, match="has an invalid signatures"):
            parse_manifest(json.dumps({**good, "signatures": bad}).encode(), tmp_path, digest)
