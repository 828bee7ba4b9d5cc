"""Shared fixtures: a pytester project with a tiny real model, and ways to count what the
cache holds and how many compilations really ran (counted by the model factory itself,
inside the compile subprocess, not by the plugin).

Two ways to run pytest on a project: :meth:`Project.run`, inside this process (the
default: the plugin keeps every state of a run in the run's own objects, so a run leaves
nothing behind; compiles still run in processes of their own), and
:meth:`Project.run_subprocess`, a real subprocess, where a process is the subject: xdist
(``-n``, which :meth:`Project.run` sends there by itself), signals, a pty, a parent that
dies, start-up cost. The ``pytest-mlcjit`` command runs in this process through
:func:`run_cli`, which fails a command that leaves ``sys.path`` changed.

The benchmarks' ``--quick`` modes are marked ``bench`` and deselected unless ``--run-bench``
is given (``.ci/run`` runs them once, on their own).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import json
import os
import pkgutil
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# Imported here, before any pytester snapshot of sys.modules: an in-process run that loads
# a library or collects a test module importing numpy would otherwise import TVM or numpy
# anew after pytester forgot them, and neither's C core can be loaded twice in a process.
import numpy  # noqa: F401
import pytest
import tvm  # noqa: F401
from tvm import relax  # noqa: F401

# The same for the HTTP clients the remote tests use (a second copy of requests' cookie
# jar, say, fails the first copy's checks: "You can only merge into CookieJar").
with contextlib.suppress(ImportError):
    import azure.storage.blob  # noqa: F401
    import requests  # noqa: F401

import pytest_mlcjit


def _import_the_whole_plugin() -> None:
    """Import every module of pytest_mlcjit now, before any pytester snapshot of sys.modules.

    The package imports its modules lazily and keeps what it imported (``TVMModel`` in its
    globals, say). A module first imported inside an in-process run is forgotten by
    pytester afterwards, and the next run would import a second copy whose classes fail the
    first copy's ``isinstance`` checks. A module that cannot be imported here (an optional
    dependency missing) is left to be imported, and forgotten, as before.
    """
    for info in pkgutil.walk_packages(pytest_mlcjit.__path__, f"{pytest_mlcjit.__name__}."):
        if info.name.rpartition(".")[2] == "__main__":
            continue
        with contextlib.suppress(ImportError):
            importlib.import_module(info.name)


_import_the_whole_plugin()

ENV_VARS = ("MLC_JIT_POLICY", "MLC_JIT_CACHE_DIR", "MLC_LLM_HOME", "MLC_DSO_SUFFIX",
            "MLC_TEMP_DIR", "PYTEST_ADDOPTS", "PYTEST_XDIST_AUTO_NUM_WORKERS",
            "TVM_TEST_TARGETS", "TVM_TEST_LOCK_DIR", "MLC_JIT_GPU_LOCK", "MLC_JIT_GPU_ASSIGN",
            "MLCJIT_TEST_PRESENCE")

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


#: ``per_config`` tests of each config that use the library without loading it: a worker
#: of a nested ``-n 2`` run then imports neither TVM nor numpy (seconds of CPU per worker);
#: that the libraries run right is checked in this process, in tests/test_policies.py.
PATH_TESTS = '''
import pytest
from pytest_mlcjit import TVMModel


@pytest.mark.parametrize("i", range({per_config}))
@pytest.mark.parametrize("compiled_model",
                         [TVMModel("tinymodel:build", config=c) for c in {configs!r}],
                         indirect=True)
def test_library(compiled_model, i):
    assert compiled_model.path.stat().st_size > 0
'''


@dataclasses.dataclass
class Project:
    """A pytester project with its own cache dir and compile counter."""

    pytester: pytest.Pytester
    cache: Path
    counter: Path

    def run(self, *args: str, cache: bool = True) -> pytest.RunResult:
        """Run pytest against this project's cache: inside this process (:func:`inprocess`),
        or in a subprocess when the arguments ask for xdist workers (``-n``)."""
        if _wants_xdist(args):
            return self.run_subprocess(*args, cache=cache)
        extra = [f"--mlc-jit-cache-dir={self.cache}"] if cache else []
        return inprocess(self.pytester, "-p", "no:cacheprovider", *extra, *args)

    def run_subprocess(self, *args: str, cache: bool = True) -> pytest.RunResult:
        """Run pytest in a real subprocess against this project's cache: where a process
        is the subject (xdist, signals, a pty, the parent dying, start-up cost)."""
        # One argument, "--opt=PATH": pytest counts a separate PATH that exists into its
        # rootdir (and ini) discovery, before plugin options are known, so xdist workers
        # started after the cache dir appeared would disagree on test ids.
        extra = [f"--mlc-jit-cache-dir={self.cache}"] if cache else []
        return self.pytester.runpytest_subprocess("-p", "no:cacheprovider", *extra, *args)

    #: The older name of :meth:`run` (both run in this process).
    run_inprocess = run

    def compiles(self) -> list[str]:
        """One line per real compilation (written by the factory in the compile process)."""
        if not self.counter.exists():
            return []
        return self.counter.read_text().splitlines()

    def manifests(self, backend: str = "tvm") -> list[dict[str, Any]]:
        d = self.cache / backend
        return [json.loads(p.read_text()) for p in sorted(d.glob("*.manifest.json"))]

    def libraries(self, backend: str = "tvm", suffix: str = "so") -> list[Path]:
        return sorted((self.cache / backend).glob(f"*.{suffix}"))

    def warm(self, template: Path) -> None:
        """Start from a copy of :func:`warm_template`'s cache, which holds the tiny model
        (hidden=4) for cpu: saves a compile where compiling it proves nothing."""
        model = (self.pytester.path / "tinymodel.py").read_bytes()
        assert (template / "tinymodel.py").read_bytes() == model, "keys would differ"
        shutil.copytree(template / "cache", self.cache)

    def write_path_tests(self, configs: Sequence[Mapping[str, object]],
                         per_config: int = 1) -> None:
        """Tests of each config that use the library without loading it
        (:data:`PATH_TESTS`)."""
        self.pytester.makepyfile(test_library=PATH_TESTS.format(configs=list(configs),
                                                                per_config=per_config))

    def write_tests(self, configs: Sequence[Mapping[str, object]], per_config: int = 1,
                    name: str = "test_tiny") -> None:
        self.pytester.makepyfile(**{name: TESTS_TEMPLATE.format(configs=configs,
                                                                per_config=per_config)})


def _wants_xdist(args: Sequence[str]) -> bool:
    return any(a.startswith(("-n", "--numprocesses", "--dist")) for a in args)


#: What an inner run of :func:`inprocess` ignores (see there).
ALREADY_IMPORTED = ("-Wignore:Module already imported so cannot be rewritten; pytest_mlcjit"
                    ":pytest.PytestAssertRewriteWarning")


def inprocess(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    """``pytester.runpytest_inprocess(*args)``, made safe for this suite.

    TVM and numpy were imported before any snapshot (above), so a run may compile, load
    and run libraries; xdist runs go to a subprocess (:meth:`Project.run_subprocess`).
    The inner run starts from Python's default warning filters, as a subprocess would, not
    from this suite's ``filterwarnings = error``; its plugin state lives in its own
    objects (``Config.stash``), so nothing carries over from one run to the next.

    Each inner run asks to rewrite the asserts of the plugin's package, which this process
    imported already; where that import went through an editable install's finder (the
    README's ``pip install -e`` then ``pytest``, not ``python -m pytest``), it was not
    rewritten, and pytest would count a warning in every inner run's outcomes. That one
    warning is ignored: a subprocess run has no such import before its own.
    """
    assert not _wants_xdist(args), "xdist runs need a subprocess (Project.run_subprocess)"
    for path in pytester.path.glob("*.py"):
        loaded = getattr(sys.modules.get(path.stem), "__file__", None)
        assert path.stem == "conftest" or loaded in (None, str(path)), \
            f"{path.name} would collide with the module {loaded} in this process: rename it"
    with warnings.catch_warnings():
        warnings.resetwarnings()
        # An inner run that is interrupted (a test raising KeyboardInterrupt) returns its
        # result with ExitCode.INTERRUPTED instead of interrupting this run too.
        return pytester.runpytest_inprocess(ALREADY_IMPORTED, *args, no_reraise_ctrlc=True)


# -- the pytest-mlcjit command, in this process --------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CliRun:
    """What one ``pytest-mlcjit`` command did (:func:`run_cli`): its exit status and
    what it printed to each stream."""

    returncode: int
    stdout: str
    stderr: str


def run_cli(*args: str, cwd: Path | None = None,
            env: Mapping[str, str] | None = None) -> CliRun:
    """``pytest-mlcjit ARGS`` through :func:`pytest_mlcjit.cli.main`, in this process:
    in ``cwd`` and with ``env`` added to the environment when given (both undone
    afterwards), its output captured (``sys.stdout`` and ``sys.stderr`` redirected), its
    exit status from the return value or from argparse's ``SystemExit`` (``--help``,
    ``--version``, usage errors). Any other exception (a traceback for a user) propagates.

    A command must leave ``sys.path`` as it found it (``explain`` of one spec puts the
    working directory there while it imports the factory, and takes it off again): this
    asserts that, rather than restoring it, so that a command that leaks an entry fails
    the test that ran it (the entry is then taken off, so that it fails no other test).
    """
    from pytest_mlcjit.cli import main

    out, err = io.StringIO(), io.StringIO()
    path = sys.path[:]
    with pytest.MonkeyPatch.context() as patch:
        if cwd is not None:
            patch.chdir(cwd)
        for name, value in (env or {}).items():
            patch.setenv(name, value)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(list(args))
            except SystemExit as exc:  # argparse: --help, --version, usage errors
                rc = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    left = sys.path[:]
    if left != path:
        sys.path[:] = path
        raise AssertionError(
            f"pytest-mlcjit {' '.join(args)} changed sys.path: added "
            f"{[p for p in left if p not in path]}, removed {[p for p in path if p not in left]}"
            f" (was {path}, left {left})")
    return CliRun(rc, out.getvalue(), err.getvalue())


# -- opt-in tests: each marker below runs only with its option ----------------------------------
#: marker → (option, help). .ci/run runs each once: `--run-slow -m slow`, `--run-bench -m bench`.
OPT_IN = {
    "slow": ("--run-slow", "also run the tests marked slow (they build and install the wheel "
             "and the sdist in fresh virtualenvs); .ci/run runs them once"),
    "reliability": ("--run-reliability", "also run the reliability tier (random kills, "
                    "stress, full disks, other users, pty progress, nested xdist stress: "
                    "docs/reliability.md); .ci/run runs it as its own step: "
                    "pytest -n 2 --run-reliability -m reliability"),
    "servers": ("--run-servers", "also run the tests that start the npm test servers and "
                "clients (Azurite, GitHub's cache stand-in proven by @actions/cache: "
                "npm ci --prefix tests/node); .ci/run runs them as their own step: "
                "pytest -n 2 --run-servers -m servers"),
    "bench": ("--run-bench", "also run the tests marked bench (the benchmarks' --quick modes, "
              "minutes of CPU); .ci/run runs them once: pytest -n 2 --run-bench -m bench"),
}


def pytest_addoption(parser: pytest.Parser) -> None:
    for option, text in OPT_IN.values():
        parser.addoption(option, action="store_true", default=False, help=text)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    off = [marker for marker, (option, _) in OPT_IN.items() if not config.getoption(option)]
    deselected = [item for item in items
                  if any(item.get_closest_marker(marker) is not None for marker in off)]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        dropped = {id(item) for item in deselected}
        items[:] = [item for item in items if id(item) not in dropped]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def shared(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory remote (``file://``), set as MLC_JIT_REMOTE."""
    path = tmp_path / "shared"
    path.mkdir()
    monkeypatch.setenv("MLC_JIT_REMOTE", path.as_uri())
    return path


@pytest.fixture
def project(pytester: pytest.Pytester, tmp_path_factory: pytest.TempPathFactory,
            monkeypatch: pytest.MonkeyPatch) -> Project:
    root = tmp_path_factory.mktemp("mlcjit")
    counter = root / "compiles.txt"
    monkeypatch.setenv("MLCJIT_TEST_COUNT", str(counter))
    pytester.makepyfile(tinymodel=TINY_MODEL)
    return Project(pytester, root / "cache", counter)


#: ``python -m pytest``, with Ctrl-C restored: a process started from a background job (a
#: CI runner, ``cmd &``) inherits SIGINT ignored, and a test that sends SIGINT must reach a
#: pytest that hears it, as a terminal's would.
PYTEST_HEARING_SIGINT = [
    sys.executable, "-c",
    "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "import pytest; sys.exit(pytest.main(sys.argv[1:]))",
]


def pids_alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        alive.append(pid)
    return alive


# -- reliability tests: the engine driven from plain processes ------------------------------
#: A process that drives the engine directly (no pytest): ``python mlcjit_driver.py JOB``,
#: JOB being JSON: {"cache", "requests": [config, ...] (or {"factory", "config", "name",
#: "target", "policy"} for any spec and a per-request policy), "policy", "run_id", "lock_timeout",
#: "fresh" (a new engine per request), "ready" (a dir where it announces itself, imports
#: done), "go" (a file to wait for before starting), "check" (load each returned library and
#: check its numerics against numpy: proof that it is whole)}. It prints
#: one JSON line per request: before compiling {"event": "request", digest, library,
#: manifest}, then the outcome {"i", ok, hit, path, sha256 (of the returned file, computed
#: here), manifest_sha256, size, manifest_size} or {"i", ok: false, error, message}.
DRIVER = '''
import json, os, sys, time, uuid
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from pytest_mlcjit import JIT, MlcJitError, Policy, Settings, TVMModel
from pytest_mlcjit.compiler.backends import locate
from pytest_mlcjit.key import file_sha256


def main():
    job = json.loads(sys.argv[1])
    if job.get("ready"):
        open(os.path.join(job["ready"], str(os.getpid())), "w").close()
    if job.get("go"):
        while not os.path.exists(job["go"]):
            time.sleep(0.005)
    root = Path(job["cache"]).absolute()
    settings = Settings(cache_dir=root, policy=Policy.parse(job.get("policy", "ON")),
                        run_id=job.get("run_id") or uuid.uuid4().hex,
                        lock_timeout=job.get("lock_timeout"))
    engine = None
    for i, config in enumerate(job["requests"]):
        if engine is None or job.get("fresh"):
            engine = JIT(settings)
        policy = None
        if "factory" in config or "policy" in config:
            # {"factory", "config", "name", "target", "policy"}: any spec, a per-call policy
            spec = TVMModel(config.get("factory", "tinymodel:build"),
                            config=config.get("config"), name=config.get("name"),
                            target=config.get("target"))
            policy = config.get("policy")
        else:
            spec = TVMModel("tinymodel:build", config=config)
        out = {"i": i, "config": config}
        try:
            req = engine.request(spec, "cpu")
            paths = locate(req, root)
            print(json.dumps({"event": "request", "digest": req.digest,
                              "library": str(paths.library), "manifest": str(paths.manifest)}),
                  flush=True)
            model = engine.compile(spec, "cpu", policy=policy)
        except MlcJitError as exc:
            out.update(ok=False, error=type(exc).__name__, message=str(exc))
        else:
            out.update(ok=True, hit=model.hit, path=str(model.path), digest=model.digest,
                       sha256=file_sha256(model.path), size=os.path.getsize(model.path),
                       manifest_sha256=model.manifest["sha256"],
                       manifest_size=model.manifest["size"])
            if job.get("check"):
                import numpy as np

                x = np.full((2, 8), 0.25, dtype="float32")
                w, b = model.params["fc.weight"], model.params["fc.bias"]
                np.testing.assert_allclose(model.run("forward", x), np.maximum(x @ w.T + b, 0),
                                           rtol=1e-5, atol=1e-5)
                out["checked"] = True
        print(json.dumps(out), flush=True)


main()
'''


@dataclasses.dataclass
class Engine:
    """Runs :data:`DRIVER` processes against a :class:`Project`'s cache and counter."""

    project: Project
    script: Path

    @dataclasses.dataclass
    class Contents:
        """What :meth:`check_cache` found in a cache (every part of it checked)."""

        #: The manifests (each names a whole library) and how many libraries they name.
        manifests: list[dict[str, Any]] = dataclasses.field(default_factory=list)
        libraries: int = 0
        #: Pending manifests, and the files only they name (a publish killed before its
        #: commit point).
        pending: list[dict[str, Any]] = dataclasses.field(default_factory=list)
        unpublished: list[Path] = dataclasses.field(default_factory=list)
        #: Temporary files of processes that are gone, and staging directories left.
        temporary: list[Path] = dataclasses.field(default_factory=list)
        staging: list[Path] = dataclasses.field(default_factory=list)

    def popen(self, requests: list[dict[str, Any]], *, env: dict[str, str] | None = None,
              stderr: Any = subprocess.PIPE, umask: int = -1,
              **job: Any) -> subprocess.Popen[str]:
        data = {"cache": str(self.project.cache), "requests": requests, **job}
        return subprocess.Popen(
            [sys.executable, str(self.script), json.dumps(data)], cwd=self.script.parent,
            stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL, text=True,
            env={**os.environ, **(env or {})}, umask=umask,
        )

    def run(self, requests: list[dict[str, Any]], *, timeout: float = 300,
            env: dict[str, str] | None = None, umask: int = -1,
            **job: Any) -> list[dict[str, Any]]:
        """Run one driver to its end; its outcomes, one per request."""
        proc = self.popen(requests, env=env, umask=umask, **job)
        out, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, err
        return outcomes(out)

    def warm(self, template: Path) -> None:
        """Start from a copy of :func:`warm_template`'s cache (:meth:`Project.warm`)."""
        self.project.warm(template)

    def check_cache(self, *, staging: bool = True) -> Engine.Contents:
        """Check the invariants of the whole cache directory from its files alone, and
        return what it holds. No file name is derived from the plugin's key or entry
        formula: every name checked is one found on disk or written in a manifest found
        on disk. Call it when no process of this cache runs (after a kill: once its tree
        is gone). Fails the test, naming every problem, unless:

        * every manifest (``<dir>/<name>.manifest.json``) names a library in its directory
          whose SHA-256 and size, computed here, are the manifest's, and a log that exists;
        * every other library and log is named by a pending manifest
          (``.<name>.manifest.pending.json``, what a publish killed before its commit point
          leaves), and such a library is whole by one of them;
        * every other file is a temporary file (``.<…>.<pid>.<hex>.tmp``) of a process that
          is gone, or a variants record (``variants/<name>.json``) that parses;
        * nobody holds a key's lock, and every staging directory left is abandoned (nobody
          holds its lock); with ``staging=False``, none is left at all.
        """
        root = self.project.cache
        state = Engine.Contents()
        problems: list[str] = []
        if root.is_dir():
            for directory in sorted(root.iterdir()):
                if directory.is_dir() and directory.name != ".mlcjit":
                    problems += self._check_entries(directory, state)
            problems += self._check_control(root / ".mlcjit", state, staging=staging)
        assert problems == [], "\n".join(problems)
        return state

    #: A temporary file: ``.<name>.<pid>.<hex>.tmp``.
    _TEMPORARY = r"\..+\.(\d+)\.[0-9a-f]+\.tmp"

    @staticmethod
    def _whole(path: Path, manifest: Mapping[str, Any]) -> bool:
        """Whether ``path`` has the size and SHA-256 ``manifest`` gives (computed here)."""
        import hashlib

        try:
            data = path.read_bytes()
        except OSError:
            return False
        return (len(data) == manifest.get("size")
                and hashlib.sha256(data).hexdigest() == manifest.get("sha256"))

    @staticmethod
    def _lock_free(lock: Path) -> bool:
        """Whether nobody holds ``lock``'s flock (taken and released at once)."""
        import fcntl

        fd = os.open(lock, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        finally:
            os.close(fd)
        return True

    @classmethod
    def _check_entries(cls, directory: Path, state: Engine.Contents) -> list[str]:
        """:meth:`check_cache` for one backend's directory of entries."""
        import re

        files = {p.name: p for p in directory.iterdir()}
        problems, named, pending = cls._check_manifests(directory, files, state)
        for name, path in sorted(files.items()):
            if name.endswith((".manifest.json", ".manifest.pending.json")):
                continue
            if (found := re.fullmatch(cls._TEMPORARY, name)) is not None:
                state.temporary.append(path)
                if pids_alive([int(found.group(1))]):
                    problems.append(f"{path}: a temporary file of a live process")
            elif name == "variants" and path.is_dir():
                for record in path.iterdir():
                    if re.fullmatch(cls._TEMPORARY, record.name) is None:
                        json.loads(record.read_text())  # a record that parses
            elif name in named:
                state.libraries += name.endswith(".so")
            elif name in pending:
                state.unpublished.append(path)
                if name.endswith(".so") and not any(cls._whole(path, m) for m in pending[name]):
                    problems.append(f"{path}: named only by pending manifests, and not whole "
                                    "by any of them")
            else:
                problems.append(f"{path}: no manifest names it")
        return problems

    @classmethod
    def _check_manifests(cls, directory: Path, files: Mapping[str, Path],
                         state: Engine.Contents
                         ) -> tuple[list[str], set[str], dict[str, list[dict[str, Any]]]]:
        """The manifests and pending manifests of a directory of entries: (problems, the
        files the manifests name, the files pending manifests name → those manifests)."""
        problems = []
        named: set[str] = set()
        pending: dict[str, list[dict[str, Any]]] = {}
        for name, path in sorted(files.items()):
            if name.endswith(".manifest.json") and not name.startswith("."):
                manifest = json.loads(path.read_text())
                state.manifests.append(manifest)
                library = directory / str(manifest.get("library"))
                if library.parent != directory or not cls._whole(library, manifest):
                    problems.append(f"{path} names {library.name}, which is missing or not "
                                    "the library it describes")
                if not (directory / str(manifest.get("log"))).is_file():
                    problems.append(f"{path} names a log that is missing")
                named |= {str(manifest.get("library")), str(manifest.get("log"))}
            elif name.endswith(".manifest.pending.json") and name.startswith("."):
                manifest = json.loads(path.read_text())
                state.pending.append(manifest)
                for field in ("library", "log"):
                    pending.setdefault(str(manifest.get(field)), []).append(manifest)
        return problems, named, pending

    @classmethod
    def _check_control(cls, control: Path, state: Engine.Contents, *,
                       staging: bool) -> list[str]:
        """:meth:`check_cache` for the locks and the staging directories."""
        problems = [f"{lock}: a key's lock is still held"
                    for lock in sorted((control / "locks").glob("*.lock"))
                    if not cls._lock_free(lock)]
        for path in sorted((control / "staging").glob("*")):
            if path.name.endswith(".lock"):
                continue
            state.staging.append(path)
            lock = path.with_name(path.name + ".lock")
            if not staging:
                problems.append(f"{path}: a staging directory is left")
            elif lock.exists() and not cls._lock_free(lock):
                problems.append(f"{path}: a staging directory whose owner lives")
        return problems

    def lock_is_free(self, digest: str) -> bool:
        from filelock import FileLock, Timeout

        lock = FileLock(self.project.cache / ".mlcjit" / "locks" / f"{digest}.lock",
                        timeout=0, thread_local=False)
        try:
            lock.acquire()
        except Timeout:
            return False
        lock.release()
        return True


def compilers_running(cache: Path, digest: str) -> list[int]:
    """Pids of processes whose command line names a staging dir of ``digest`` (Linux)."""
    needle = str(cache / ".mlcjit" / "staging" / digest[:32]).encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if needle in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def wait_until(condition: Any, what: str, timeout: float = 120.0) -> None:
    """Poll ``condition`` (a safety limit against hangs, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.005)


def outcomes(stdout: str, *, events: bool = False) -> list[dict[str, Any]]:
    """The driver's JSON lines: its outcomes (or, with ``events``, everything)."""
    lines = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    return lines if events else [line for line in lines if "i" in line]


#: The summary's words for each outcome, singular and plural.
_OUTCOME_WORDS = {"hit": "hit", "hits": "hit", "remote hit": "remote_hit",
                  "remote hits": "remote_hit", "compiled": "compiled", "waited": "waited",
                  "failed": "failed", "missed": "missed"}


def accounting(result: pytest.RunResult) -> dict[str, int]:
    """The summary line's counts (``requests`` and each outcome shown), checked to add up:
    ``6 requests: 4 hits, 2 compiled; …`` → ``{"requests": 6, "hit": 4, "compiled": 2}``."""
    import re

    for line in result.outlines:
        match = re.fullmatch(r"(\d+) requests?: ([^;]*)(?:; .*)?", line)
        if match is None:
            continue
        counts = {"requests": int(match.group(1))}
        for part in match.group(2).split(", "):
            n, _, word = part.partition(" ")
            counts[_OUTCOME_WORDS[word]] = int(n)
        assert sum(counts.values()) == 2 * counts["requests"], line
        return counts
    raise AssertionError(f"no accounting line in:\n{result.stdout.str()}")


@pytest.fixture
def engine(project: Project) -> Engine:
    script = project.pytester.path / "mlcjit_driver.py"
    script.write_text(DRIVER)
    return Engine(project, script)


@pytest.fixture(scope="session")
def warm_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dir with ``cache/`` holding the tiny model (hidden=4) for cpu, compiled once per
    test session and shared by the xdist workers (the xdist recipe: a lock in the directory
    shared by all workers' temp dirs); copy it with :meth:`Project.warm`, never change it.
    The factory module is written as pytester writes it (byte-identical), so the key is the
    same."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    work = base / "mlcjit-warm-template"
    with FileLock(f"{work}.lock"):
        if (work / "ready").exists():
            return work
        shutil.rmtree(work, ignore_errors=True)  # a try that failed half-way
        work.mkdir()
        (work / "tinymodel.py").write_text(TINY_MODEL.strip())
        (work / "mlcjit_driver.py").write_text(DRIVER)
        cache = work / "cache"
        job = json.dumps({"cache": str(cache), "requests": [{"hidden": 4}]})
        env = {k: v for k, v in os.environ.items()
               if k not in ENV_VARS and k != "MLCJIT_TEST_COUNT"}
        proc = subprocess.run([sys.executable, str(work / "mlcjit_driver.py"), job], cwd=work,
                              capture_output=True, text=True, timeout=300, env=env, check=False)
        assert proc.returncode == 0, proc.stderr
        assert outcomes(proc.stdout)[0]["ok"], proc.stdout
        (work / "ready").touch()
    return work


#: Holds every test until the cache holds ``count`` published libraries. Which compiles
#: prefetch wins is a race when tests may ask first (a test that asks for a library no
#: one has started compiles it itself, which is right); holding the tests makes "every
#: library was compiled ahead of time" a fact to assert, and a prefetch that does not
#: compile them fails the tests instead of hanging them.
HOLD_TESTS = '''
import pathlib, time
import pytest


@pytest.fixture(autouse=True)
def _hold_until_prefetched():
    libraries = pathlib.Path({root!r})
    deadline = time.monotonic() + 300
    while len(list(libraries.glob("*.manifest.json"))) < {count}:
        assert time.monotonic() < deadline, "prefetch did not publish {count} libraries"
        time.sleep(0.05)
'''


def hold_tests(project: Project, count: int) -> None:
    project.pytester.makeconftest(HOLD_TESTS.format(root=str(project.cache / "tvm"),
                                                    count=count))
