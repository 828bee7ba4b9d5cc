"""The MLC-LLM backend, exercised through ``mlc_llm``: the real one where it is importable
here, else the stand-in under tests/mlc_standin (the real one is not on PyPI; on CI and
most machines the stand-in is the one used). The stand-in is added after everything else
on the path, so it never hides a real install. It honours MLC's command line and config
registry and builds real, loadable TVM libraries, so compiling and loading are real; the
key is checked against MLC's own recipe computed here independently.

Tests that use the stand-in's own hooks (its compile counter, forced failures, a faked
version, its numpy reference) are marked :data:`STANDIN_ONLY`: skipped where the real
``mlc_llm`` is installed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Project
from pytest_mlcjit import JIT, CacheMissError, CompileError, JitDisabledError, Settings, SpecError
from pytest_mlcjit.compiler.backends import locate
from pytest_mlcjit.compiler.backends.mlc import MLCModel, mlc_llm_installed, override_string
from pytest_mlcjit.plugin.progress import end_line

STANDIN = Path(__file__).parent / "mlc_standin"
#: Whether a real ``mlc_llm`` is importable here: decided when this module is imported,
#: before any test has put the stand-in on a path.
REAL_MLC_LLM = mlc_llm_installed()
#: The test needs the stand-in's test hooks (``MLC_STANDIN_*``, ``mlc_llm.standin``).
STANDIN_ONLY = pytest.mark.skipif(REAL_MLC_LLM, reason="uses the mlc_llm stand-in's test "
                                  "hooks; the real mlc_llm is installed here")
O2 = ("flashinfer=1;cublas_gemm=1;faster_transformer=0;cudagraph=1;cutlass=1;"
      "ipc_allreduce_strategy=NONE")


def use_mlc_llm(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``mlc_llm`` importable in this process and in every subprocess: the real one
    where it is installed (nothing changes then), else the stand-in, appended to
    ``sys.path`` and ``PYTHONPATH`` so that it hides nothing. Undone by ``monkeypatch``."""
    if REAL_MLC_LLM:
        return
    monkeypatch.setattr(sys, "path", [*sys.path, str(STANDIN)])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [*filter(None, [os.environ.get("PYTHONPATH")]), str(STANDIN)]))


@pytest.fixture
def standin(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """``mlc_llm`` for this test (:func:`use_mlc_llm`), and the stand-in's compile counter
    (``MLC_STANDIN_COUNT_FILE``: one JSON line per real compilation, written by its compile
    command; the real ``mlc_llm`` writes none). The ``mlc_llm`` modules the test imports
    into this process are forgotten afterwards, so that later runs in this process see
    only what their own path holds."""
    use_mlc_llm(monkeypatch)
    counter = tmp_path / "mlc-compiles.txt"
    monkeypatch.setenv("MLC_STANDIN_COUNT_FILE", str(counter))
    before = set(sys.modules)
    yield counter
    for name in set(sys.modules) - before:
        if name == "mlc_llm" or name.startswith("mlc_llm."):
            del sys.modules[name]


def _make_model_dir(path: Path) -> Path:
    """tests/mlc_standin/make_model_dir.py (a plain helper, loaded from its file)."""
    spec = importlib.util.spec_from_file_location("make_model_dir",
                                                  STANDIN / "make_model_dir.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    made: Path = module.make_model_dir(path)
    return made


@pytest.fixture
def model_dir(tmp_path: Path, standin: Path) -> Path:
    return _make_model_dir(tmp_path / "Llama-q4f16_1-MLC")


def _engine(root: Path, policy: str = "ON", run_id: str | None = None) -> JIT:
    kwargs: dict[str, Any] = {"run_id": run_id} if run_id else {}
    return JIT(Settings(cache_dir=root, policy=policy, **kwargs))  # type: ignore[arg-type]


def _count(counter: Path) -> int:
    return len(counter.read_text().splitlines()) if counter.exists() else 0


def _expected_key(model_dir: Path, overrides: dict[str, Any], device: str,
                  opt_repr: str = O2) -> dict[str, Any]:
    """MLC's recipe, written out independently of the plugin."""
    from mlc_llm.model import MODELS  # mlc_llm's own registry (of whichever is used)

    chat = json.loads((model_dir / "mlc-chat-config.json").read_text())
    model_type, quantization = chat.pop("model_type"), chat.pop("quantization")
    config = chat.pop("model_config")
    config.update(chat)
    config.update({k: v for k, v in overrides.items() if v is not None})
    fields = ["context_window_size", "sliding_window_size", "prefill_chunk_size",
              "attention_sink_size", "max_batch_size", "tensor_parallel_shards",
              "pipeline_parallel_stages", "disaggregation"]
    parts = [f"{f}={overrides[f]}" for f in fields if overrides.get(f) is not None and not (
        f in ("context_window_size", "sliding_window_size", "attention_sink_size")
        and overrides[f] == -1)]
    return {
        "model_config": MODELS[model_type].config.from_dict(config).asdict(),
        "overrides": ";".join(parts), "opt": opt_repr, "device": device,
        "model_type": model_type, "quantization": quantization,
    }


def _md5(key: dict[str, Any]) -> str:
    return hashlib.md5(json.dumps(key, sort_keys=True, indent=2).encode()).hexdigest()


@STANDIN_ONLY
def test_key_and_file_name_match_mlc(model_dir: Path, tmp_path: Path, standin: Path) -> None:
    import numpy as np
    from mlc_llm.standin import reference_forward

    overrides = {"context_window_size": 512, "prefill_chunk_size": 128}
    model = _engine(tmp_path / "home").compile(MLCModel(model_dir, overrides=overrides), "cpu")
    expected = _expected_key(model_dir, overrides, "cpu:0")
    assert list(model.key) == ["model_config", "overrides", "opt", "device", "model_type",
                               "quantization"]
    assert model.key == expected
    assert model.path == tmp_path / "home" / "model_lib" / f"{_md5(expected)}.so"
    assert model.digest == _md5(expected)
    # Loading is real: the stand-in built a TVM library from the config.
    x = np.ones((3, expected["model_config"]["hidden_size"]), "float32")
    np.testing.assert_allclose(model.run("forward", x), reference_forward(
        "llama", expected["model_config"], x), rtol=1e-5, atol=1e-5)
    assert model.model_path == model_dir
    manifest = model.manifest
    assert manifest["toolchain"]["mlc_llm"]["version"] == "0.0.0+standin"
    assert manifest["toolchain"]["tvm"]["version"]
    assert _count(standin) == 1


@pytest.mark.parametrize(("overrides", "expected"), [
    ({}, ""),
    ({"context_window_size": -1, "sliding_window_size": -1, "attention_sink_size": -1}, ""),
    ({"max_batch_size": -1}, "max_batch_size=-1"),
    ({"prefill_chunk_size": None, "context_window_size": 4096}, "context_window_size=4096"),
    ({"disaggregation": True, "tensor_parallel_shards": 2, "context_window_size": 8},
     "context_window_size=8;tensor_parallel_shards=2;disaggregation=True"),
])
def test_override_string(overrides: dict[str, Any], expected: str) -> None:
    assert override_string(MLCModel("x", overrides=overrides).overrides) == expected


def test_int_and_numeric_str_give_one_key(model_dir: Path, tmp_path: Path) -> None:
    jit = _engine(tmp_path / "home")
    a = jit.request(MLCModel(model_dir, overrides={"context_window_size": 2048}), "cpu")
    b = jit.request(MLCModel(model_dir, overrides={"context_window_size": "2048"}), "cpu")
    assert a.digest == b.digest
    assert a.key["model_config"]["context_window_size"] == 2048


def test_minus_one_is_kept_in_the_config(model_dir: Path, tmp_path: Path) -> None:
    """-1 is skipped in the override string but still set in model_config, as MLC does."""
    req = _engine(tmp_path / "home").request(
        MLCModel(model_dir, overrides={"context_window_size": -1}), "cpu")
    assert req.key["overrides"] == ""
    assert req.key == _expected_key(model_dir, {"context_window_size": -1}, "cpu:0")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"overrides": {"context_size": 1}}, "unknown MLC override(s) 'context_size'; valid: "
                                         "context_window_size, sliding_window_size"),
    ({"overrides": {"max_batch_size": "many"}}, "invalid override max_batch_size='many'"),
    ({"overrides": {"max_batch_size": 1.5}}, "invalid override max_batch_size=1.5"),
    ({"overrides": {"disaggregation": 1}}, "invalid override disaggregation=1: expected True"),
    ({"opt": "O9"}, "invalid opt 'O9': expected one of O0, O1, O2, O3 or flags"),
    ({"opt": "turbo=1"}, "invalid opt 'turbo=1'"),
    ({"target": "xbox"}, "invalid MLC target 'xbox': expected one of iphone, macabi, android"),
    ({"system_lib_prefix": "a/b"}, "invalid system_lib_prefix 'a/b'"),
])
def test_bad_mlc_specs(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError) as info:
        MLCModel("dist/model", **kwargs)
    assert message in str(info.value)


def test_not_a_model_directory(tmp_path: Path, standin: Path) -> None:
    with pytest.raises(SpecError, match=r"is not an MLC model directory: it has no "
                                        r"mlc-chat-config\.json"):
        _engine(tmp_path / "home").compile(MLCModel(tmp_path), "cpu")
    assert not (tmp_path / "home" / "model_lib").exists()


def test_opt_flags_are_parsed_by_mlc(model_dir: Path, tmp_path: Path) -> None:
    req = _engine(tmp_path / "home").request(MLCModel(model_dir, opt="O0"), "cpu")
    assert req.key["opt"] == ("flashinfer=0;cublas_gemm=0;faster_transformer=0;cudagraph=0;"
                              "cutlass=0;ipc_allreduce_strategy=NONE")
    flags = _engine(tmp_path / "home").request(
        MLCModel(model_dir, opt="flashinfer=0;cudagraph=1"), "cpu")
    assert flags.key["opt"] != req.key["opt"]


def test_packaging_target_double_hash(model_dir: Path, tmp_path: Path, standin: Path) -> None:
    model = _engine(tmp_path / "home").compile(MLCModel(model_dir, target="android"), None)
    first = _expected_key(model_dir, {}, "android")
    prefix = f"llama_q4f16_1_{_md5(first)}"
    assert model.system_lib_prefix == prefix
    assert model.key == {**first, "system_lib_prefix": prefix}
    assert model.path.name == f"{_md5(model.key)}.tar"
    assert not model.loadable
    log = model.path.with_name(model.path.name.replace(".tar", ".log")).read_text()
    assert f"--system-lib-prefix {prefix}_" in log
    explicit = _engine(tmp_path / "home").request(
        MLCModel(model_dir, target="iphone", system_lib_prefix="mine"), None)
    assert explicit.key["system_lib_prefix"] == "mine"
    assert explicit.digest == _md5({**_expected_key(model_dir, {}, "iphone"),
                                    "system_lib_prefix": "mine"})


def test_dso_suffix_from_env(model_dir: Path, tmp_path: Path,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLC_DSO_SUFFIX", "dylib")
    req = _engine(tmp_path / "home").request(MLCModel(model_dir), "cpu")
    assert locate(req, tmp_path).library.name == f"{req.digest}.dylib"
    android = _engine(tmp_path / "home").request(MLCModel(model_dir, target="android"), None)
    assert locate(android, tmp_path).library.suffix == ".tar"


def test_mlc_llm_home_is_the_default_root(model_dir: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLC_LLM_HOME", str(tmp_path / "mlc-home"))
    model = JIT(Settings()).compile(MLCModel(model_dir), "cpu")
    assert model.path.parent == tmp_path / "mlc-home" / "model_lib"


@STANDIN_ONLY
def test_stale_toolchain(model_dir: Path, tmp_path: Path, standin: Path,
                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLC_STANDIN_VERSION", "1.0")
    first = _engine(tmp_path / "home").compile(MLCModel(model_dir), "cpu")
    monkeypatch.setenv("MLC_STANDIN_VERSION", "2.0")
    with pytest.raises(CacheMissError, match=r"is stale for key .*built by mlc_llm 1\.0 .*"
                                             r"installed is mlc_llm 2\.0"):
        _engine(tmp_path / "home", "READONLY").compile(MLCModel(model_dir), "cpu")
    second = _engine(tmp_path / "home").compile(MLCModel(model_dir), "cpu")
    assert second.path == first.path, "same MLC file name, rebuilt in place atomically"
    assert not second.hit
    assert second.manifest["toolchain"]["mlc_llm"]["version"] == "2.0"
    assert _count(standin) == 2


def _mlc_compile_by_hand(model_dir: Path, output: Path) -> None:
    """What MLC's own JIT does on a miss: run `mlc_llm compile`, put the file in place."""
    output.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "mlc_llm", "compile", str(model_dir), "--opt", "O2",
                    "--overrides", "", "--device", "cpu:0", "--output", str(output)],
                   check=True, capture_output=True)


@STANDIN_ONLY
def test_adopts_a_library_mlc_put_there(model_dir: Path, tmp_path: Path, standin: Path) -> None:
    root = tmp_path / "home"
    req = _engine(root).request(MLCModel(model_dir), "cpu")
    _mlc_compile_by_hand(model_dir, locate(req, root).library)
    assert _count(standin) == 1
    # READONLY uses it without writing anything.
    ro = _engine(root, "READONLY").compile(MLCModel(model_dir), "cpu")
    assert ro.hit
    assert ro.manifest["adopted"]
    assert not locate(req, root).manifest.exists()
    # ON adopts it: a manifest is written; nothing is compiled.
    on = _engine(root).compile(MLCModel(model_dir), "cpu")
    assert on.hit
    assert json.loads(locate(req, root).manifest.read_text())["adopted"] is True
    assert _count(standin) == 1


@pytest.mark.reliability  # default tier: test_adopts_a_library_mlc_put_there, test_corruption
@STANDIN_ONLY
def test_an_unloadable_library_without_manifest_is_replaced(
    model_dir: Path, tmp_path: Path, standin: Path
) -> None:
    root = tmp_path / "home"
    req = _engine(root).request(MLCModel(model_dir), "cpu")
    locate(req, root).library.parent.mkdir(parents=True)
    locate(req, root).library.write_bytes(b"\x7fELF truncated")
    with pytest.raises(CacheMissError, match=r"is corrupt .*does not load"):
        _engine(root, "READONLY").compile(MLCModel(model_dir), "cpu")
    model = _engine(root).compile(MLCModel(model_dir), "cpu")
    assert not model.hit
    assert _count(standin) == 1


@STANDIN_ONLY
@pytest.mark.parametrize(("mode", "message"), [
    ("exit", "the compiler exited with code 1"),
    ("nooutput", "the compiler exited 0 but wrote no library at lib.so"),
])
def test_compile_failures(model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                          mode: str, message: str) -> None:
    monkeypatch.setenv("MLC_STANDIN_FAIL", mode)
    engine = _engine(tmp_path / "home")
    with pytest.raises(CompileError) as info:
        engine.compile(MLCModel(model_dir), "cpu")
    assert message in str(info.value)
    assert "compile log: " in str(info.value)
    assert not list((tmp_path / "home" / "model_lib").glob("*.so"))
    # The live progress's end line of the job says it failed, never "compiled" (issue 19).
    [job] = [j for j in engine.board.record()["jobs"] if j["kind"] == "compile"]
    assert " failed after " in end_line({**job, "label": "main"}, job["ended"]), job


def test_off_and_readonly_messages(model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(JitDisabledError, match="policy OFF"):
        _engine(tmp_path / "home", "OFF").compile(MLCModel(model_dir), "cpu")
    with pytest.raises(CacheMissError, match=r"no cached library for key [0-9a-f]{32} "
                                             r"\(Llama-q4f16_1-MLC \(overrides none, opt O2, "
                                             r"device cpu:0\)\).*READONLY"):
        _engine(tmp_path / "home", "READONLY").compile(MLCModel(model_dir), "cpu")


@pytest.mark.reliability  # slow (two MLC compiles); the staging rules: test_isolation
def test_mlc_temp_dir(model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    temp = tmp_path / "mlc-temp"
    temp.mkdir()
    monkeypatch.setenv("MLC_TEMP_DIR", str(temp))
    model = _engine(tmp_path / "home").compile(MLCModel(model_dir), "cpu")
    log = model.path.with_suffix(".log").read_text()
    assert f"staging in MLC_TEMP_DIR={temp}" in log
    if Path("/dev/shm").is_dir() and os.stat("/dev/shm").st_dev != os.stat(tmp_path).st_dev:
        monkeypatch.setenv("MLC_TEMP_DIR", "/dev/shm")
        other = _engine(tmp_path / "home").compile(MLCModel(model_dir, opt="O0"), "cpu")
        log = other.path.with_suffix(".log").read_text()
        assert "MLC_TEMP_DIR=/dev/shm not used: it is on another filesystem" in log


MLC_TESTS = '''
import pytest

MODEL = {model_dir!r}

@pytest.mark.parametrize("i", range(3))
@pytest.mark.parametrize("compiled_model", [MODEL], indirect=True)
def test_default(compiled_model, i):
    assert compiled_model.path.parent.name == "model_lib"

@pytest.mark.parametrize("i", range(3))
@pytest.mark.mlc_model(MODEL, overrides={{"context_window_size": 512}}, opt="O3")
def test_overridden(compiled_model, i, mlc_device):
    assert compiled_model.device == mlc_device
    assert compiled_model.model_path.name == "Llama-q4f16_1-MLC"
    assert compiled_model.key["overrides"] == "context_window_size=512"

@pytest.mark.mlc_model(MODEL, target="android")
def test_android(compiled_model):
    assert compiled_model.path.suffix == ".tar"
    assert compiled_model.system_lib_prefix.startswith("llama_q4f16_1_")
'''


@pytest.mark.reliability  # default tier: test_xdist's one compile per key under -n 2
@STANDIN_ONLY
def test_n2_compiles_each_mlc_key_once(project: Project, model_dir: Path,
                                       standin: Path) -> None:
    """Two xdist workers (the subject) ask for the same three MLC keys."""
    project.pytester.makepyfile(test_mlc_models=MLC_TESTS.format(model_dir=str(model_dir)))
    result = project.run("-n", "2", "--mlc-device=cpu", "-v")
    result.assert_outcomes(passed=7)
    out = result.stdout.str()
    assert "PASSED test_mlc_models.py::test_android[target-android]" in out
    assert "PASSED test_mlc_models.py::test_default[cpu-Llama-q4f16_1-MLC-0]" in out
    assert _count(standin) == 3, "three distinct keys, each compiled once"
    keys = {json.loads(line)["overrides"] for line in standin.read_text().splitlines()}
    assert keys == {"", "context_window_size=512"}
    project.run("-n", "2", "--mlc-device=cpu").assert_outcomes(passed=7)
    assert _count(standin) == 3


@pytest.mark.skipif(REAL_MLC_LLM, reason="the real mlc_llm is installed here")
def test_skipped_when_mlc_llm_is_missing(project: Project, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the stand-in on the path there is no mlc_llm: the tests of an existing MLC
    model directory are skipped at collection (a missing one fails: tests/test_first_day.py)."""
    for name in [n for n in sys.modules if n == "mlc_llm" or n.startswith("mlc_llm.")]:
        monkeypatch.delitem(sys.modules, name)  # left by another test: not on the path now
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "mlc-chat-config.json").write_text(
        '{"model_type": "llama", "quantization": "q4f16_1", "model_config": {}}')
    project.pytester.makepyfile(test_mlc_models=MLC_TESTS.format(model_dir=str(tmp_path / "m")))
    result = project.run("--mlc-device=cpu", "-rs")
    result.assert_outcomes(skipped=7)
    result.stdout.fnmatch_lines(["*mlc_llm is not installed*"])
    assert not (project.cache / "model_lib").exists(), "nothing compiled"


def test_header_names_the_mlc_root(project: Project, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLC_LLM_HOME", str(tmp_path / "mlc-home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    result = project.run("--co", "--mlc-device=cpu", cache=False)
    result.stdout.fnmatch_lines([f"mlcjit: policy=ON, devices=cpu (present), "
                                 f"cache={tmp_path / 'xdg' / 'pytest-mlcjit'} "
                                 f"(MLC: {tmp_path / 'mlc-home'})"])


def test_a_readonly_request_in_an_on_run_writes_nothing(model_dir: Path, tmp_path: Path) -> None:
    """The request's policy, not the run's, decides every write: a READONLY request in an
    ON run leaves the cache untouched (no MLC key memo either)."""
    home = tmp_path / "home"
    engine = _engine(home, "ON")
    with pytest.raises(CacheMissError, match="READONLY"):
        engine.compile(MLCModel(model_dir), "cpu", policy="READONLY")
    assert not home.exists() or not any(home.rglob("*")), sorted(home.rglob("*"))
    # The run's own policy still writes: keying alone writes the memo (no compile needed).
    engine.request(MLCModel(model_dir), "cpu")
    (run,) = (home / ".mlcjit" / "mlckeys").iterdir()
    assert len(list(run.glob("*.json"))) == 1, "the key memo of this run"
    assert not (home / "model_lib").exists()
