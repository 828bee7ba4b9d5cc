"""Units that need no pytest run: policies, devices, keys, the cache's building blocks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_mlcjit import ConfigError, Device, Policy, TVMModel
from pytest_mlcjit.cache.layout import EntryPaths
from pytest_mlcjit.cache.store.local import LocalStore
from pytest_mlcjit.device import Presence as P
from pytest_mlcjit.device import parse_device_list, parse_target, resolve_auto, target_for
from pytest_mlcjit.engine import settings
from pytest_mlcjit.key import canonical_json, sha256_digest


@pytest.mark.parametrize("text", ["on", "ON", " Redo ", "readonly", "Off"])
def test_policy_parse_is_case_insensitive(text: str) -> None:
    assert Policy.parse(text).value == text.strip().upper()


def resolve(cli: str | None, env: str | None, ini: str | None) -> Policy:
    """The policy through the option table's resolution (command line > env > ini)."""
    values, _ = settings.resolve(
        cli=lambda name, row: (Policy.parse(cli), "cli") if name == "policy" and cli else None,
        ini=lambda name, row: (ini, "ini mlc_jit_policy") if name == "policy" and ini else None,
        environ={"MLC_JIT_POLICY": env} if env is not None else {})
    policy: Policy = values["policy"]
    return policy


def test_policy_precedence() -> None:
    assert resolve("REDO", "OFF", "READONLY") is Policy.REDO
    assert resolve(None, "OFF", "READONLY") is Policy.OFF
    assert resolve(None, None, "READONLY") is Policy.READONLY
    assert resolve(None, "", None) is Policy.ON
    with pytest.raises(ConfigError, match="invalid MLC_JIT_POLICY 'x'"):
        resolve(None, "x", None)


def test_device_parsing() -> None:
    assert parse_device_list("CPU, cuda:1,cuda:1,auto") == ["cpu", "cuda:1", "auto"]
    assert Device.parse("cuda:0") == Device("cuda")
    assert Device.parse("cuda:2").full_name == "cuda:2"
    assert str(Device.parse("cuda:0")) == "cuda"


def test_auto_prefers_the_first_present_gpu() -> None:
    presence = {"cuda": P(False), "rocm": P(True), "vulkan": P(True)}
    assert resolve_auto(["auto", "cpu"], presence) == ["rocm", "cpu"]
    assert resolve_auto(["auto"], {}) == ["cpu"]
    assert resolve_auto(["auto", "cpu"], {}) == ["cpu"]


def test_targets() -> None:
    assert target_for(Device("cpu"), None) == {"kind": "llvm"}
    assert target_for(Device("cuda"), P(True, arch="sm_90")) == {"kind": "cuda", "arch": "sm_90"}
    assert parse_target('{"kind": "cuda", "arch": "sm_80"}') == {"kind": "cuda", "arch": "sm_80"}
    assert parse_target(" llvm ") == "llvm"
    with pytest.raises(ConfigError, match="no longer parses CLI-style target strings"):
        parse_target("llvm -mcpu=znver4")


def test_canonical_json_is_order_independent() -> None:
    assert canonical_json({"b": 1, "a": [1, {"d": 2, "c": 3}]}) == '{"a":[1,{"c":3,"d":2}],"b":1}'
    assert sha256_digest({"a": 1, "b": 2}) == sha256_digest({"b": 2, "a": 1})


def test_key_is_stable_across_processes(tmp_path: Path) -> None:
    """The same spec gives the same digest in fresh interpreters (no hash seed, no ids)."""
    (tmp_path / "keymodel.py").write_text("def build(hidden=4):\n    pass\n")
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]);"
            "from pytest_mlcjit import JIT, TVMModel;"
            "r = JIT().request(TVMModel('keymodel:build', {'hidden': 4, 'b': [1, 2]}), 'cpu');"
            "print(json.dumps([r.digest, r.key]))")
    outs = [subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                           text=True, check=True, env={"PYTHONHASHSEED": seed, "PATH": ""}).stdout
            for seed in ("1", "2")]
    assert outs[0] == outs[1]
    digest, key = json.loads(outs[0])
    assert key["config"] == {"b": [1, 2], "hidden": 4}
    assert key["target"] == {"kind": "llvm"}
    assert key["toolchain"]["tvm"]["version"]
    assert len(digest) == 64


def test_key_changes_with_every_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pytest_mlcjit import JIT

    monkeypatch.syspath_prepend(str(tmp_path))
    source = tmp_path / "keymodel2.py"
    source.write_text("def build(hidden=4):\n    pass\n")
    base = TVMModel("keymodel2:build", {"hidden": 4})
    digests = {
        JIT().request(base, "cpu").digest,
        JIT().request(TVMModel("keymodel2:build", {"hidden": 5}), "cpu").digest,
        JIT().request(TVMModel("keymodel2:build", {"hidden": 4}, opt_level=2), "cpu").digest,
        JIT().request(TVMModel("keymodel2:build", {"hidden": 4},
                               target={"kind": "cuda", "arch": "sm_90"}), "cpu").digest,
        JIT().request(TVMModel("keymodel2:build", {"hidden": 4},
                               target={"kind": "cuda", "arch": "sm_80"}), "cpu").digest,
    }
    assert len(digests) == 5
    same = JIT().request(TVMModel("keymodel2:build", {"hidden": 4}, seed=9), "cpu").digest
    assert same in digests, "the parameter seed does not change the library's bytes"
    source.write_text("def build(hidden=4):\n    return 1\n")
    assert JIT().request(base, "cpu").digest not in digests, "the factory's source is keyed"


def test_cache_refuses_a_world_writable_root(tmp_path: Path) -> None:
    from pytest_mlcjit import UntrustedCacheError

    root = tmp_path / "shared"
    root.mkdir()
    root.chmod(0o777)
    with pytest.raises(UntrustedCacheError, match="writable by other users"):
        LocalStore(root).open_for_writing()
    LocalStore(root, allow_untrusted=True).open_for_writing()
    root.chmod(0o1777)  # sticky, like /tmp: accepted
    LocalStore(root).open_for_writing()


def test_entry_paths() -> None:
    paths = EntryPaths("abc", Path("/c/tvm/abc.so"))
    assert paths.manifest == Path("/c/tvm/abc.manifest.json")
    assert paths.log == Path("/c/tvm/abc.log")


def test_run_history_keeps_the_newest_runs(tmp_path: Path) -> None:
    from pytest_mlcjit.cache.history import RUNS_KEPT, read_runs, record_run

    root = tmp_path / "cache"
    LocalStore(root).open_for_writing()
    total = 2 * RUNS_KEPT + 10
    for i in range(total):
        record_run(root, {"run": i, "requests": 1})
    runs = read_runs(root, limit=10 * RUNS_KEPT)
    assert RUNS_KEPT <= len(runs) < 2 * RUNS_KEPT, "cut back, not unbounded"
    assert [r["run"] for r in runs] == list(range(total - 1, total - 1 - len(runs), -1))
    assert not list((root / ".mlcjit").glob(".runs.jsonl.*.tmp")), "no temporary file left"


def test_try_flock_sees_the_cache_s_own_lock(tmp_path: Path) -> None:
    from pytest_mlcjit.cache.locks import try_flock

    cache = LocalStore(tmp_path / "cache").open_for_writing()
    digest = "ab" * 32
    with cache.lock(digest, timeout=5):
        assert try_flock(cache.lock_path(digest)) is None, "held: not taken"
    fd = try_flock(cache.lock_path(digest))
    assert fd is not None, "released: taken"
    try:
        assert try_flock(cache.lock_path(digest)) is None, "and now it excludes others"
    finally:
        os.close(fd)
