"""Packaging (issue 15, item 6): the license, the metadata, the platforms the README states,
and the README's first snippet, which must pass after ``pip install "pytest-mlcjit[tvm]"``
in an empty directory.

The slow test builds the sdist and the wheel (from the sdist, as PyPI users get it),
installs each into a fresh virtualenv with the ``tvm`` extra (apache-tvm from PyPI: minutes)
and runs the snippet there. It runs with ``--run-slow`` (``.ci/run`` runs it once).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from conftest import ENV_VARS, inprocess
from pytest_mlcjit import __version__

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
#: MD5 of the Apache License 2.0 text as the ASF publishes it (LICENSE-2.0.txt).
APACHE_2_MD5 = "3b83ef96387f14655fc854ddc3c6bd57"

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")


def readme_snippet() -> str:
    """The README's first Python block."""
    match = re.search(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    assert match is not None, "the README has no python snippet"
    return match.group(1)


def test_license_is_the_apache_2_text() -> None:
    text = (ROOT / "LICENSE").read_bytes()
    assert hashlib.md5(text).hexdigest() == APACHE_2_MD5, "not the ASF's text, byte for byte"
    assert b"TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text


def test_project_metadata() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["license"] == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"]
    assert {"Homepage", "Source", "Issues", "Documentation"} <= set(project["urls"])
    classifiers = set(project["classifiers"])
    assert "Operating System :: POSIX :: Linux" in classifiers
    assert any(c.startswith("Development Status :: ") for c in classifiers)
    versions = sorted(c.rsplit(" ", 1)[1] for c in classifiers
                      if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c))
    assert versions[0] == project["requires-python"].removeprefix(">=")
    assert not any(c.startswith("License ::") for c in classifiers), (
        "a license expression (PEP 639) takes no license classifier")


def test_readme_states_the_platforms() -> None:
    installing = README.read_text(encoding="utf-8").split("## Installing", 1)[1]
    installing = installing.split("\n## ", 1)[0]
    assert "**Platforms.** Linux first" in installing
    assert "Windows is not supported" in installing


def test_readme_first_snippet_passes(pytester: pytest.Pytester) -> None:
    """The snippet needs nothing but the installed package (here: this checkout's); run
    in this process (in a fresh virtualenv by the slow test below)."""
    assert "examples.models" not in readme_snippet()
    pytester.makepyfile(test_readme=readme_snippet())
    cache = pytester.path / "cache"
    result = inprocess(pytester, "-p", "no:cacheprovider", "--mlc-device=cpu",
                       f"--mlc-jit-cache-dir={cache}")
    result.assert_outcomes(passed=1)
    assert len(list((cache / "tvm").glob("*.manifest.json"))) == 1, "compiled into the cache"


# -- the built distributions, installed where nothing else is ------------------------------------
def _run(cmd: list[str | Path], *, cwd: Path, env: dict[str, str] | None = None,
         timeout: float = 1800) -> str:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


#: What a copy of the checkout leaves out: anywhere, caches and metadata; at the top only,
#: setuptools' output directories (``pytest_mlcjit/compiler`` is a subpackage, not output).
_SKIP_ANYWHERE = {".git", ".venv", "__pycache__", ".mypy_cache", ".ruff_cache",
                  ".pytest_cache", ".tox"}
_SKIP_AT_TOP = {"build", "dist"}


def _skipped(directory: str, names: list[str]) -> set[str]:
    skipped = {n for n in names if n in _SKIP_ANYWHERE or n.endswith(".egg-info")}
    if Path(directory) == ROOT:
        skipped |= _SKIP_AT_TOP & set(names)
    return skipped


def _build(tmp_path: Path) -> tuple[Path, Path]:
    """``(sdist, wheel)``, the wheel built from the sdist, from a copy of this checkout."""
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=_skipped)
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "build", "--outdir", dist, src], cwd=tmp_path)
    (sdist,) = dist.glob("*.tar.gz")
    (wheel,) = dist.glob("*.whl")
    return sdist, wheel


CHECK_INSTALLED = '''
import importlib.metadata as md, json, pytest_mlcjit
dist = md.distribution("pytest-mlcjit")
print(json.dumps({
    "pytest11": sorted((e.name, e.value) for e in md.entry_points(group="pytest11")
                       if e.dist is not None and e.dist.name == "pytest-mlcjit"),
    "licenses": [str(f) for f in dist.files if f.name == "LICENSE"],
    "license_text": next(f.read_text() for f in dist.files if f.name == "LICENSE"),
    "license_expression": dist.metadata["License-Expression"],
    "module": pytest_mlcjit.__file__,
}))
'''


@pytest.mark.slow
def test_wheel_and_sdist_install_into_fresh_virtualenvs(tmp_path: Path) -> None:
    sdist, wheel = _build(tmp_path)
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    assert "LICENSE" in names
    assert not any(n.startswith(("tests/", "examples/")) for n in names), (
        "the sdist carries no tests (they need the repository's fixtures)")
    with zipfile.ZipFile(wheel) as whl:
        files = set(whl.namelist())
        info = next(n.split("/")[0] for n in files if n.endswith(".dist-info/METADATA"))
        assert f"{info}/licenses/LICENSE" in files
        assert "pytest_mlcjit/examples/mlp.py" in files
        modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "pytest_mlcjit").rglob("*.py")
                   if "__pycache__" not in p.parts}
        assert modules <= files, f"the wheel lacks {sorted(modules - files)}"
        assert "[pytest11]\nmlcjit = pytest_mlcjit.plugin" in whl.read(
            f"{info}/entry_points.txt").decode()

    license_text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    env = {k: v for k, v in os.environ.items()
           if k not in (*ENV_VARS, "PYTHONPATH", "VIRTUAL_ENV", "MLCJIT_TEST_COUNT")}
    for artifact in (wheel, sdist):
        venv = tmp_path / f"venv-{artifact.suffix.lstrip('.')}"
        _run([sys.executable, "-m", "venv", venv], cwd=tmp_path, env=env)
        python = venv / "bin" / "python"
        _run([python, "-m", "pip", "install", "--quiet",
              f"pytest-mlcjit[tvm] @ {artifact.as_uri()}"], cwd=tmp_path, env=env)

        work = tmp_path / f"work-{artifact.suffix.lstrip('.')}"  # an empty directory
        work.mkdir()
        installed = json.loads(_run([python, "-c", CHECK_INSTALLED], cwd=work, env=env))
        assert installed["pytest11"] == [["mlcjit", "pytest_mlcjit.plugin"]]
        assert installed["license_text"] == license_text
        assert installed["license_expression"] == "Apache-2.0"
        assert Path(installed["module"]).is_relative_to(venv)
        version = _run([venv / "bin" / "pytest-mlcjit", "--version"], cwd=work, env=env)
        assert f"pytest-mlcjit {__version__}" in version

        (work / "test_readme.py").write_text(readme_snippet(), encoding="utf-8")
        out = _run([python, "-m", "pytest", "-p", "no:cacheprovider", "--mlc-device=cpu",
                    "test_readme.py"], cwd=work,
                   env={**env, "MLC_JIT_CACHE_DIR": str(tmp_path / "cache")})
        assert "1 passed" in out
        assert "mlcjit: policy=ON, devices=cpu (present)" in out
