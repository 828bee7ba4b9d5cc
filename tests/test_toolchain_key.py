"""The toolchain in the key covers what the compile process imports with TVM.

apache-tvm requires apache-tvm-ffi unpinned (and ml_dtypes, numpy), and the compile child
imports all of them before it records the factory's inputs: an upgrade of one of them alone
must change the key of every TVM entry (a library built against one tvm-ffi is never served
to another), the CI cache key, and ``explain`` must name the distribution and both versions.

An upgrade is faked as the suite fakes one of apache-tvm (tests/test_cli.py): a
``*.dist-info`` of another version in a site directory of its own, first on ``PYTHONPATH``
of a new process; the key is read from what the command prints and the cache's files.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import Project, run_cli
from pytest_mlcjit.compiler.backends.base import BuildRequest
from pytest_mlcjit.compiler.backends.mlc import MLCBackend
from pytest_mlcjit.compiler.toolchain import tvm_fingerprint
from pytest_mlcjit.compiler.warm.zygote import WARM_MODULES
from pytest_mlcjit.device import Device

FAKE = "9.9.9"


def _fake_site(tmp_path: Path) -> Path:
    """A site directory holding only the metadata of apache-tvm-ffi 9.9.9."""
    site = tmp_path / "fake-site"
    dist = site / f"apache_tvm_ffi-{FAKE}.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: apache-tvm-ffi\nVersion: {FAKE}\n")
    return site


def _cli_process(cwd: Path, site: Path, *args: str) -> str:
    """``python -m pytest_mlcjit ARGS`` in a new process with ``site`` first on its path."""
    proc = subprocess.run([sys.executable, "-m", "pytest_mlcjit", *args], cwd=cwd,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(
                              [str(site), *filter(None, [os.environ.get("PYTHONPATH")])])},
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_a_new_tvm_ffi_alone_changes_the_key(project: Project, warm_template: Path,
                                             tmp_path: Path) -> None:
    project.warm(warm_template)
    project.write_path_tests([{"hidden": 4}])
    path, cache = project.pytester.path, str(project.cache)
    # The cache's entry, from its files: its key's digest names its variants file.
    (cached_key,) = [p.stem for p in (project.cache / "tvm" / "variants").glob("*.json")]
    installed = importlib.metadata.version("apache-tvm-ffi")
    assert installed != FAKE

    ran = run_cli("key", "--json", "--cache-dir", cache, "--", "--mlc-device=cpu", cwd=path)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    before = json.loads(ran.stdout)
    (lib,) = before["libraries"]
    assert lib["digest"] == cached_key, "the installed toolchain finds the cached entry"
    assert lib["toolchain"]["tvm"]["imports"]["apache-tvm-ffi"] == installed

    site = _fake_site(tmp_path)
    after = json.loads(_cli_process(path, site, "key", "--json", "--cache-dir", cache, "--",
                                    "--mlc-device=cpu"))
    assert re.fullmatch(r"[0-9a-f]{64}", after["key"])
    assert after["key"] != before["key"], "the CI cache key changes"
    (upgraded,) = after["libraries"]
    assert upgraded["digest"] != cached_key, "the library's key changes"
    # The only difference: apache-tvm-ffi's version (TVM itself, numpy… the same).
    chain = upgraded["toolchain"]
    assert chain["tvm"]["imports"] == {**lib["toolchain"]["tvm"]["imports"],
                                       "apache-tvm-ffi": FAKE}
    assert {**chain["tvm"], "imports": None} == {**lib["toolchain"]["tvm"], "imports": None}

    explained = _cli_process(path, site, "explain", "--factory", "tinymodel:build",
                             "--config", '{"hidden": 4}', "--device", "cpu",
                             "--cache-dir", cache)
    assert "0 cached, 1 would miss" in explained, explained
    assert f"toolchain changed: apache-tvm-ffi {installed} in the cache, {FAKE} installed" \
        in explained, explained
    assert "differs in 1 key field" in explained, explained


@pytest.mark.reliability
def test_the_fingerprint_covers_what_importing_tvm_imports() -> None:
    """What the compile child imports before recording (the warm zygote's modules: the
    same list), mapped to distributions in a fresh process: each is in the fingerprint
    with its installed version."""
    code = ("import importlib, json, sys; before = set(sys.modules)\n"
            f"for name in {list(WARM_MODULES)!r}: importlib.import_module(name)\n"
            "print(json.dumps(sorted({m.partition('.')[0] for m in set(sys.modules) - before"
            " if m.partition('.')[0] not in sys.stdlib_module_names})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, check=True)
    tops = json.loads(proc.stdout.splitlines()[-1])
    owners = importlib.metadata.packages_distributions()
    imported = {re.sub(r"[-_.]+", "-", dist).lower()
                for top in tops for dist in owners.get(top, ())} - {"apache-tvm"}
    assert {"apache-tvm-ffi", "ml-dtypes", "numpy"} <= imported, tops
    keyed = tvm_fingerprint()["imports"]
    assert imported <= set(keyed), f"imported with TVM but not in the key: {imported - set(keyed)}"
    assert all(keyed[d] == importlib.metadata.version(d) for d in imported)


def test_an_mlc_entry_is_stale_after_a_new_tvm_ffi() -> None:
    """MLC keeps MLC-LLM's own key (its file names, for ``mlc_llm serve``), which cannot
    name the toolchain: the entry's manifest records it and a change makes the entry stale.
    The request is built by hand (no MLC compile: the wording is the subject)."""
    installed = {"mlc_llm": {"version": "0.1", "commit": "abc", "path": "/x"},
                 "tvm": tvm_fingerprint()}
    req = BuildRequest(backend="mlc", spec=None, device=Device("cpu"), target="cpu",
                       key={}, digest="0" * 32, toolchain=installed)
    backend = MLCBackend()
    assert backend.stale(req, {"toolchain": installed}) is None
    moved = {**installed["tvm"], "imports": {**installed["tvm"]["imports"],
                                             "apache-tvm-ffi": "0.0.1"}}
    recorded: dict[str, Any] = {"toolchain": {**installed, "tvm": moved}}
    now = installed["tvm"]["imports"]["apache-tvm-ffi"]
    assert backend.stale(req, recorded) == (
        f"built by apache-tvm-ffi 0.0.1, installed is apache-tvm-ffi {now}")
    # An entry from before the imports were recorded: stale too, and said so.
    old = {k: v for k, v in installed["tvm"].items() if k != "imports"}
    reason = backend.stale(req, {"toolchain": {**installed, "tvm": old}})
    assert reason is not None
    assert f"built by apache-tvm-ffi not recorded, installed is apache-tvm-ffi {now}" in reason
    # A new path of the same mlc_llm is no change.
    moved_mlc = {**installed, "mlc_llm": {**installed["mlc_llm"], "path": "/y"}}
    assert backend.stale(req, {"toolchain": moved_mlc}) is None
