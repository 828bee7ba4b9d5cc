"""Every manifest field is validated: a malformed manifest is corrupt everywhere.

Property-based (Hypothesis): a real manifest with any of its fields replaced by any JSON
value (nested lists and objects, huge and negative numbers, NaN and infinities, strings),
removed, or joined by unknown fields, is either accepted whole, and then every reader of
the engine and the tools uses it without an exception, or refused as corrupt by the one
reader (:func:`pytest_mlcjit.cache.manifest.parse_manifest`), and then the store refuses it,
``verify`` flags it, and ``list``, ``info``, ``verify`` and ``prune`` report it without
crashing. Valid values of every field are always accepted (a validation too strict would
make ON rebuild an entry on every run).

The default tier draws a fixed set of examples (``derandomize``: the same every run); the
reliability tier draws many more, new ones each run.

The issue's four examples then go through the engine (in this process, a new engine per
request; the compile in a process of its own): READONLY says the entry is corrupt, ON
quarantines it and compiles once, READONLY then hits.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import Project, run_cli
from pytest_mlcjit import JIT, Policy, Settings, TVMModel
from pytest_mlcjit.cache.layout import tvm_entry
from pytest_mlcjit.cache.manage import info, prune, scan, verify
from pytest_mlcjit.cache.manifest import FIELDS, MAX_SECONDS, MAX_TIME, Manifest, parse_manifest
from pytest_mlcjit.cache.store.local import LocalStore
from pytest_mlcjit.device import Device
from pytest_mlcjit.engine.model import CompiledModel
from pytest_mlcjit.errors import CacheMissError, CorruptEntryError, MlcJitError
from pytest_mlcjit.key import file_sha256
from pytest_mlcjit.units import format_size, format_time

DIGEST = "d" * 64
LIBRARY = b"\x7fELF not really a library, but its checksum is right"

#: A manifest as the engine writes it for the tiny model (values from a real compile).
BASE: dict[str, Any] = {
    "format": 2, "backend": "tvm", "key_digest": DIGEST,
    "key": {"format": 2, "backend": "tvm", "factory": "tinymodel:build", "config": {"hidden": 4},
            "target": {"kind": "llvm"}, "opt_level": 3, "toolchain": {"tvm": {"version": "0.27"}}},
    "toolchain": {"tvm": {"dist": "apache-tvm", "version": "0.27.0", "commit": None}},
    "compile_seconds": 1.234, "created": 1_760_000_000.5, "run_id": "ab12", "host": "vm",
    "plugin_version": "0.1.0",
    "params": [{"name": "fc.weight", "shape": [4, 8], "dtype": "float32"},
               {"name": "fc.bias", "shape": [4], "dtype": "float32"}],
    "functions": ["forward"], "target_str": "llvm -keys=cpu", "tvm_version": "0.27.0",
    "signatures": {"forward": {
        "inputs": [{"name": "x", "kind": "tensor", "ndim": 2, "shape": [2, 8],
                    "dtype": "float32"}],
        "params": [{"name": "fc.weight", "kind": "tensor", "ndim": 2, "shape": [4, 8],
                    "dtype": "float32"}],
        "output": {"kind": "tensor", "ndim": 2, "shape": [2, "n"], "dtype": "float32"}}},
    "inputs": {"roots": ["tinymodel"], "modules": [
        {"path": "tinymodel.py", "sha256": "a" * 64, "size": 500}], "files": [], "dists": {}},
    "digest": DIGEST, "library": f"{DIGEST}.so", "log": f"{DIGEST}.log",
    "sha256": "", "size": 0,
}
CORE = ("digest", "sha256", "size", "library", "log")

#: Any JSON value, NaN and the infinities included (Python's json reads them).
JSON: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
    | st.sampled_from([10**300, -1, 2**63, 1e300, -0.0, "", "slow", "junk", "../x", "d" * 64]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                 max_size=3),
    max_leaves=8)


#: JSON as the cache writes it: no NaN, no infinities.
FINITE_JSON: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                 max_size=3),
    max_leaves=8)


def _base() -> dict[str, Any]:
    import hashlib

    data: dict[str, Any] = json.loads(json.dumps(BASE))
    data["sha256"] = hashlib.sha256(LIBRARY).hexdigest()
    data["size"] = len(LIBRARY)
    return data


@contextlib.contextmanager
def _cache_with(manifest: bytes) -> Iterator[Path]:
    """A cache root holding one TVM entry: the library and this manifest."""
    root = Path(tempfile.mkdtemp(prefix="mlcjit-fuzz-"))
    try:
        paths = tvm_entry(root, DIGEST)
        paths.library.parent.mkdir(parents=True)
        paths.library.write_bytes(LIBRARY)
        paths.manifest.write_bytes(manifest)
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _cli(*args: str) -> int:
    """Run the CLI in this process (:func:`conftest.run_cli`; output discarded): its exit
    status. Any exception (a traceback for a user) fails the test."""
    return run_cli(*args).returncode


def _tools_cope(root: Path) -> None:
    for command in (("list",), ("list", "--json"), ("info",), ("info", "--json"),
                    ("verify",), ("verify", "--json"),
                    ("prune", "--max-size", "0", "--dry-run"), ("prune", "--older-than", "1d",
                                                               "--dry-run")):
        assert _cli(*command, "--cache-dir", str(root)) in (0, 1), command
    info(root)
    prune(root, max_size=0, dry_run=True)


def _readers_cope(manifest: Manifest) -> None:
    """What the engine and the tools read from an accepted manifest works."""
    seconds = float(manifest.get("compile_seconds", 0))
    assert math.isfinite(seconds)
    format_time(manifest.get("created"))
    format_size(manifest["size"])
    model = CompiledModel(spec=None, device=Device("cpu"), path=Path("x.so"), key={},
                          digest=DIGEST, hit=True, compile_seconds=seconds, manifest=manifest)
    assert isinstance(model.param_specs, list)
    try:
        signatures = model.signature()
    except MlcJitError:  # none recorded: a clean error, not a crash
        signatures = {}
    assert isinstance(signatures, dict)
    for signature in signatures.values():
        str(signature)
    _ = model.system_lib_prefix
    json.dumps(manifest)


#: Any manifest field (and two unknown ones) replaced by any JSON value, or removed.
MUTATIONS = st.dictionaries(st.sampled_from(sorted({*FIELDS, *CORE, "unknown", "x"})),
                            JSON | st.just("<delete>"), min_size=1, max_size=4)


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(changes=MUTATIONS)
def test_a_mutated_manifest_is_accepted_whole_or_refused_everywhere(
        changes: dict[str, Any]) -> None:
    _accepted_whole_or_refused_everywhere(changes)


@pytest.mark.reliability
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(changes=MUTATIONS)
def test_many_mutated_manifests_are_accepted_whole_or_refused_everywhere(
        changes: dict[str, Any]) -> None:
    _accepted_whole_or_refused_everywhere(changes)


def _accepted_whole_or_refused_everywhere(changes: dict[str, Any]) -> None:
    manifest = _base()
    for field, value in changes.items():
        if value == "<delete>":
            manifest.pop(field, None)
        else:
            manifest[field] = value
    raw = json.dumps(manifest).encode()  # NaN and Infinity as Python writes them
    with _cache_with(raw) as root:
        store = LocalStore(root, allow_untrusted=True)
        paths = tvm_entry(root, DIGEST)
        try:
            parsed = parse_manifest(raw, paths.manifest, DIGEST)
        except CorruptEntryError as exc:
            refused: str | None = str(exc)
        else:
            refused = None
            _readers_cope(parsed)
        if refused is not None:
            with pytest.raises(CorruptEntryError):
                store.read_manifest(paths)
            (entry,) = scan(root)
            assert entry.state == "bad-manifest"
            (flagged,) = verify(root).corrupt
            assert flagged[1] == refused
        else:
            assert store.read_manifest(paths) == parsed
        _tools_cope(root)


def _valid_values() -> dict[str, st.SearchStrategy[Any]]:
    name = st.text(min_size=1, max_size=8)
    dim = st.integers(0, 2**40) | name
    dtype = st.sampled_from(["float32", "float16", "bfloat16", "int8", "uint8", "int64",
                             "bool", "float8_e4m3fn", "float8_e5m2", "float16x4"])
    arg = st.fixed_dictionaries({"kind": st.sampled_from(["tensor", "shape", "prim"])},
                                optional={"name": st.text(max_size=6),
                                          "shape": st.none() | st.lists(dim, max_size=3),
                                          "ndim": st.integers(-1, 8),
                                          "dtype": st.none() | dtype})
    return {
        "format": st.none() | st.integers(0, 10),
        "backend": st.sampled_from(["tvm", "mlc"]),
        "key": st.dictionaries(st.text(max_size=6), FINITE_JSON, max_size=3),
        "toolchain": st.dictionaries(st.text(max_size=6), FINITE_JSON, max_size=3),
        "compile_seconds": st.floats(0, MAX_SECONDS) | st.integers(0, 10**6),
        "created": st.floats(0, MAX_TIME) | st.integers(0, int(MAX_TIME)),
        "run_id": st.text(max_size=12), "host": st.text(max_size=12),
        "plugin_version": st.text(max_size=8), "target_str": st.text(max_size=12),
        "tvm_version": st.text(max_size=8), "model_dir": st.text(max_size=12),
        "params": st.lists(st.fixed_dictionaries({"name": name, "shape": st.lists(dim,
                                                                                  max_size=3),
                                                  "dtype": dtype}), max_size=3),
        "functions": st.lists(name, max_size=3),
        "target": st.text(max_size=8) | st.dictionaries(st.text(max_size=6), FINITE_JSON,
                                                        max_size=2),
        "system_lib_prefix": st.none() | st.text(max_size=8),
        "adopted": st.booleans(),
        "name": st.text(max_size=12),
        "key_digest": st.sampled_from(["a" * 64, "0123456789abcdef" * 2]),
        "signatures": st.dictionaries(name, st.fixed_dictionaries(
            {}, optional={"inputs": st.lists(arg, max_size=2),
                          "params": st.lists(arg, max_size=2), "output": st.none() | arg}),
            max_size=2),
        "inputs": st.fixed_dictionaries({
            "modules": st.lists(st.fixed_dictionaries({
                "path": name, "sha256": st.just("b" * 64), "size": st.integers(0, 10**9)}),
                max_size=2),
            "files": st.just([]), "dists": st.dictionaries(name, name, max_size=2)}),
    }


VALID = _valid_values()


def test_every_field_has_a_valid_value_strategy() -> None:
    assert set(VALID) == set(FIELDS)


@settings(max_examples=100, deadline=None, derandomize=True)
@given(data=st.data())
def test_valid_values_of_every_field_are_accepted(data: st.DataObject) -> None:
    _valid_values_accepted(data)


@pytest.mark.reliability
@settings(max_examples=1000, deadline=None)
@given(data=st.data())
def test_many_valid_values_of_every_field_are_accepted(data: st.DataObject) -> None:
    _valid_values_accepted(data)


def _valid_values_accepted(data: st.DataObject) -> None:
    manifest = _base()
    for field in data.draw(st.lists(st.sampled_from(sorted(VALID)), unique=True, max_size=6)):
        manifest[field] = data.draw(VALID[field], label=field)
    raw = json.dumps(manifest).encode()
    parsed = parse_manifest(raw, Path("m.json"), DIGEST)
    assert parsed == json.loads(raw)
    _readers_cope(parsed)


# -- the issue's examples, through the engine in real processes -----------------------------------
ISSUE_CASES: dict[str, tuple[str, Any]] = {
    "key-an-int": ("key", 5),
    "compile-seconds-a-word": ("compile_seconds", "slow"),
    "params-a-string": ("params", "junk"),
    "created-beyond-year-9999": ("created", 1e300),
}


@pytest.mark.parametrize("case", ISSUE_CASES)
def test_a_malformed_field_is_corrupt_in_the_engine_and_the_tools(
        project: Project, warm_template: Path, monkeypatch: pytest.MonkeyPatch,
        case: str) -> None:
    """Before: "key": 5 gave an AttributeError, "compile_seconds": "slow" a ValueError,
    "params": "junk" a TypeError inside run; ON neither quarantined nor rebuilt (every run
    failed), verify said "ok", and "created": 1e300 crashed list and prune."""
    field, value = ISSUE_CASES[case]
    project.warm(warm_template)
    monkeypatch.syspath_prepend(str(project.pytester.path))
    (manifest,) = (project.cache / "tvm").glob("*.manifest.json")
    data = json.loads(manifest.read_text())
    data[field] = value
    manifest.write_text(json.dumps(data))
    for command in (("list",), ("info",), ("prune", "--max-size", "0", "--dry-run")):
        assert _cli(*command, "--cache-dir", str(project.cache)) == 0, command
    assert _cli("verify", "--cache-dir", str(project.cache)) == 1, "verify flags it"

    spec = TVMModel("tinymodel:build", config={"hidden": 4})

    def engine(policy: Policy) -> JIT:  # a new engine per request: a new run
        return JIT(Settings(cache_dir=project.cache, policy=policy))

    with pytest.raises(CacheMissError) as readonly:
        engine(Policy.READONLY).compile(spec, "cpu")
    message = str(readonly.value)
    assert "the cached library is corrupt" in message, message
    assert f"has an invalid {field}" in message, message
    assert project.compiles() == [], "READONLY compiles nothing"
    on = engine(Policy.ON).compile(spec, "cpu")
    assert not on.hit
    assert on.manifest["sha256"] == file_sha256(on.path)
    x = np.full((2, 8), 0.25, dtype="float32")
    w, b = on.params["fc.weight"], on.params["fc.bias"]
    np.testing.assert_allclose(on.run("forward", x), np.maximum(x @ w.T + b, 0), rtol=1e-5,
                               atol=1e-5)
    assert len(project.compiles()) == 1, "ON recompiled once"
    (reason,) = (project.cache / ".mlcjit" / "quarantine").glob("*/REASON")
    assert f"has an invalid {field}" in reason.read_text()
    again = engine(Policy.READONLY).compile(spec, "cpu")
    assert again.hit
    assert again.path == on.path
    assert len(project.compiles()) == 1
    assert _cli("verify", "--cache-dir", str(project.cache)) == 0
