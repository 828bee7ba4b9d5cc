"""Keys that cover every input (recorded inputs, ccache's direct mode): real compiles of a
factory that imports a local helper (which imports another) and reads a ``.npy`` with
``numpy.load``; the constants it reads are baked into the library, so a stale library
gives wrong numbers. Compiles are counted by the factory itself.

The runs are in this process, but for one under xdist: there several processes must agree
on which input state of a key each compiles (one compile per state across them)."""

from __future__ import annotations

import json
import os
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conftest import Project, inprocess, run_cli

FACTORY = '''
import os

import numpy as np
from tvm import relax

from models import layers

HERE = os.path.dirname(__file__)


def build(data="data/w.npy"):
    with open(os.environ["MLCJIT_TEST_COUNT"], "a") as f:
        f.write(f"{os.getpid()} {data}\\n")
    w = np.load(os.path.join(HERE, data)).astype("float32") + np.float32(layers.offset())
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4,), "float32"))
    with bb.function("forward", [x]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(relax.op.add(x, relax.const(w))))
        bb.emit_func_output(out)
    return bb.get()
'''

LAYERS = '''
from models import consts


def offset():
    return consts.BASE + {step}
'''

CONSTS = "BASE = {base}\n"

TESTS = '''
import importlib
import os

import numpy as np
import pytest

from pytest_mlcjit import TVMModel

DATA = {datas!r}


@pytest.mark.parametrize("i", range({per_data}))
@pytest.mark.parametrize("compiled_model", [TVMModel("models.factory:build", {{"data": d}})
                                            for d in DATA], indirect=True)
def test_forward(compiled_model, i):
    from models import layers
    data = compiled_model.spec.config["data"]
    w = np.load(os.path.join("models", data)).astype("float32")
    out = compiled_model.run("forward", np.zeros(4, "float32"))
    np.testing.assert_allclose(out, w + np.float32(layers.offset()), rtol=1e-6)
'''


def _setup(project: Project, datas: tuple[str, ...] = ("data/w.npy",), per_data: int = 1
           ) -> Path:
    root = project.pytester.path
    models = root / "models"
    (models / "data").mkdir(parents=True)
    (models / "__init__.py").write_text("")
    (models / "factory.py").write_text(FACTORY)
    (models / "layers.py").write_text(LAYERS.format(step=1.0))
    (models / "consts.py").write_text(CONSTS.format(base=0.0))
    for i, data in enumerate(datas):
        np.save(models / data, np.arange(4, dtype="float32") + 10 * i)
    project.pytester.makepyfile(test_inputs_suite=TESTS.format(datas=list(datas),
                                                               per_data=per_data))
    return models


def _run(project: Project, *args: str) -> tuple[int, str]:
    result = project.run("--mlc-device=cpu", "-p", "no:randomly", *args)
    return result.ret, result.stdout.str() + result.stderr.str()


def test_each_recorded_input_rebuilds_and_readonly_names_it(project: Project) -> None:
    """Editing a helper module, a helper of that helper and a data file read with
    numpy.load: READONLY fails naming the file (old and new digest), ON rebuilds and the
    numbers are those of the files as they are now; a touch rebuilds nothing and a revert
    hits the earlier library."""
    models = _setup(project)
    ret, out = _run(project)
    assert ret == 0, out
    assert len(project.compiles()) == 1

    def edit(name: str) -> None:
        if name == "models/layers.py":
            (models / "layers.py").write_text(LAYERS.format(step=2.0))
        elif name == "models/consts.py":
            (models / "consts.py").write_text(CONSTS.format(base=5.0))
        else:
            np.save(models / "data/w.npy", np.full(4, 7.0, dtype="float32"))

    edits = ["models/layers.py", "models/consts.py", "models/data/w.npy"]
    for n, name in enumerate(edits, start=2):
        edit(name)
        ret, out = _run(project, "--mlc-jit-policy=READONLY")
        assert ret == 1, out
        assert "is stale" in out, out
        assert "inputs changed since it was built" in out, out
        assert f"{name}: sha256 " in out, out
        assert "--mlc-jit-policy=ON" in out, out  # the fix
        assert len(project.compiles()) == n - 1  # READONLY compiled nothing
        ret, out = _run(project)
        assert ret == 0, out  # the numerics match the edited files
        assert len(project.compiles()) == n, out

    os.utime(models / "data/w.npy")  # a touch is not a change
    ret, out = _run(project)
    assert ret == 0, out
    assert len(project.compiles()) == 4

    # Revert the data edit: the state before it (edited helpers, first data) was built.
    np.save(models / "data/w.npy", np.arange(4, dtype="float32"))
    ret, out = _run(project, "--mlc-jit-policy=READONLY")
    assert ret == 0, out
    ret, out = _run(project)
    assert ret == 0, out
    assert len(project.compiles()) == 4  # no further compile


def test_switching_back_and_forth_compiles_each_state_once(project: Project) -> None:
    """Edit, run, revert, run, edit again, run: two compiles in all, then hits for both
    (the entry a request selects depends on its recorded inputs)."""
    models = _setup(project)
    original = (models / "layers.py").read_text()
    edited = LAYERS.format(step=3.0)
    for text in (original, edited, original, edited, original):
        (models / "layers.py").write_text(text)
        ret, out = _run(project)
        assert ret == 0, out
    assert len(project.compiles()) == 2
    variants = list((project.cache / "tvm" / "variants").glob("*.json"))
    assert len(variants) == 1
    assert len(json.loads(variants[0].read_text())["variants"]) == 2
    assert len(project.libraries()) == 2


@pytest.mark.reliability  # default tier: the in-process input-state tests above, test_xdist
def test_n2_one_compile_per_input_state(project: Project) -> None:
    """Factories that read data files: one compile per distinct input state; a warm run
    compiles nothing; then, under -n 2 (two workers that each prefetch, and run tests of
    either state), an edited data file compiles its own state once across the processes
    (the worker that did not compile it finds the new state's entry), the other hits."""
    models = _setup(project, datas=("data/a.npy", "data/b.npy"), per_data=3)
    ret, out = _run(project)
    assert ret == 0, out
    assert sorted(line.split()[1] for line in project.compiles()) == [
        "data/a.npy", "data/b.npy"]
    ret, out = _run(project)
    assert ret == 0, out
    assert len(project.compiles()) == 2
    np.save(models / "data/a.npy", np.full(4, 3.0, dtype="float32"))
    ret, out = _run(project, "-n", "2")
    assert ret == 0, out
    assert sorted(line.split()[1] for line in project.compiles()) == [
        "data/a.npy", "data/a.npy", "data/b.npy"]
    assert len(project.libraries()) == 3


def test_relocated_checkout_and_restored_cache_hit_readonly(
        project: Project, tmp_path_factory: pytest.TempPathFactory) -> None:
    """The project copied to another path, the cache restored at a third one with new
    mtimes: READONLY hits every library (recorded paths are relative to the import root,
    and the check compares content, not times)."""
    _setup(project, datas=("data/a.npy", "data/b.npy"))
    ret, out = _run(project)
    assert ret == 0, out
    elsewhere = tmp_path_factory.mktemp("moved")
    new_project = elsewhere / "checkout"
    new_cache = elsewhere / "restored-cache"
    shutil.copytree(project.pytester.path, new_project, copy_function=shutil.copy)
    shutil.copytree(project.cache, new_cache, copy_function=shutil.copy)  # new mtimes
    shutil.rmtree(project.pytester.path / "models")  # nothing may come from the old path
    os.chdir(new_project)
    try:
        result = inprocess(project.pytester, "-p", "no:cacheprovider",
                           f"--mlc-jit-cache-dir={new_cache}", "--mlc-device=cpu",
                           "--mlc-jit-policy=READONLY", "-p", "no:randomly", str(new_project))
    finally:
        project.pytester.chdir()
    out = result.stdout.str()
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["2 requests: 2 hits*"])
    assert len(project.compiles()) == 2


EXPLICIT = '''
import os

import numpy as np
from tvm import relax

HERE = os.path.dirname(__file__)


def build():
    with open(os.environ["MLCJIT_TEST_COUNT"], "a") as f:
        f.write(f"{os.getpid()} explicit\\n")
    x = relax.Var("x", relax.TensorType((4,), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("forward", [x]):
        bb.emit_func_output(x)
    return bb.get()
'''


def test_explicit_files_are_part_of_the_key(project: Project) -> None:
    """``files=`` names inputs the audit hook cannot see (read by C code): their content is
    in the key; a pattern that matches nothing fails only its own test, naming it."""
    root = project.pytester.path
    (root / "explicitmodel").mkdir()
    (root / "explicitmodel" / "__init__.py").write_text(EXPLICIT)
    (root / "explicitmodel" / "weights").mkdir()
    (root / "explicitmodel" / "weights" / "w0.bin").write_bytes(b"\x00" * 16)
    project.pytester.makepyfile(test_explicit=textwrap.dedent('''
        import pytest
        from pytest_mlcjit import TVMModel

        @pytest.mark.mlc_model(TVMModel("explicitmodel:build", files=["weights/*.bin"]))
        def test_found(compiled_model):
            assert compiled_model.key["files"] == [
                {"path": "explicitmodel/weights/w0.bin", "sha256": pytest.W0}]

        @pytest.mark.mlc_model(TVMModel("explicitmodel:build", files=["nothing/*.bin"]))
        def test_unmatched(compiled_model):
            pass
    ''').replace("pytest.W0", repr(__import__("hashlib").sha256(b"\x00" * 16).hexdigest())))
    result = project.run("--mlc-device=cpu", "-p", "no:randomly", "-rf")
    out = result.stdout.str()
    result.assert_outcomes(passed=1, errors=1)
    assert "file pattern 'nothing/*.bin' matches nothing in" in out, out
    assert len(project.compiles()) == 1
    (root / "explicitmodel" / "weights" / "w0.bin").write_bytes(b"\x01" * 16)
    result = project.run("--mlc-device=cpu", "-p", "no:randomly", "-k", "found",
                         "--mlc-jit-policy=READONLY")
    assert result.ret == 1  # a new key: not cached
    assert "no cached library" in result.stdout.str()


DIST_FACTORY = '''
import os

import tinydist
from tvm import relax


def build():
    with open(os.environ["MLCJIT_TEST_COUNT"], "a") as f:
        f.write(f"{os.getpid()} dist\\n")
    x = relax.Var("x", relax.TensorType((4,), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("forward", [x]):
        bb.emit_func_output(x)
    return bb.get()
'''


def _install_tinydist(site: Path, version: str) -> None:
    for old in site.glob("tinydist-*.dist-info"):
        shutil.rmtree(old)
    (site / "tinydist").mkdir(parents=True, exist_ok=True)
    (site / "tinydist" / "__init__.py").write_text("VALUE = 1\n")
    info = site / f"tinydist-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: tinydist\nVersion: {version}\n")
    (info / "top_level.txt").write_text("tinydist\n")
    (info / "RECORD").write_text("tinydist/__init__.py,,\n")


def test_upgrading_an_imported_distribution_makes_the_entry_stale(
        project: Project, tmp_path_factory: pytest.TempPathFactory,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A third-party distribution the factory imported (a small one, installed into a
    site-packages directory of its own) is recorded with its version; upgrading it makes
    the entry stale, naming the distribution and both versions. The site dir is on this
    process's sys.path, so the runs here and their compiles (whose sys.path is the test
    process's) both see it."""
    site = tmp_path_factory.mktemp("venv") / "lib" / "site-packages"
    site.mkdir(parents=True)
    _install_tinydist(site, "1.0")
    monkeypatch.syspath_prepend(str(site))
    project.pytester.makepyfile(distmodel=DIST_FACTORY, test_dist=textwrap.dedent('''
        import pytest
        from pytest_mlcjit import TVMModel

        @pytest.mark.mlc_model(TVMModel("distmodel:build"))
        def test_dist(compiled_model):
            assert compiled_model.manifest["inputs"]["dists"]["tinydist"] == "1.0"
    '''))
    ret, out = _run(project)
    assert ret == 0, out
    assert len(project.compiles()) == 1
    ret, out = _run(project, "--mlc-jit-policy=READONLY")
    assert ret == 0, out  # unchanged: a hit
    _install_tinydist(site, "1.1")
    ret, out = _run(project, "--mlc-jit-policy=READONLY")
    assert ret == 1, out
    assert "distribution tinydist 1.0 → 1.1" in out, out
    assert len(project.compiles()) == 1


def _cli(*args: str) -> tuple[int, str]:
    """``pytest-mlcjit ARGS`` in this process (:func:`conftest.run_cli`): its status and
    what it printed (stdout, then stderr)."""
    ran = run_cli(*args)
    return ran.returncode, ran.stdout + ran.stderr


def test_the_ci_key_follows_local_imports(project: Project, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """``pytest-mlcjit key`` changes when a local module the factory imports (through
    another local module) changes, before anything is compiled. ``list`` and ``info`` show
    the recorded inputs, also as JSON when the entry is in the first of the default roots
    (the TVM cache, then MLC-LLM's home)."""
    models = _setup(project)

    def key() -> str:
        ran = run_cli("key", "--", "-p", "no:randomly", "--mlc-device=cpu")
        assert ran.returncode == 0, ran.stdout + ran.stderr
        return ran.stdout.strip().splitlines()[-1]

    first = key()
    assert key() == first
    ret, out = _run(project)
    assert ret == 0, out
    (models / "consts.py").write_text(CONSTS.format(base=1.0))
    assert key() != first

    status, text = _cli("explain", "--cache-dir", str(project.cache), "--",
                        "-p", "no:randomly", "--mlc-device=cpu")
    assert status == 0, text
    assert "inputs changed since it was built: models/consts.py: sha256 " in text, text
    for command in ("list", "info"):
        status, text = _cli(command, "--inputs", "--cache-dir", str(project.cache))
        assert status == 0, text
        assert "models/consts.py" in text, text
        assert "data/w.npy" in text, text

    monkeypatch.delenv("MLC_JIT_CACHE_DIR", raising=False)
    monkeypatch.delenv("MLC_LLM_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    shutil.copytree(project.cache, tmp_path / "xdg" / "pytest-mlcjit")
    status, text = _cli("list", "--inputs", "--json")
    assert status == 0, text
    listed = json.loads(text)
    assert len(listed["roots"]) == 2, listed["roots"]
    assert listed["entries"], text
    for entry in listed["entries"]:
        assert "models/consts.py" in [m["path"] for m in entry["inputs"]["modules"]], entry
