"""Shared fixtures: a pytester project with a tiny real model, and ways to count what the
cache holds and how many compilations really ran (counted by the model factory itself,
inside the compile subprocess, not by the plugin)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

ENV_VARS = ("MLC_JIT_POLICY", "MLC_JIT_CACHE_DIR", "MLC_LLM_HOME", "MLC_DSO_SUFFIX",
            "MLC_TEMP_DIR", "PYTEST_ADDOPTS", "PYTEST_XDIST_AUTO_NUM_WORKERS")

#: A real Relax model whose factory records each call (one call = one compilation).
TINY_MODEL = '''
import os
import time

from tvm.relax.frontend import nn


class Tiny(nn.Module):
    def __init__(self, hidden):
        self.fc = nn.Linear(8, hidden)

    def forward(self, x):
        return nn.relu(self.fc(x))


def build(hidden=4, fail=False, sleep=0.0):
    counter = os.environ.get("MLCJIT_TEST_COUNT")
    if counter:
        with open(counter, "a") as f:
            f.write(f"{os.getpid()} hidden={hidden}\\n")
    if fail:
        raise RuntimeError(f"factory failed on purpose (hidden={hidden})")
    time.sleep(float(os.environ.get("MLCJIT_TEST_SLEEP", sleep)))
    return Tiny(hidden), {"forward": {"x": nn.spec.Tensor((2, 8), "float32")}}
'''

#: Tests over the tiny model: `n` tests per config, each checking numerics against numpy.
TESTS_TEMPLATE = '''
import numpy as np
import pytest
from pytest_mlcjit import TVMModel

CONFIGS = {configs!r}


@pytest.mark.parametrize("i", range({per_config}))
@pytest.mark.parametrize("compiled_model", [TVMModel("tinymodel:build", config=c) for c in CONFIGS],
                         indirect=True)
def test_forward(compiled_model, i):
    x = np.full((2, 8), 0.5 + i, dtype="float32")
    out = compiled_model.run("forward", x)
    w, b = compiled_model.params["fc.weight"], compiled_model.params["fc.bias"]
    np.testing.assert_allclose(out, np.maximum(x @ w.T + b, 0), rtol=1e-5, atol=1e-5)
'''


@dataclasses.dataclass
class Project:
    """A pytester project with its own cache dir and compile counter."""

    pytester: pytest.Pytester
    cache: Path
    counter: Path

    def run(self, *args: str, cache: bool = True) -> pytest.RunResult:
        """Run pytest in a real subprocess against this project's cache."""
        extra = ["--mlc-jit-cache-dir", str(self.cache)] if cache else []
        return self.pytester.runpytest_subprocess("-p", "no:cacheprovider", *extra, *args)

    def compiles(self) -> list[str]:
        """One line per real compilation (written by the factory in the compile process)."""
        if not self.counter.exists():
            return []
        return self.counter.read_text().splitlines()

    def manifests(self, backend: str = "tvm") -> list[dict[str, object]]:
        d = self.cache / backend
        return [json.loads(p.read_text()) for p in sorted(d.glob("*.manifest.json"))]

    def libraries(self, backend: str = "tvm", suffix: str = "so") -> list[Path]:
        return sorted((self.cache / backend).glob(f"*.{suffix}"))

    def write_tests(self, configs: list[dict[str, object]], per_config: int = 1,
                    name: str = "test_tiny") -> None:
        self.pytester.makepyfile(**{name: TESTS_TEMPLATE.format(configs=configs,
                                                                per_config=per_config)})


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def project(pytester: pytest.Pytester, tmp_path_factory: pytest.TempPathFactory,
            monkeypatch: pytest.MonkeyPatch) -> Project:
    root = tmp_path_factory.mktemp("mlcjit")
    counter = root / "compiles.txt"
    monkeypatch.setenv("MLCJIT_TEST_COUNT", str(counter))
    pytester.makepyfile(tinymodel=TINY_MODEL)
    return Project(pytester, root / "cache", counter)


def pids_alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        alive.append(pid)
    return alive
