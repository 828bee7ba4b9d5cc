"""The ``pytest-mlcjit`` command on a real cache built by real compiles: every subcommand,
its human output and its ``--json`` output parsed back.

Every command runs in this process, through :func:`pytest_mlcjit.cli.main`
(:func:`conftest.run_cli`: its output redirected, its exit status from the return value or
argparse's ``SystemExit``, ``sys.path`` checked unchanged); ``key`` and ``explain`` start
their own ``pytest --collect-only`` subprocess, as they do for users. Real processes only
where a process is the subject: the installed console script and ``python -m
pytest_mlcjit`` (one smoke test), what a fresh process imports, a lock held by another
process, a faked toolchain on a new ``PYTHONPATH``.

One cache is warmed per session (three configs of the tiny model, compiled by a prepare
run; shared by the xdist workers); tests that change a cache work on a copy of it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import ENV_VARS, TESTS_TEMPLATE, TINY_MODEL, CliRun, run_cli
from pytest_mlcjit import JIT, Settings, TVMModel, __version__

CONFIGS = [{"hidden": 4}, {"hidden": 6}, {"hidden": 8}]
CLI = str(Path(sys.executable).with_name("pytest-mlcjit"))
SUBCOMMANDS = ("list", "info", "verify", "prune", "clear", "key", "explain")


class Warm:
    """A project directory with the tiny model, its tests and a warm cache, and the
    ``pytest-mlcjit`` command run in this process from that directory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.cache = path / "cache"
        self.counter = path / "compiles.txt"

    def cli(self, *args: str, env: dict[str, str] | None = None) -> CliRun:
        """``pytest-mlcjit ARGS`` in this process (:func:`conftest.run_cli`), in this
        directory, with ``env`` added to the environment (both undone afterwards)."""
        return run_cli(*args, cwd=self.path, env=env)

    def json(self, command: str, *args: str, cache: Path | None = None, rc: int = 0) -> Any:
        ran = self.cli(command, "--cache-dir", str(cache or self.cache), "--json", *args)
        assert ran.returncode == rc, ran.stdout + ran.stderr
        return json.loads(ran.stdout)

    def compiles(self) -> list[str]:
        return self.counter.read_text().splitlines() if self.counter.exists() else []

    def copy(self, dest: Path) -> Path:
        """A copy of the warm cache, to change."""
        shutil.copytree(self.cache, dest)
        return dest

    def clone(self, dest: Path) -> Warm:
        """A copy of the whole project (tests, model, cache), to add tests to."""
        shutil.copytree(self.path, dest)
        return Warm(dest)


def _pytest(project: Path, *args: str) -> None:
    """A real pytest run in ``project`` (building the session's warm cache)."""
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    env["MLCJIT_TEST_COUNT"] = str(project / "compiles.txt")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
                           "--mlc-device=cpu", f"--mlc-jit-cache-dir={project / 'cache'}",
                           *args], cwd=project, env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture(scope="session")
def warm_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built once per test session, shared by the xdist workers (the xdist recipe: a lock
    in the directory shared by all workers' temp dirs). Read it; change only copies."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    path = base / "mlcjit-cli-warm"
    with FileLock(f"{path}.lock"):
        if (path / "ready").exists():
            return path
        shutil.rmtree(path, ignore_errors=True)  # a try that failed half-way
        path.mkdir()
        (path / "tinymodel.py").write_text(TINY_MODEL)
        (path / "test_tiny.py").write_text(TESTS_TEMPLATE.format(configs=CONFIGS, per_config=2))
        _pytest(path, "--mlc-jit-prepare")
        # Use the entries in a known order, so recency is hidden=8 < hidden=6 < hidden=4:
        # a test run of hidden=6, then the engine asked for hidden=4 (in this process).
        _pytest(path, *_tests(6))
        with pytest.MonkeyPatch.context() as patch:
            patch.syspath_prepend(str(path))
            model = JIT(Settings(cache_dir=path / "cache")).compile(
                TVMModel("tinymodel:build", config={"hidden": 4}), "cpu")
        assert model.hit
        assert len(Warm(path).compiles()) == 3
        (path / "ready").touch()
    return path


@pytest.fixture
def warm(warm_project: Path) -> Warm:
    return Warm(warm_project)


def _tests(hidden: int, per_config: int = 2) -> list[str]:
    return [f"test_tiny.py::test_forward[cpu-tinymodel-hidden={hidden}-{i}]"
            for i in range(per_config)]


def _by_hidden(entries: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return {json.loads(e["model"].split(" ", 1)[1])["hidden"]: e for e in entries}


# -- help and usage -------------------------------------------------------------------------------
def test_help_of_every_subcommand(warm: Warm) -> None:
    top = warm.cli("--help")
    assert top.returncode == 0
    for name in SUBCOMMANDS:
        assert f"    {name} " in top.stdout, name
        sub = warm.cli(name, "--help")
        assert sub.returncode == 0, sub.stderr
        assert "--cache-dir PATH" in sub.stdout, name
        assert "--json" in sub.stdout, name
    version = warm.cli("--version")
    assert (version.returncode, version.stdout) == (0, f"pytest-mlcjit {__version__}\n")


def test_the_console_script_and_the_module_run_the_cli(warm: Warm) -> None:
    """The two ways in that are processes (every other test calls ``cli.main``): the
    installed ``pytest-mlcjit`` script, on the warm cache, and ``python -m pytest_mlcjit``;
    exit statuses and output cross the process boundary."""
    listed = subprocess.run([CLI, "list", "--cache-dir", str(warm.cache), "--json"],
                            capture_output=True, text=True, check=False)
    assert listed.returncode == 0, listed.stderr
    assert sorted(_by_hidden(json.loads(listed.stdout)["entries"])) == [4, 6, 8]
    bad = subprocess.run([CLI, "prune", "--cache-dir", str(warm.cache)], capture_output=True,
                         text=True, check=False)
    assert bad.returncode == 2
    assert "prune needs at least one of" in bad.stderr
    module = subprocess.run([sys.executable, "-m", "pytest_mlcjit", "--version"],
                            capture_output=True, text=True, check=False)
    assert (module.returncode, module.stdout) == (0, f"pytest-mlcjit {__version__}\n")


@pytest.mark.parametrize(("args", "message"), [
    (["prune", "--max-size", "10X"], "invalid --max-size '10X': expected a number of bytes"),
    (["prune", "--older-than", "3q"], "invalid --older-than '3q': expected a number with a unit"),
    (["prune", "--keep-last-used", "-1"], "invalid count '-1'"),
    (["prune"], "prune needs at least one of --max-size, --older-than, --keep-last-used"),
    (["nosuch"], "invalid choice: 'nosuch'"),
    (["key", "--mlc-device=cpu"], "unrecognized arguments: --mlc-device=cpu; pytest arguments "
                                  "go after '--': pytest-mlcjit key -- --mlc-device=cpu"),
])
def test_bad_arguments_name_the_value(warm: Warm, args: list[str], message: str) -> None:
    ran = warm.cli(*args, "--cache-dir", str(warm.cache))
    assert ran.returncode == 2
    assert message in ran.stderr


def test_sizes_and_ages() -> None:
    from pytest_mlcjit.units import parse_age, parse_size

    assert parse_size("10G") == 10 * 10**9
    assert parse_size("1.5GiB") == 3 * 2**29
    assert parse_size("500m") == 500 * 10**6
    assert parse_size("4096") == 4096
    assert parse_age("30d") == 30 * 86400
    assert parse_age("90m") == 5400
    assert parse_age("2w") == 14 * 86400
    assert parse_age("45") == 45


def test_the_cli_imports_no_tvm() -> None:
    """A fresh process (this one has TVM): the command imports neither TVM nor numpy."""
    code = ("import sys; from pytest_mlcjit import cli; cli.main(['list', '--cache-dir', "
            "sys.argv[1], '--json']); print([m for m in ('tvm', 'numpy') if m in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", code, "/nonexistent-mlcjit"],
                          capture_output=True, text=True, check=True)
    assert proc.stdout.splitlines()[-1] == "[]", proc.stdout


# -- list and info --------------------------------------------------------------------------------
def test_list(warm: Warm) -> None:
    data = warm.json("list")
    assert data["roots"] == [str(warm.cache)]
    entries = _by_hidden(data["entries"])
    assert sorted(entries) == [4, 6, 8]
    assert [json.loads(e["model"].split(" ", 1)[1])["hidden"] for e in data["entries"]] == \
        [4, 6, 8], "most recently used first"
    for entry in entries.values():
        manifest = json.loads((warm.cache / "tvm" / f"{entry['digest']}.manifest.json")
                              .read_text())
        assert entry["backend"] == "tvm"
        assert entry["state"] == "ok"
        assert entry["model"].startswith("tinymodel:build ")
        assert json.loads(entry["target"]) == {"kind": "llvm"}
        assert entry["size"] == manifest["size"] == Path(entry["library"]).stat().st_size
        assert entry["created"] == manifest["created"]
        assert entry["compile_seconds"] == manifest["compile_seconds"] > 0
        assert entry["last_used"] >= entry["created"]
    assert entries[4]["last_used"] > entries[6]["last_used"] > entries[8]["last_used"]

    human = warm.cli("list", "--cache-dir", str(warm.cache))
    assert human.returncode == 0
    lines = human.stdout.splitlines()
    assert lines[0] == f"{warm.cache}: 3 entries"
    assert lines[1].split() == ["DIGEST", "BACKEND", "MODEL", "TARGET", "SIZE", "CREATED",
                                "LAST", "USED", "COMPILE"]
    assert entries[4]["digest"][:12] in lines[2]
    assert '{"hidden": 4}' in lines[2]


def test_list_of_a_missing_root(warm: Warm, tmp_path: Path) -> None:
    assert warm.json("list", cache=tmp_path / "none")["entries"] == []
    ran = warm.cli("list", "--cache-dir", str(tmp_path / "none"))
    assert ran.returncode == 0
    assert "0 entries (does not exist)" in ran.stdout


def test_cache_dir_defaults_to_the_plugins(warm: Warm) -> None:
    ran = warm.cli("list", "--json", env={"MLC_JIT_CACHE_DIR": str(warm.cache)})
    assert json.loads(ran.stdout)["roots"] == [str(warm.cache)]
    home = warm.path / "home"
    ran = warm.cli("list", "--json", env={"XDG_CACHE_HOME": str(home),
                                          "MLC_LLM_HOME": str(home / "mlc")})
    assert json.loads(ran.stdout)["roots"] == [str(home / "pytest-mlcjit"), str(home / "mlc")]


def test_info(warm: Warm) -> None:
    (data,) = warm.json("info")["roots"]
    assert data["root"] == str(warm.cache)
    assert data["exists"]
    assert data["entries"] == 3
    assert data["backends"] == {"tvm": 3}
    files = [p for p in (warm.cache / "tvm").rglob("*") if p.is_file()]  # + variants/
    assert data["size"] == sum(p.stat().st_size for p in files)
    (seen,) = data["toolchains"]
    assert seen["entries"] == 3
    assert seen["installed_tvm"]
    assert seen["toolchain"]["tvm"] == data["installed_tvm"]
    # The two test runs of the fixture, newest first: a warm run of one config, the prepare.
    runs = data["runs"]
    assert [(r["prepare"], r["requests"], r["outcomes"], r["compiles"]) for r in runs] == [
        (False, 2, {"hit": 2}, 0), (True, 3, {"compiled": 3}, 3)]
    assert {(r["policy"], r["exitstatus"]) for r in runs} == {("ON", 0)}

    human = warm.cli("info", "--cache-dir", str(warm.cache)).stdout
    assert f"cache root: {warm.cache}" in human
    assert "entries: 3 (3 tvm)" in human
    assert "(the installed TVM)" in human
    # In the words of the run's own summary line.
    assert re.search(r"prepare, ON: 3 requests: 3 compiled; [\d.]+s compiling$", human, re.M)
    assert re.search(r"  ON: 2 requests: 2 hits$", human, re.M), human


def test_info_shows_a_damaged_history_line_without_crashing(warm: Warm, tmp_path: Path) -> None:
    """A run-history line whose ``remote`` and ``libraries`` are junk (issue 19: ``info``
    raised TypeError): its totals are shown, the rest ignored."""
    cache = warm.copy(tmp_path / "cache")
    with open(cache / ".mlcjit" / "runs.jsonl", "a", encoding="utf-8") as f:
        f.write('{"time": 1, "policy": "ON", "requests": 7, "remote": 1, "libraries": [1]}\n')
    result = warm.cli("info", "--cache-dir", str(cache))
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"  ON: 7 requests", result.stdout, re.M), result.stdout


# -- verify ---------------------------------------------------------------------------------------
def test_verify_and_fix(warm: Warm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = warm.copy(tmp_path / "cache")
    data = warm.json("verify", cache=cache)
    (root,) = data["roots"]
    assert len(root["ok"]) == 3
    assert root["corrupt"] == []
    assert data["corrupt_left"] == 0

    victim = _by_hidden(warm.json("list", cache=cache)["entries"])[6]
    digest = victim["digest"]
    library = Path(victim["library"].replace(str(warm.cache), str(cache)))
    assert library.parent == cache / "tvm"
    raw = bytearray(library.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    library.write_bytes(bytes(raw))
    entry_files = sorted(p.name for p in library.parent.glob(f"{digest}.*"))
    assert f"{digest}.manifest.json" in entry_files

    ran = warm.cli("verify", "--cache-dir", str(cache))
    assert ran.returncode == 1
    assert f"CORRUPT {digest[:12]}" in ran.stdout
    assert "sha256" in ran.stdout
    data = warm.json("verify", cache=cache, rc=1)
    (bad,) = data["roots"][0]["corrupt"]
    assert bad["digest"] == digest
    assert "corrupt" in bad["reason"]

    fixed = warm.json("verify", "--fix", cache=cache)
    assert list(fixed["roots"][0]["quarantined"]) == [digest]
    # The entry's files moved, as they were, into one quarantine dir of that entry.
    (moved,) = (cache / ".mlcjit" / "quarantine").iterdir()
    assert moved.name.startswith(f"{digest}.")
    assert sorted(p.name for p in moved.iterdir()) == sorted([*entry_files, "REASON"])
    assert (moved / library.name).read_bytes() == bytes(raw)
    assert list(library.parent.glob(f"{digest}.*")) == []
    again = warm.json("verify", cache=cache)
    assert len(again["roots"][0]["ok"]) == 2
    assert again["corrupt_left"] == 0
    # The quarantined library is a plain miss now: ON recompiles exactly it (the engine in
    # this process; the compile counted by the factory, in its own process).
    counter = tmp_path / "compiles.txt"
    monkeypatch.setenv("MLCJIT_TEST_COUNT", str(counter))
    monkeypatch.syspath_prepend(str(warm.path))
    engine = JIT(Settings(cache_dir=cache))
    models = {c["hidden"]: engine.compile(TVMModel("tinymodel:build", config=c), "cpu")
              for c in CONFIGS}
    assert {h: m.hit for h, m in models.items()} == {4: True, 6: False, 8: True}
    assert [line.split()[1] for line in counter.read_text().splitlines()] == ["hidden=6"]
    assert models[6].path == library


# -- prune and clear ------------------------------------------------------------------------------
def test_prune_least_recently_used_first(warm: Warm, tmp_path: Path) -> None:
    cache = warm.copy(tmp_path / "cache")
    entries = _by_hidden(warm.json("list", cache=cache)["entries"])
    dry = warm.json("prune", "--keep-last-used", "1", "--dry-run", cache=cache)
    assert [_hidden(e) for e in dry["roots"][0]["evicted"]] == [6, 8]
    assert len(warm.json("list", cache=cache)["entries"]) == 3, "a dry run removes nothing"

    # A cap that fits one entry (and the control files) evicts the two least recent, 8 first.
    # The cap counts everything the cache stores: the run history, usage records… too.
    stored = warm.json("info", cache=cache)["roots"][0]
    control = stored["total_size"] - sum(e["disk_size"] for e in entries.values())
    cap = entries[4]["disk_size"] + control + 100
    usage = cache / ".mlcjit" / "usage"
    assert sorted(p.name for p in usage.iterdir()) == sorted(e["digest"] for e in entries.values())
    data = warm.json("prune", "--max-size", str(cap), cache=cache)
    (root,) = data["roots"]
    assert [_hidden(e) for e in root["evicted"]] == [8, 6]
    assert root["total_after"] <= cap < root["total_before"]
    assert not root["over_cap"]
    assert sorted(_by_hidden(warm.json("list", cache=cache)["entries"])) == [4]
    assert [p.name for p in usage.iterdir()] == [entries[4]["digest"]], "records go too"


def test_prune_older_than_reads_the_caches_usage_records(warm: Warm, tmp_path: Path) -> None:
    cache = warm.copy(tmp_path / "cache")
    entries = _by_hidden(warm.json("list", cache=cache)["entries"])
    long_ago = time.time() - 40 * 86400
    (cache / ".mlcjit" / "usage" / entries[6]["digest"]).write_text(f"{long_ago:.3f}\n")
    data = warm.json("prune", "--older-than", "30d", cache=cache)
    assert [_hidden(e) for e in data["roots"][0]["evicted"]] == [6]
    human = warm.cli("prune", "--older-than", "30d", "--cache-dir", str(cache))
    assert "evicted 0 entries" in human.stdout


HOLD_LOCK = """
import sys
from pytest_mlcjit.cache.store.local import LocalStore
cache = LocalStore(sys.argv[1]).open_for_writing()
with cache.lock(sys.argv[2], timeout=10):
    print("locked", flush=True)
    sys.stdin.read()
"""


def test_prune_never_evicts_an_entry_whose_lock_is_held(warm: Warm, tmp_path: Path) -> None:
    cache = warm.copy(tmp_path / "cache")
    entries = _by_hidden(warm.json("list", cache=cache)["entries"])
    busy = entries[8]["digest"]  # the least recently used: the first to go
    with subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(cache), busy],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as holder:
        assert holder.stdin is not None
        assert holder.stdout is not None
        assert holder.stdout.readline() == "locked\n"
        data = warm.json("prune", "--max-size", "0", cache=cache)
        (root,) = data["roots"]
        assert [_hidden(e) for e in root["evicted"]] == [6, 4]
        assert root["kept_locked"] == [busy]
        assert root["over_cap"]
        assert [e["digest"] for e in warm.json("list", cache=cache)["entries"]] == [busy]
        cleared = warm.json("clear", cache=cache)
        assert cleared["roots"][0]["kept_locked"] == [busy]
        human = warm.cli("prune", "--max-size", "0", "--cache-dir", str(cache))
        assert f"kept {busy[:12]}" in human.stdout
        assert "lock is held" in human.stdout
        holder.stdin.close()  # the holder exits, and the kernel releases its lock
    assert holder.returncode == 0
    data = warm.json("prune", "--max-size", "0", cache=cache)
    assert [e["digest"] for e in data["roots"][0]["evicted"]] == [busy]


def test_clear(warm: Warm, tmp_path: Path) -> None:
    cache = warm.copy(tmp_path / "cache")
    dry = warm.json("clear", "--dry-run", cache=cache)
    assert len(dry["roots"][0]["removed"]) == 3
    assert len(warm.json("list", cache=cache)["entries"]) == 3
    data = warm.json("clear", cache=cache)
    assert len(data["roots"][0]["removed"]) == 3
    assert data["roots"][0]["freed"] > 0
    assert warm.json("list", cache=cache)["entries"] == []
    assert not list((cache / "tvm").iterdir())
    assert not list((cache / ".mlcjit" / "usage").iterdir())
    assert warm.json("info", cache=cache)["roots"][0]["runs"] == []


def test_clear_removes_a_dead_writers_old_temp_file_and_keeps_a_young_one(
        warm: Warm, tmp_path: Path) -> None:
    """A temporary manifest whose writer died (``.<name>.<pid>.<hex>.tmp``, no entry of its
    own) is litter ``clear`` removes once it is over an hour old. A young one stays, even
    when its pid is not running here: its writer may live in another PID namespace or on
    another host that shares the cache, between writing it and renaming it."""
    cache = warm.copy(tmp_path / "cache")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    pid = int(gone.stdout)  # a process that has exited
    old, young = (cache / "tvm" / f".{c * 64}.manifest.json.{pid}.0123abcd.tmp" for c in "ab")
    for temp in (old, young):
        temp.write_text("{}")
    two_hours_ago = time.time() - 7200
    os.utime(old, (two_hours_ago, two_hours_ago))
    data = warm.json("clear", cache=cache)
    assert len(data["roots"][0]["removed"]) == 4, data  # the 3 entries and the old litter
    assert sorted(p.name for p in (cache / "tvm").iterdir()) == [young.name]


def _hidden(entry: dict[str, Any]) -> int:
    return int(json.loads(entry["model"].split(" ", 1)[1])["hidden"])


# -- key ------------------------------------------------------------------------------------------
FAKE_TVM = "Metadata-Version: 2.1\nName: apache-tvm\nVersion: 99.0.0\n"


def _key(warm: Warm, *pytest_args: str) -> str:
    ran = warm.cli("key", "--", *pytest_args, "--mlc-device=cpu")
    assert ran.returncode == 0, ran.stdout + ran.stderr
    (line,) = ran.stdout.splitlines()
    assert re.fullmatch(r"[0-9a-f]{64}", line), line
    return line


def test_key_changes_with_model_configs_and_toolchain_only(warm: Warm, tmp_path: Path) -> None:
    warm = warm.clone(tmp_path / "project")
    base = _key(warm)
    assert _key(warm) == base, "stable"

    ran = warm.cli("key", "--json", "--cache-dir", str(tmp_path / "elsewhere"), "--",
                   "--mlc-device=cpu")
    assert ran.returncode == 0, ran.stderr
    data = json.loads(ran.stdout)
    assert data["key"] == base, "the cache's path is not in the key"
    assert not (tmp_path / "elsewhere").exists(), "keying writes nothing"
    assert sorted(lib["digest"] for lib in data["libraries"]) == sorted(
        e["key_digest"] for e in warm.json("list")["entries"])
    assert {len(lib["tests"]) for lib in data["libraries"]} == {2}

    # More tests of the same configs, and a test that compiles nothing: the same key.
    extra = warm.path / "test_more.py"
    extra.write_text(TESTS_TEMPLATE.format(configs=CONFIGS[:2], per_config=5)
                     + "\n\ndef test_plain():\n    pass\n")
    assert _key(warm) == base
    # A changed model config: another key; reverting it gives the first key back.
    extra.write_text(TESTS_TEMPLATE.format(configs=[{"hidden": 10}], per_config=1))
    changed = _key(warm)
    assert changed != base
    extra.unlink()
    assert _key(warm) == base

    # Another toolchain: the same code, another apache-tvm. The key reads TVM's version
    # from package metadata, so a dist-info placed first on the path fakes an upgrade: a
    # new PYTHONPATH, so the command runs as a process of its own.
    fake = tmp_path / "fake-site"
    dist = fake / "apache_tvm-99.0.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(FAKE_TVM)
    (dist / "RECORD").write_text("tvm/libtvm.so,sha256=fake,1\n")
    proc = subprocess.run([sys.executable, "-m", "pytest_mlcjit", "key", "--",
                           "--mlc-device=cpu"], cwd=warm.path,
                          env={**os.environ, "PYTHONPATH": str(fake)}, capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    (upgraded,) = proc.stdout.splitlines()
    assert re.fullmatch(r"[0-9a-f]{64}", upgraded), upgraded
    assert upgraded not in (base, changed)


def test_key_paths_select_the_tests(warm: Warm) -> None:
    base = _key(warm)
    assert _key(warm, "test_tiny.py") == base
    assert _key(warm, *_tests(4)) != base


# -- explain --------------------------------------------------------------------------------------
def test_explain_a_miss(warm: Warm, tmp_path: Path) -> None:
    warm = warm.clone(tmp_path / "project")
    extra = warm.path / "test_miss.py"
    extra.write_text(TESTS_TEMPLATE.format(configs=[{"hidden": 10}], per_config=1))
    try:
        data = warm.json("explain", "--", "--mlc-device=cpu")
        human = warm.cli("explain", "--cache-dir", str(warm.cache), "--", "--mlc-device=cpu")
    finally:
        extra.unlink()
    libs = {lib["key"]["config"]["hidden"]: lib for lib in data["libraries"]}
    assert {h: lib["status"] for h, lib in libs.items()} == {
        4: "hit", 6: "hit", 8: "hit", 10: "missing"}
    miss = libs[10]
    assert miss["tests"] == ["test_miss.py::test_forward[cpu-tinymodel-hidden=10-0]"]
    nearest = _hidden(miss["nearest"])
    assert miss["differences"] == [{"field": "config.hidden", "wanted": 10, "cached": nearest}]
    assert human.returncode == 0
    assert "4 libraries requested: 3 cached, 1 would miss under READONLY" in human.stdout
    assert "config.hidden: wanted 10, cached " in human.stdout
    assert "test_miss.py::test_forward[cpu-tinymodel-hidden=10-0]" in human.stdout


def test_explain_one_spec_from_the_command_line(warm: Warm) -> None:
    hit = warm.json("explain", "--factory", "tinymodel:build", "--config", '{"hidden": 6}')
    assert [lib["status"] for lib in hit["libraries"]] == ["hit"]
    data = warm.json("explain", "--factory", "tinymodel:build", "--config", '{"hidden": 6}',
                     "--opt-level", "2")
    (lib,) = data["libraries"]
    assert lib["status"] == "missing"
    assert lib["differences"] == [{"field": "opt_level", "wanted": 2, "cached": 3}]
    assert _hidden(lib["nearest"]) == 6
    target = warm.json("explain", "--factory", "tinymodel:build", "--config", '{"hidden": 6}',
                       "--target", '{"kind": "cuda", "arch": "sm_80"}')["libraries"][0]
    fields = {d["field"] for d in target["differences"]}
    assert {"target.kind", "target.arch"} <= fields
