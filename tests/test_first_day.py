"""Issue 15, a new user's first day: each item on the bad input and on the good one.

1. Marker, spec and parametrization errors fail only their own tests, at setup; the
   collection never aborts for them, under ``-n`` or not.
2. ``mlc_model("module:function")`` and a directory that does not exist are errors; only an
   existing MLC model directory without ``mlc_llm`` is skipped.
4. ``--mlc-jit-require-devices`` (and its ini key) fails the tests of an absent device.
5. ``TVM_TEST_TARGETS`` selects the devices; GPU tests get the ``gpu`` marker.
7. The small things: CLI exit statuses, dry runs that name the quarantine, ``list``'s
   model column, ``explain --check``, prepare's counts, tuples in configs, and the docs'
   test ids and ``CompiledModel`` table (docs/reference/specs.md).

(Item 3, ``run`` and ``signature``, is tests/test_run.py; item 6, packaging,
tests/test_packaging.py.) These tests assume no CUDA GPU (true on CI); where one is present
the tests that need an absent one are skipped.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

from conftest import Project, inprocess, run_cli
from pytest_mlcjit import CompiledModel, SpecError, TVMModel
from pytest_mlcjit.device import Device, probe

DOCS = Path(__file__).resolve().parent.parent / "docs"
#: The docs page of model specs, markers, fixtures and CompiledModel (once the README's).
SPECS_PAGE = DOCS / "reference" / "specs.md"


def docs_text() -> str:
    """Every page of the docs site, as written in ``docs/``."""
    return "\n".join(p.read_text(encoding="utf-8") for p in sorted(DOCS.rglob("*.md")))
NO_CUDA = pytest.mark.skipif(probe([Device("cuda")])["cuda"].present,
                             reason="this machine has a CUDA GPU")
NO_MLC_LLM = pytest.mark.skipif(importlib.util.find_spec("mlc_llm") is not None,
                                reason="mlc_llm is installed here")


def _section(out: str, test: str) -> str:
    """The text under ``ERROR at setup of <test>``."""
    parts = re.split(r"_+ ERROR at setup of (\S+) _+\n", out)
    found = dict(zip(parts[1::2], parts[2::2], strict=True))
    return found[test].split("\n___")[0].split("\n===")[0]


# -- 1. errors on the right test -------------------------------------------------------------
BAD_EVERYWHERE = '''
import pytest
from pytest_mlcjit import TVMModel

GOOD = TVMModel("tinymodel:build", config={"hidden": 4})
NOT_JSON = TVMModel("tinymodel:build", config={"hidden": 4, "act": type})
TUPLE = TVMModel("tinymodel:build", config={"hidden": 4, "sizes": (1, 2)})


@pytest.mark.mlc_devices("gpu")
@pytest.mark.mlc_model(GOOD)
def test_gpu_marker(compiled_model):
    pass


@pytest.mark.mlc_devices()
def test_empty_marker(mlc_device):
    pass


@pytest.mark.mlc_model(NOT_JSON)
def test_not_json(compiled_model):
    pass


@pytest.mark.mlc_model(TUPLE)
def test_tuple(compiled_model):
    pass


@pytest.mark.parametrize("compiled_model", [GOOD, NOT_JSON], indirect=True)
def test_params(compiled_model):
    assert compiled_model.spec == GOOD


@pytest.mark.mlc_model(GOOD)
def test_good(compiled_model):
    assert compiled_model.path.exists()
'''


@pytest.mark.parametrize("xdist", [(), ("-n", "2")], ids=["no-xdist", "xdist"])
def test_bad_markers_specs_and_params_fail_only_their_tests(
        project: Project, warm_template: Path, xdist: tuple[str, ...]) -> None:
    """In one process and under ``-n 2`` (xdist collects on every worker: the subject)."""
    project.warm(warm_template)
    project.pytester.makepyfile(test_bad=BAD_EVERYWHERE)
    result = project.run("--mlc-device=cpu", *xdist)
    out = result.stdout.str()
    assert "error during collection" not in out + result.stderr.str()
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.assert_outcomes(passed=2, errors=5)
    gpu = _section(out, "test_gpu_marker[invalid-devices]")
    assert ("test_bad.py::test_gpu_marker: mlc_devices: invalid device 'gpu': expected one of "
            "auto, cpu, cuda, rocm, metal, vulkan, opencl, webgpu") in gpu
    assert "Traceback" not in gpu
    assert "test_bad.py::test_empty_marker: mlc_devices() needs at least one device" in _section(
        out, "test_empty_marker[invalid-devices]")
    for test in ("test_not_json[cpu]", "test_params[cpu-tinymodel-invalid]"):
        assert ("SpecError: config of tinymodel:build must be JSON-serializable (str keys, no "
                "NaN): Object of type type is not JSON serializable (<class 'type'>), at config "
                "key 'act'; use str, int, float, bool, None, lists and dicts") in _section(
                    out, test)
    assert ("SpecError: config key 'sizes' of tinymodel:build is a tuple (1, 2): the config "
            "travels to the factory as JSON, where it would become a list; write it as a "
            "list") in _section(out, "test_tuple[cpu]")
    assert project.compiles() == [], "the good spec hit the warm cache; nothing else compiled"
    assert len(project.manifests()) == 1


def test_collection_keeps_every_test(project: Project) -> None:
    project.pytester.makepyfile(test_bad=BAD_EVERYWHERE)
    result = project.run("--mlc-device=cpu", "--co", "-q")
    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines(["test_bad.py::test_gpu_marker[[]invalid-devices[]]",
                                 "test_bad.py::test_not_json[[]cpu[]]",
                                 "test_bad.py::test_params[[]cpu-tinymodel-invalid[]]",
                                 "7 tests collected*"])


def test_specs_outside_pytest_still_raise_at_once() -> None:
    with pytest.raises(SpecError, match=r"at config key 'layers\[1\]\.act'"):
        TVMModel("a:b", config={"layers": [{}, {"act": object()}]})
    with pytest.raises(SpecError, match="config key 'shape' of a:b is a tuple"):
        TVMModel("a:b", config={"shape": (2, 8)})
    spec = TVMModel("a:b", config={"shape": [2, 8], "act": None, "scale": 0.5})
    assert spec.config == {"shape": [2, 8], "act": None, "scale": 0.5}
    assert spec.error is None


# -- 2. factory strings and paths in mlc_model ---------------------------------------------------
MLC_PATHS = '''
import pytest
from pytest_mlcjit.compiler.backends.mlc import MLCModel

BAD_OVERRIDES = MLCModel("real-model-MLC", overrides={"context_size": 1})

@pytest.mark.mlc_model(BAD_OVERRIDES)
def test_bad_overrides(compiled_model):
    pass

@pytest.mark.mlc_model("models.convnet:build")
def test_factory_string(compiled_model):
    pass

@pytest.mark.mlc_model("no/such/model-MLC")
def test_missing_directory(compiled_model):
    pass

@pytest.mark.parametrize("compiled_model", ["models.convnet:build"], indirect=True)
def test_factory_param(compiled_model):
    pass

@pytest.mark.mlc_model("real-model-MLC")
def test_real_directory(compiled_model):
    pass
'''


@NO_MLC_LLM
def test_mlc_model_strings(project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in sys.modules if n == "mlc_llm" or n.startswith("mlc_llm.")]:
        monkeypatch.delitem(sys.modules, name)  # a stand-in another test imported: not here
    model_dir = project.pytester.path / "real-model-MLC"
    model_dir.mkdir()
    (model_dir / "mlc-chat-config.json").write_text(json.dumps(
        {"model_type": "llama", "quantization": "q4f16_1", "model_config": {}}))
    # Not test_mlc.py: this suite has a module of that name, and the run is in-process.
    project.pytester.makepyfile(test_mlc_paths=MLC_PATHS)
    result = project.run("--mlc-device=cpu", "-rs")
    result.assert_outcomes(skipped=1, errors=4)
    out = result.stdout.str()
    assert "error during collection" not in out
    assert ("SpecError: unknown MLC override(s) 'context_size'; valid: context_window_size, "
            ) in _section(out, "test_bad_overrides[cpu]")
    assert ("SpecError: mlc_model 'models.convnet:build' names a factory, not an MLC model "
            "directory: write @pytest.mark.mlc_model(TVMModel('models.convnet:build'))"
            ) in _section(out, "test_factory_string[cpu]")
    assert ("SpecError: MLC model directory 'no/such/model-MLC' does not exist (relative to "
            ) in _section(out, "test_missing_directory[cpu]")
    assert ("compiled_model parameter 'models.convnet:build' names a factory, not an MLC model "
            "directory: write TVMModel('models.convnet:build')"
            ) in _section(out, "test_factory_param[cpu-models.convnet:build]")
    result.stdout.fnmatch_lines(["SKIPPED*test_mlc_paths.py*: mlc_llm is not installed*"])


# -- 4. --mlc-jit-require-devices ---------------------------------------------------------------
DEVICE_TESTS = '''
import pytest
from pytest_mlcjit import TVMModel

@pytest.mark.mlc_model(TVMModel("tinymodel:build", config={"hidden": 4}))
def test_model(compiled_model):
    assert compiled_model.path.exists()

def test_device_only(mlc_device):
    pass
'''


@NO_CUDA
@pytest.mark.parametrize("how", ["option", "ini", "option-xdist"])
def test_require_devices_fails_an_absent_device(project: Project, warm_template: Path,
                                                how: str) -> None:
    """The option, its ini key, and the option handed to xdist workers (the subject of the
    ``-n 2`` case)."""
    project.warm(warm_template)
    # Not test_devices.py: this suite has a module of that name, and the run is in-process.
    project.pytester.makepyfile(test_devs=DEVICE_TESTS)
    args = ["--mlc-device=cpu,cuda"]
    if how == "ini":
        project.pytester.makeini("[pytest]\nmlc_jit_require_devices = true\n")
    else:
        args.append("--mlc-jit-require-devices")
    if how.endswith("xdist"):
        args += ["-n", "2"]
    result = project.run(*args)
    result.assert_outcomes(passed=2, errors=2)
    assert ("device cuda is not present: no NVIDIA device nodes (/dev/nvidia*) "
            "(--mlc-device=cpu,cuda); --mlc-jit-require-devices makes an absent device fail "
            "its tests instead of skipping them") in _section(result.stdout.str(),
                                                              "test_model[cuda]")
    assert project.compiles() == [], "nothing compiled for the absent device (cpu: a hit)"


@NO_CUDA
def test_without_require_devices_an_absent_device_skips(project: Project,
                                                        warm_template: Path) -> None:
    project.warm(warm_template)
    project.pytester.makepyfile(test_devs=DEVICE_TESTS)
    result = project.run("--mlc-device=cpu,cuda", "-rs")
    result.assert_outcomes(passed=2, skipped=2)
    result = project.run("--mlc-device=cpu", "--mlc-jit-require-devices")
    result.assert_outcomes(passed=2)


def test_bad_require_devices_ini(project: Project) -> None:
    project.pytester.makepyfile(test_devs=DEVICE_TESTS)
    project.pytester.makeini("[pytest]\nmlc_jit_require_devices = sometimes\n")
    result = project.run("--mlc-device=cpu")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert ("invalid ini mlc_jit_require_devices 'sometimes': expected true or false"
            in result.stderr.str())


# -- 5. TVM's conventions: TVM_TEST_TARGETS and the gpu marker -------------------------------------
TVM_STYLE = '''
import pytest
from pytest_mlcjit import TVMModel

@pytest.mark.parametrize("compiled_model", [TVMModel("tinymodel:build")], indirect=True)
def test_model(compiled_model):
    pass

def test_device(mlc_device):
    pass

@pytest.mark.parametrize("mlc_device", ["cpu", "cuda"], indirect=True)
def test_own_devices(mlc_device):
    pass

@pytest.mark.mlc_model(TVMModel("tinymodel:build"), target={"kind": "cuda", "arch": "sm_80"})
def test_cross_compiled(compiled_model):
    pass
'''


def _collected(project: Project, *args: str) -> list[str]:
    result = inprocess(project.pytester, "-p", "no:cacheprovider", "--co", "-q", *args)
    assert result.ret == pytest.ExitCode.OK, result.stdout.str() + result.stderr.str()
    return [line.split("::", 1)[1] for line in result.stdout.lines if "::" in line]


@pytest.mark.parametrize(("targets", "devices"), [
    ("llvm", ["cpu"]),
    ('llvm;{"kind": "cuda", "arch": "sm_80"};opencl -device=mali;nvptx',
     ["cpu", "cuda", "opencl"]),
    ("c ; vulkan -from_device=0;", ["cpu", "vulkan"]),
])
def test_tvm_test_targets_select_the_devices(project: Project, monkeypatch: pytest.MonkeyPatch,
                                             targets: str, devices: list[str]) -> None:
    project.pytester.makepyfile(test_tvm=TVM_STYLE)
    monkeypatch.setenv("TVM_TEST_TARGETS", targets)
    assert [t for t in _collected(project) if t.startswith("test_device[")] == [
        f"test_device[{d}]" for d in devices]
    assert _collected(project, "--mlc-device=rocm", "-k", "test_device") == ["test_device[rocm]"]


def test_tvm_test_targets_names_itself_in_skips(project: Project,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    project.pytester.makepyfile(test_tvm=TVM_STYLE)
    monkeypatch.setenv("TVM_TEST_TARGETS", "llvm;metal")
    result = inprocess(project.pytester, "-p", "no:cacheprovider", "-rs", "-k", "test_device")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["*device metal is not present: Metal exists only on macOS "
                                 "(TVM_TEST_TARGETS=llvm;metal)*"])


@pytest.mark.parametrize("targets", ["hexagon", "llvm;{\"kind\": \"hexagon\"}", "{not json",
                                     '{"arch": "sm_80"}'])
def test_unknown_tvm_test_targets_are_a_usage_error(
        project: Project, monkeypatch: pytest.MonkeyPatch, targets: str) -> None:
    project.pytester.makepyfile(test_tvm=TVM_STYLE)
    monkeypatch.setenv("TVM_TEST_TARGETS", targets)
    result = project.run("--co")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "invalid TVM_TEST_TARGETS entry" in result.stderr.str()
    if "hexagon" in targets:
        assert ("target kind 'hexagon' runs on no device pytest-mlcjit knows; expected one of "
                "llvm, c, nvptx, cuda, rocm, metal, vulkan, opencl, webgpu") in (
                    result.stderr.str())


def test_the_gpu_marker_selects_gpu_tests(project: Project) -> None:
    project.pytester.makepyfile(test_tvm=TVM_STYLE)
    everything = _collected(project, "--mlc-device=cpu,cuda")
    not_gpu = _collected(project, "--mlc-device=cpu,cuda", "-m", "not gpu")
    gpu = _collected(project, "--mlc-device=cpu,cuda", "-m", "gpu")
    assert sorted(not_gpu + gpu) == sorted(everything)
    assert gpu == ["test_model[cuda-tinymodel]", "test_device[cuda]", "test_own_devices[cuda]"]
    assert "test_cross_compiled[target-cuda]" in not_gpu, "cross-compiling needs no GPU"


# -- 7. the small things ------------------------------------------------------------------------
def _cli(*args: str) -> tuple[int, str, str]:
    """``pytest-mlcjit ARGS`` in this process (:func:`conftest.run_cli`): (exit status,
    stdout, stderr)."""
    ran = run_cli(*args)
    return ran.returncode, ran.stdout, ran.stderr


@pytest.mark.parametrize(("args", "rc", "message"), [
    (["prune"], 2, "prune needs at least one of --max-size"),
    (["prune", "--max-size", "10X"], 2, "invalid --max-size '10X'"),
    (["explain", "--factory", "a:b", "--config", "{not json"], 2, "invalid --config"),
    (["explain", "--factory", "no-colon"], 2, "invalid factory 'no-colon'"),
    (["explain", "--factory", "a:b", "--device", "tpu"], 2, "invalid device 'tpu'"),
    (["nosuch"], 2, "invalid choice: 'nosuch'"),
])
def test_cli_usage_errors_exit_2(tmp_path: Path, args: list[str], rc: int, message: str) -> None:
    status, _, err = _cli(*args, "--cache-dir", str(tmp_path))
    assert status == rc
    assert message in err
    assert not any(tmp_path.iterdir()), "a usage error writes nothing"


def test_cli_runtime_failures_exit_1(project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    project.pytester.makepyfile(test_broken="this is not python\n")
    monkeypatch.chdir(project.pytester.path)
    rc, _, err = _cli("key", "--", "--mlc-device=cpu")
    assert rc == 1, "a runtime failure, not a usage error"
    assert "collecting the tests failed (pytest exit 2)" in err
    assert "test_broken.py" in err, "the collection error's file"
    rc, _, err = _cli("key", "--", "--mlc-device=cpu", "--no-such-option")
    assert rc == 2, "pytest's usage error is a usage error"
    assert "--no-such-option" in err


def test_explain_check_gates_a_readonly_run(project: Project, warm_template: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    project.write_tests([{"hidden": 4}])
    monkeypatch.chdir(project.pytester.path)
    args = ["explain", "--check", "--cache-dir", str(project.cache), "--", "--mlc-device=cpu"]
    rc, out, _ = _cli(*args)
    assert rc == 1
    assert "1 library requested: 0 cached, 1 would miss under READONLY" in out
    assert not project.cache.exists(), "explain writes nothing"
    project.warm(warm_template)  # the library the test requests, compiled by another run
    rc, out, _ = _cli(*args)
    assert rc == 0
    assert "1 library requested: 1 cached, 0 would miss under READONLY" in out
    project.run("--mlc-device=cpu", "--mlc-jit-policy=READONLY").assert_outcomes(passed=1)
    rc, out, _ = _cli(*args, "-k", "nothing-matches")
    assert rc == 0
    assert "0 libraries requested" in out


def test_dry_runs_name_the_quarantine(project: Project, warm_template: Path) -> None:
    project.warm(warm_template)  # hidden=4; the run compiles hidden=6
    project.write_tests([{"hidden": 4}, {"hidden": 6}])
    project.run("--mlc-device=cpu").assert_outcomes(passed=2)
    assert len(project.libraries()) == 2
    library = project.libraries()[0]
    # A new file renamed over it: this process loaded the library (an in-process run), and
    # changing a loaded library's bytes in place crashes the process when it unloads it.
    corrupt = library.with_name("corrupt.tmp")
    corrupt.write_bytes(b"corrupt" + library.read_bytes())
    corrupt.replace(library)
    cache = ["--cache-dir", str(project.cache)]
    assert _cli("verify", "--fix", *cache)[0] == 0
    quarantine = project.cache / ".mlcjit" / "quarantine"
    assert len(list(quarantine.iterdir())) == 1

    rc, out, _ = _cli("prune", "--dry-run", "--max-size", "0", *cache)
    assert rc == 0
    assert "  would remove 1 quarantined entry" in out
    assert "  removed" not in out
    rc, out, _ = _cli("clear", "--dry-run", *cache)
    assert f"{project.cache}: would remove 1 entry and 1 quarantined entry (" in out
    assert len(list(quarantine.iterdir())) == 1, "a dry run removes nothing"
    rc, out, _ = _cli("clear", *cache)
    assert f"{project.cache}: removed 1 entry and 1 quarantined entry (" in out
    assert not quarantine.exists() or not list(quarantine.iterdir())


LONG_CONFIG = '''
import pytest
from pytest_mlcjit import TVMModel

LONG = TVMModel("widemodel:build", config={"hidden": 4, "note": "n" * 150}, name="wide")

@pytest.mark.mlc_model(LONG)
def test_long(compiled_model):
    pass
'''

WIDE_MODEL = '''
from tvm.relax.frontend import nn


def build(hidden=4, note=""):
    return nn.Linear(8, hidden), {"forward": {"x": nn.spec.Tensor((2, 8), "float32")}}
'''


def test_list_shows_the_name_and_cuts_long_configs(project: Project) -> None:
    project.pytester.makepyfile(widemodel=WIDE_MODEL, test_long=LONG_CONFIG)
    project.run("--mlc-device=cpu").assert_outcomes(passed=1)
    rc, out, _ = _cli("list", "--cache-dir", str(project.cache))
    assert rc == 0
    (row,) = [line for line in out.splitlines() if " tvm " in line]
    model = re.search(r" tvm +(wide .*?\u2026) ", row)
    assert model is not None, row
    assert len(model.group(1)) == 60
    assert model.group(1).startswith('wide {"hidden": 4, "note": "nnn')
    rc, out, _ = _cli("list", "--json", "--cache-dir", str(project.cache))
    assert "n" * 150 in out, "--json keeps all of it"


def test_prepare_counts_read_in_the_singular(project: Project) -> None:
    project.pytester.makepyfile(test_counts='''
import pytest
from pytest_mlcjit import TVMModel

@pytest.mark.skip(reason="not today")
@pytest.mark.mlc_model(TVMModel("tinymodel:build"))
def test_skipped(compiled_model):
    pass

def test_plain():
    pass
''')
    result = project.run("--mlc-device=cpu", "--mlc-jit-prepare")
    result.stdout.fnmatch_lines(["2 tests request no library:",
                                 "  1 without compiled_model",
                                 "  1 skipped at collection (*"])
    assert " are " not in result.stdout.str().split("request no library:")[1]


def test_documented_test_ids_are_the_real_ones(project: Project) -> None:
    text = SPECS_PAGE.read_text(encoding="utf-8")
    documented = re.search(r"for example `(test_x\[[^`]+\])`", text)
    assert documented is not None
    project.pytester.makepyfile(test_ids='''
import pytest
from pytest_mlcjit import TVMModel

@pytest.mark.parametrize("compiled_model",
                         [TVMModel("pytest_mlcjit.examples.mlp:build", config={"hidden": 128})],
                         indirect=True)
def test_x(compiled_model):
    pass
''')
    assert _collected(project, "--mlc-device=cpu") == [documented.group(1)]


def test_docs_document_compiled_model(tmp_path: Path) -> None:
    text = SPECS_PAGE.read_text(encoding="utf-8")
    table = text.split("### `CompiledModel`", 1)[1].split("\n\n", 2)[1]
    public = {name for name in dir(CompiledModel) if not name.startswith("_")}
    public |= {f.name for f in CompiledModel.__dataclass_fields__.values()
               if not f.name.startswith("_")}
    undocumented = sorted(n for n in public if f"`{n}" not in table and f", `{n}`" not in table
                          and n != "tvm_device")
    assert undocumented == [], f"the CompiledModel table lacks {undocumented}"


@pytest.mark.parametrize("text", ["--mlc-jit-require-devices", "mlc_jit_require_devices",
                                  "TVM_TEST_TARGETS", "--check", "`gpu`", "InputError",
                                  "**2** on a usage error"])
def test_new_options_are_documented(pytester: pytest.Pytester,
                                    capsys: pytest.CaptureFixture[str], text: str) -> None:
    assert text in docs_text()
    if text.startswith(("--mlc", "mlc_", "TVM")):
        help_text = inprocess(pytester, "--help").stdout.str()
        assert text in help_text
    if text == "--check":
        from pytest_mlcjit.cli import build_parser

        with pytest.raises(SystemExit):
            build_parser().parse_args(["explain", "--help"])
        assert "--check" in capsys.readouterr().out
