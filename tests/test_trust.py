"""Trust is explicit: a cache root (or one of its directories, or an entry file) that
other users can write is refused unless --mlc-jit-allow-untrusted-cache; subprocesses
are argument lists, never a shell; and no name, config value or setting can make the cache
read, write or load anything outside its root (the reliability suite,
docs/explanation/reliability.md).

Whose files are trusted is seen from both sides in one run as root: root meeting a cache
another user owns (:func:`test_owned_by_another_user`), and an unprivileged user made for
the purpose meeting root's cache and a third user's (:func:`test_another_users_view`, the
driver run as that user)."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import stat
from pathlib import Path
from typing import Any

import pytest
from faultmodels import drive_as, probe_user, user_dir

import pytest_mlcjit
from conftest import DRIVER, TINY_MODEL, Engine, Project
from pytest_mlcjit import ConfigError
from pytest_mlcjit.cache.layout import EntryPaths
from pytest_mlcjit.cache.store.local import LocalStore
from pytest_mlcjit.errors import CompileError

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
NOBODY = 65534


def _refused(project: Project, *args: str) -> pytest.RunResult:
    """A run whose one test errors: the cache is refused before anything is loaded."""
    result = project.run_inprocess("--mlc-device=cpu", *args)
    result.assert_outcomes(errors=1)
    return result


@pytest.mark.parametrize(("mode", "policy"), [(0o777, "ON"), (0o775, "ON"), (0o757, "READONLY")],
                         ids=["world-writable", "group-writable", "other-writable-readonly"])
def test_a_root_others_can_write_is_refused(engine: Engine, project: Project,
                                            warm_template: Path, mode: int, policy: str) -> None:
    project.write_tests([{"hidden": 4}])
    engine.warm(warm_template)
    project.cache.chmod(mode)
    before = sorted(project.cache.rglob("*"))
    result = _refused(project, f"--mlc-jit-policy={policy}")
    result.stdout.fnmatch_lines([
        f"UntrustedCacheError: cache directory {project.cache} is writable by other users "
        f"(mode {stat.filemode(stat.S_IFDIR | mode)}); loading its libraries would run "
        "their code. Fix its permissions (chmod go-w) or pass "
        "--mlc-jit-allow-untrusted-cache."])
    assert sorted(project.cache.rglob("*")) == before, "nothing was written into it"
    project.run("--mlc-device=cpu", "--mlc-jit-allow-untrusted-cache").assert_outcomes(passed=1)
    assert project.compiles() == []


def test_a_new_root_is_checked_before_anything_is_written(project: Project) -> None:
    project.write_tests([{"hidden": 4}])
    project.cache.mkdir()
    project.cache.chmod(0o777)
    _refused(project).stdout.fnmatch_lines(["UntrustedCacheError: cache directory * is "
                                            "writable by other users*"])
    assert list(project.cache.iterdir()) == []


def test_sticky_root_and_explicit_trust(engine: Engine, project: Project,
                                        warm_template: Path) -> None:
    project.write_tests([{"hidden": 4}])
    engine.warm(warm_template)
    project.cache.chmod(0o1777)  # like /tmp: others may add, not replace
    project.run("--mlc-device=cpu").assert_outcomes(passed=1)
    project.pytester.makeini("[pytest]\nmlc_jit_allow_untrusted_cache = true\n")
    project.cache.chmod(0o777)
    project.run("--mlc-device=cpu").assert_outcomes(passed=1)
    assert project.compiles() == []


@pytest.mark.parametrize("sub", ["tvm", ".mlcjit", ".mlcjit/locks", ".mlcjit/failed"])
def test_a_directory_inside_others_can_write_is_refused(
    engine: Engine, project: Project, warm_template: Path, sub: str
) -> None:
    project.write_tests([{"hidden": 4}])
    engine.warm(warm_template)
    (project.cache / sub).chmod(0o777)
    result = _refused(project)
    result.stdout.fnmatch_lines([f"UntrustedCacheError: directory {project.cache / sub} is "
                                 "writable by other users (mode drwxrwxrwx)*"])
    project.run("--mlc-device=cpu", "--mlc-jit-allow-untrusted-cache").assert_outcomes(passed=1)


@pytest.mark.skipif(not IS_ROOT, reason="only root can give a file to another user")
def test_owned_by_another_user(engine: Engine, project: Project, warm_template: Path) -> None:
    project.write_tests([{"hidden": 4}])
    engine.warm(warm_template)
    os.chown(project.cache, NOBODY, NOBODY)
    _refused(project).stdout.fnmatch_lines([
        f"UntrustedCacheError: cache directory {project.cache} is owned by uid {NOBODY}, not "
        "by you (uid 0)*--mlc-jit-allow-untrusted-cache*"])
    os.chown(project.cache, 0, 0)
    # An entry planted by another user (possible in a sticky directory) is refused too.
    (project.cache / "tvm").chmod(0o1777)
    (library,) = project.libraries()
    os.chown(library, NOBODY, NOBODY)
    _refused(project).stdout.fnmatch_lines([
        f"UntrustedCacheError: {library} is owned by uid {NOBODY}, not by you (uid 0)*"])
    project.run("--mlc-device=cpu", "--mlc-jit-allow-untrusted-cache").assert_outcomes(passed=1)
    assert project.compiles() == []


def test_another_users_view(warm_template: Path) -> None:
    """An unprivileged user (made for the purpose; the driver runs as that user) trusts a
    cache root owns (a cache made under sudo: it hits, reading only) and refuses one a third
    user owns, naming both uids."""
    with probe_user() as user, user_dir(user, {"tinymodel.py": TINY_MODEL.strip(),
                                               "mlcjit_driver.py": DRIVER}) as home:
        roots = shutil.copytree(warm_template / "cache", home / "root-owned")
        (hit,) = drive_as(user, home, roots, [{"hidden": 4}], "READONLY")
        assert hit["ok"], hit
        assert hit["hit"], hit
        third = shutil.copytree(warm_template / "cache", home / "third-user")
        os.chown(third, NOBODY, NOBODY)
        (refused,) = drive_as(user, home, third, [{"hidden": 4}], "READONLY")
        assert refused["error"] == "UntrustedCacheError", refused
        assert (f"cache directory {third} is owned by uid {NOBODY}, not by you "
                f"(uid {user.pw_uid})") in refused["message"], refused


def test_a_umask_of_zero_still_makes_a_trusted_cache(engine: Engine, project: Project) -> None:
    """A compile under umask 0 makes nothing others can write; a new engine trusts what it
    made and hits."""
    first, second = engine.run([{"hidden": 4}, {"hidden": 4}], umask=0, fresh=True)
    assert first["ok"], first
    assert not first["hit"], first
    assert second["hit"], second
    loose = [str(p) for p in [project.cache, *project.cache.rglob("*")]
             if p.stat().st_mode & (stat.S_IWGRP | stat.S_IWOTH)]
    assert loose == [], "nothing the cache made is writable by others"


# -- no shell ------------------------------------------------------------------------------
SHELL_CALLS = {("os", "system"), ("os", "popen"), ("subprocess", "getoutput"),
               ("subprocess", "getstatusoutput")}
SPAWNERS = {"run", "Popen", "call", "check_call", "check_output"}


def test_no_shell_anywhere_in_the_package() -> None:
    """Every subprocess call in pytest_mlcjit takes an argument list, without a shell."""
    package = Path(pytest_mlcjit.__file__).parent
    problems = []
    spawns = 0
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = getattr(func.value, "id", "") if isinstance(func, ast.Attribute) else ""
            where = f"{path.relative_to(package)}:{node.lineno}"
            if (owner, name) in SHELL_CALLS:
                problems.append(f"{where}: {owner}.{name} runs a shell")
            for kw in node.keywords:
                if kw.arg == "shell" and not (isinstance(kw.value, ast.Constant)
                                              and kw.value.value is False):
                    problems.append(f"{where}: shell={ast.unparse(kw.value)}")
            if name in SPAWNERS and owner in ("subprocess", ""):
                spawns += owner == "subprocess"
                if node.args and isinstance(node.args[0], ast.Constant | ast.JoinedStr):
                    problems.append(f"{where}: a command string, not an argument list")
    assert problems == []
    assert spawns >= 3, "the scan saw the package's subprocess calls"


EVIL_MODEL = '''
import json
import os

from tvm.relax.frontend import nn


class Tiny(nn.Module):
    def __init__(self):
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return nn.relu(self.fc(x))


def build(**config):
    with open(os.environ["MLCJIT_TEST_SEEN"], "a") as f:
        f.write(json.dumps(config) + "\\n")
    if config.get("fail"):
        raise RuntimeError("failed on purpose")
    return Tiny(), {"forward": {"x": nn.spec.Tensor((2, 8), "float32")}}
'''

#: Values a hostile or careless config could hold: shell syntax, path tricks, NUL.
EVIL = {
    "subshell": "$(touch PWNED)", "backticks": "`touch PWNED`", "chain": "; touch PWNED #",
    "dotdot": "../../../../escape", "absolute": "/tmp/escape/lib.so", "separators": "a/b\\c",
    "nul": "x\x00y", "quotes": "'\"", "newline": "a\nb",
}


def _files(root: Path, skip: Path) -> set[str]:
    return {str(p) for p in root.rglob("*") if skip not in p.parents and p != skip}


def test_hostile_values_stay_data(engine: Engine, project: Project, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    (project.pytester.path / "evilmodel.py").write_text(EVIL_MODEL)
    seen = tmp_path / "seen.jsonl"
    monkeypatch.setenv("MLCJIT_TEST_SEEN", str(seen))
    # A cache path full of shell syntax and spaces, too.
    project.cache = tmp_path / "c a;$(touch PWNED)`touch PWNED`'\"" / "cache"
    project.cache.parent.mkdir()
    before = _files(tmp_path, project.cache) | _files(project.pytester.path, project.cache)
    requests = [
        {"factory": "evilmodel:build", "config": EVIL, "name": "../../../evil/name"},
        {"factory": "evilmodel:build", "config": {**EVIL, "fail": True}, "name": "/abs\x00"},
    ]
    good, bad = engine.run(requests)
    assert good["ok"], good
    assert not bad["ok"]
    assert bad["error"] == "CompileError", bad
    # The factory got every value exactly, as data.
    got = [json.loads(line) for line in seen.read_text().splitlines()]
    assert got == [EVIL, {**EVIL, "fail": True}]
    # Nothing ran a shell, and nothing was written outside the cache root.
    after = _files(tmp_path, project.cache) | _files(project.pytester.path, project.cache)
    assert not [p for p in after if Path(p).name == "PWNED"]
    assert after - before == {str(seen)}, after - before
    # Inside the root, every name is the cache's own, made of digests.
    hexd = r"[0-9a-f]{64}"
    layout = re.compile(
        rf"tvm/{hexd}\.(so|manifest\.json|log)|tvm/variants(/{hexd}\.json)?"
        rf"|\.mlcjit/(locks/{hexd}\.lock|usage/{hexd}|timings(/{hexd})?|runs\.jsonl"
        rf"|failed/{hexd}\.(json|log)|(locks|staging|failed|usage|quarantine))|tvm|\.mlcjit")
    names = [p.relative_to(project.cache).as_posix() for p in project.cache.rglob("*")]
    assert [n for n in names if not layout.fullmatch(n)] == []


def _entry_operations(cache: LocalStore, paths: EntryPaths, staged: Path) -> list[Any]:
    return [
        lambda: cache.read_manifest(paths),
        lambda: cache.verify(paths, {"digest": paths.digest, "sha256": "0" * 64, "size": 4}),
        lambda: cache.publish_entry(staged, None, paths, {}),  # type: ignore[typeddict-item]
        lambda: cache.quarantine(paths, "test"),
    ]


def _digest_operations(cache: LocalStore, digest: str) -> list[Any]:
    return [
        lambda: cache.lock_path(digest),
        lambda: cache.new_staging_dir(digest),
        lambda: cache.failure_log(digest),
        lambda: cache.record_failure(digest, "run", CompileError("message")),
        lambda: cache.record_use(digest),
    ]


@pytest.mark.parametrize("digest", ["../../x", "a" * 63 + "/", "a" * 64 + "\x00", "A" * 64,
                                    "/etc/passwd", "", "a" * 40])
def test_a_digest_cannot_name_a_path(tmp_path: Path, digest: str) -> None:
    root = tmp_path / "root"
    cache = LocalStore(root).open_for_writing()
    staged = tmp_path / "staged.so"
    staged.write_bytes(b"\x7fELF")
    before = _files(tmp_path, tmp_path / "none")
    paths = EntryPaths(digest, root / "tvm" / "x.so")
    for operation in [*_entry_operations(cache, paths, staged),
                      *_digest_operations(cache, digest)]:
        with pytest.raises(ConfigError, match="invalid cache key digest"):
            operation()
    assert _files(tmp_path, tmp_path / "none") == before, "nothing written anywhere"


@pytest.mark.parametrize("library", [
    "../outside/{d}.so", "tvm/nested/{d}.so", "{d}.so", "/tmp/{d}.so", "tvm/{d}.", "tvm/{d}",
    "tvm/{d}...so", "tvm/other.so",
    "tvm/{d}.so/../../x",  # what MLC_DSO_SUFFIX="so/../../x" would make
])
def test_an_entry_path_cannot_leave_the_layout(tmp_path: Path, library: str) -> None:
    root = tmp_path / "root"
    cache = LocalStore(root).open_for_writing()
    digest = "a" * 64
    staged = tmp_path / "staged.so"
    staged.write_bytes(b"\x7fELF")
    before = _files(tmp_path, tmp_path / "none")
    paths = EntryPaths(digest, root / library.format(d=digest))
    for operation in _entry_operations(cache, paths, staged):
        with pytest.raises(ConfigError, match="invalid cache entry path"):
            operation()
    assert _files(tmp_path, tmp_path / "none") == before, "nothing written anywhere"


def test_a_nul_in_the_cache_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="it contains a NUL character"):
        LocalStore(f"{tmp_path}/a\x00b").open_for_writing()
