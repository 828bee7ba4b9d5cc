"""Where everything lives: the one owner of every path and name rule of the cache.

Layout under a root (nothing in it holds an absolute path or depends on mtimes, so a
cache can be tarred and restored anywhere)::

    <root>/tvm/<digest>.so                  a TVM library
    <root>/model_lib/<md5>.<suffix>         an MLC library, named as MLC-LLM names it
    <root>/<dir>/<digest>.manifest.json     written last: full key, sha256, size, toolchain…
    <root>/<dir>/<digest>.log               the compile log
    <root>/tvm/variants/<key>.json          the input states of a key, each naming an entry
    <root>/.mlcjit/locks/<digest>.lock      flock()-based, released by the kernel on death
    <root>/.mlcjit/locks/<digest>.owner     who holds it (pid, host, since), for messages
    <root>/<dir>/.<digest>.manifest.pending.json   the next manifest, while a publish runs
    <root>/.mlcjit/staging/<d32>.<hex16>/   per-compile scratch dirs on the cache's filesystem
    <root>/.mlcjit/staging/<d32>.<hex16>.lock   held by the dir's owner for its whole life
    <root>/.mlcjit/failed/<digest>.json     a failure, remembered for the rest of its run
    <root>/.mlcjit/usage/<digest>           last-used time, kept by the cache (not atime)
    <root>/.mlcjit/timings/<spec digest>    the last compile time of a spec (any toolchain)
    <root>/.mlcjit/quarantine/…             corrupt entries moved aside
    <root>/.mlcjit/mlckeys/<run>/…          MLC key computations shared by one run
    <root>/.mlcjit/runs.jsonl               the run history (runs.lock: held while written)

Every name derived from a key is built from its hex digest, so no spec, override or config
value reaches a path. Importing this module imports nothing heavy.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from pytest_mlcjit.errors import ConfigError

#: The environment variable that names the cache root.
ENV_CACHE_DIR = "MLC_JIT_CACHE_DIR"
CONTROL_DIR = ".mlcjit"
CONTROL_SUBDIRS = ("locks", "staging", "failed", "usage", "quarantine")
MANIFEST_SUFFIX = ".manifest.json"
LOG_SUFFIX = ".log"
RUNS_FILE = "runs.jsonl"
#: ``(directory under the root, backend name)`` of every backend's entries.
BACKEND_DIRS = (("tvm", "tvm"), ("model_lib", "mlc"))
TVM_DIR, TVM_SUFFIX = "tvm", "so"
MLC_DIR = "model_lib"

#: Entry digests: hex SHA-256 (TVM) or MD5 (MLC-compatible).
DIGEST_RE = re.compile(r"[0-9a-f]{32}|[0-9a-f]{64}")
#: A staging directory's name: ``<digest[:32]>.<16 hex>``; and the names earlier versions
#: used, ``<digest[:32]>.<host>.<pid>.<8 hex>`` (still recognized, to clean them up).
STAGING_NAME_RE = re.compile(r"[0-9a-f]{32}\.[0-9a-f]{16}")
LEGACY_STAGING_NAME_RE = re.compile(r"[0-9a-f]{32}\.[^/]+\.[0-9]+\.[0-9a-f]{8}")
STAGING_LOCK_SUFFIX = ".lock"
PENDING_SUFFIX = ".manifest.pending.json"
#: Bytes the cache may add below its root (the longest: a quarantined manifest,
#: ``.mlcjit/quarantine/<64>.<stamp>.<4>/<64>.manifest.json``, or a temporary manifest,
#: with room for an MLC library suffix); a root too long for them is refused up front.
PATH_ROOM_WRITE = 256
#: The same for reading only (``model_lib/<32>.<suffix>``, ``tvm/<64>.manifest.json``).
PATH_ROOM_READ = 128
SIMPLE_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def check_digest(digest: str) -> str:
    """``digest`` if it is a hex SHA-256 or MD5, else ConfigError (it names files)."""
    if not isinstance(digest, str) or not DIGEST_RE.fullmatch(digest):
        raise ConfigError(f"invalid cache key digest {digest!r}: expected 32 or 64 lowercase "
                          "hex digits")
    return digest


def is_digest(text: str) -> bool:
    return bool(DIGEST_RE.fullmatch(text))


# -- roots ------------------------------------------------------------------------------------
def _cache_base() -> str:
    return os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/pytest-mlcjit``, else ``~/.cache/pytest-mlcjit``."""
    return Path(_cache_base()) / "pytest-mlcjit"


def mlc_llm_home() -> Path:
    """``$MLC_LLM_HOME``, else ``$XDG_CACHE_HOME/mlc_llm``, else ``~/.cache/mlc_llm``."""
    if home := os.environ.get("MLC_LLM_HOME"):
        return Path(home).expanduser()
    return Path(_cache_base()) / "mlc_llm"


def backend_root(backend: str, cache_dir: str | os.PathLike[str] | None) -> Path:
    """The cache-root rule, for one entry: the configured cache dir if any, else the
    backend's own default (MLC entries live in ``$MLC_LLM_HOME``, as MLC-LLM keeps them)."""
    if cache_dir:
        return Path(cache_dir).expanduser().absolute()
    return (mlc_llm_home() if backend == "mlc" else default_cache_dir()).absolute()


def default_roots(cache_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """Every root a run may use: ``cache_dir`` if given, else ``$MLC_JIT_CACHE_DIR``, else
    the default TVM cache and MLC-LLM's home (the same rule as :func:`backend_root`)."""
    if not cache_dir and (env := os.environ.get(ENV_CACHE_DIR)):
        cache_dir = env
    roots = [backend_root(backend, cache_dir) for _, backend in BACKEND_DIRS]
    return list(dict.fromkeys(roots))


# -- one entry --------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class EntryPaths:
    """Where one entry's files live."""

    digest: str
    library: Path

    @property
    def stem(self) -> Path:
        return self.library.with_suffix("")

    @property
    def manifest(self) -> Path:
        return self.library.parent / (self.library.name.rsplit(".", 1)[0] + MANIFEST_SUFFIX)

    @property
    def log(self) -> Path:
        return self.library.parent / (self.library.name.rsplit(".", 1)[0] + LOG_SUFFIX)

    @property
    def pending(self) -> Path:
        """The next manifest while a publish replaces the entry: it names the new library
        from before that library is renamed into place until it becomes the manifest."""
        return self.library.parent / f".{self.digest}{PENDING_SUFFIX}"


def tvm_entry(root: Path, digest: str) -> EntryPaths:
    return EntryPaths(digest, root / TVM_DIR / f"{digest}.{TVM_SUFFIX}")


def mlc_entry(root: Path, digest: str, suffix: str) -> EntryPaths:
    return EntryPaths(digest, root / MLC_DIR / f"{digest}.{suffix}")


#: How many input states (variants) of one key are remembered, newest first.
MAX_VARIANTS = 8


def variants_file(entry_dir: Path, key_digest: str) -> Path:
    """``<root>/<dir>/variants/<key digest>.json``: the input states a key was built from,
    each naming its entry (ccache's manifest); see :meth:`Backend.inputs_base`."""
    return entry_dir / "variants" / f"{check_digest(key_digest)}.json"


def check_entry(root: Path, paths: EntryPaths) -> None:
    """ConfigError unless ``paths`` is ``<root>/<dir>/<digest>.<suffix>``: no key, name
    or setting can make the cache read, write or load anything outside its root."""
    check_digest(paths.digest)
    lib = paths.library
    suffix = lib.name[len(paths.digest) + 1:]
    if (lib.parent.parent != root or not SIMPLE_NAME_RE.fullmatch(lib.parent.name)
            or not lib.name.startswith(paths.digest + ".")
            or not SIMPLE_NAME_RE.fullmatch(suffix) or ".." in suffix):
        raise ConfigError(
            f"invalid cache entry path {os.fspath(lib)!r}: expected "
            f"{root}/<dir>/{paths.digest}.<suffix> with a plain suffix (check "
            "MLC_DSO_SUFFIX and the backend's layout)"
        )


# -- the control directory --------------------------------------------------------------------
def control_dir(root: str | os.PathLike[str]) -> Path:
    return Path(root) / CONTROL_DIR


def control_subdir(root: str | os.PathLike[str], name: str) -> Path:
    """``<root>/.mlcjit/<name>``: one of :data:`CONTROL_SUBDIRS`, ``timings`` or
    ``mlckeys``."""
    if name not in (*CONTROL_SUBDIRS, "timings", "mlckeys"):
        raise ValueError(f"no control directory {name!r}")
    return Path(root, CONTROL_DIR, name)


def backend_dir(root: str | os.PathLike[str], subdir: str) -> Path:
    """``<root>/<subdir>``: where one backend's entries live (see :data:`BACKEND_DIRS`)."""
    return Path(root, subdir)


def variants_dir(root: str | os.PathLike[str], subdir: str) -> Path:
    """``<root>/<subdir>/variants``: the input-state records of a backend's keys."""
    return Path(root, subdir, "variants")


def lock_file(root: str | os.PathLike[str], digest: str) -> str:
    """``<root>/.mlcjit/locks/<digest>.lock``: the file whose ``flock`` guards a key."""
    return os.path.join(root, CONTROL_DIR, "locks", f"{digest}.lock")


def owner_file(root: str | os.PathLike[str], digest: str) -> Path:
    """``<root>/.mlcjit/locks/<digest>.owner``: who holds the key's lock, for messages."""
    return Path(root, CONTROL_DIR, "locks", f"{digest}.owner")


def usage_file(root: str | os.PathLike[str], digest: str) -> str:
    """``<root>/.mlcjit/usage/<digest>``: when the cache last used the entry (a stamp)."""
    return os.path.join(root, CONTROL_DIR, "usage", digest)


def failure_files(root: str | os.PathLike[str], digest: str) -> tuple[Path, Path]:
    """``<root>/.mlcjit/failed/<digest>.json`` and ``.log``: a remembered failure."""
    base = Path(root, CONTROL_DIR, "failed", check_digest(digest))
    return base.with_suffix(".json"), base.with_suffix(".log")


def timing_file(root: str | os.PathLike[str], spec_digest: str) -> Path:
    """``<root>/.mlcjit/timings/<spec digest>``: how long a spec last took to compile, on
    whatever toolchain and input state (:mod:`.schedule`)."""
    return Path(root, CONTROL_DIR, "timings", check_digest(spec_digest))


def staging_dir(root: str | os.PathLike[str]) -> Path:
    return Path(root, CONTROL_DIR, "staging")


def staging_lock(staging: Path) -> Path:
    """The lock file of a staging directory, beside it: made and locked before the
    directory, held by its owner until the directory is gone."""
    return staging.with_name(staging.name + STAGING_LOCK_SUFFIX)


def is_staging_name(name: str) -> bool:
    """Whether ``name`` is a staging directory's (this version's or an earlier one's)."""
    return bool(STAGING_NAME_RE.fullmatch(name) or LEGACY_STAGING_NAME_RE.fullmatch(name))


def path_max(path: str | os.PathLike[str]) -> int:
    """The longest path (in bytes, without the final NUL) the filesystem of ``path``, or of
    its nearest existing parent, accepts."""
    probe = Path(path)
    while True:
        try:
            return int(os.pathconf(probe, "PC_PATH_MAX")) - 1
        except (OSError, ValueError):
            if probe.parent == probe:
                return 4095
            probe = probe.parent


def check_path_room(root: str | os.PathLike[str], room: int, what: str) -> None:
    """ConfigError unless paths ``room`` bytes longer than ``root`` fit the system's limit
    (PATH_MAX): refused before anything is compiled, not at publish."""
    length = len(os.fsencode(os.fspath(root)))
    limit = path_max(root)
    if length + 1 + room > limit:
        shown = os.fspath(root)
        shown = shown if len(shown) <= 80 else f"{shown[:40]}…{shown[-36:]}"
        raise ConfigError(
            f"{what} {shown} is {length} bytes long, too long for a cache: it writes paths up "
            f"to {room} bytes longer, and this filesystem accepts at most {limit} (PATH_MAX); "
            "choose a shorter directory (--mlc-jit-cache-dir, MLC_JIT_CACHE_DIR or "
            "MLC_TEMP_DIR)"
        )


def quarantine_dir(root: str | os.PathLike[str]) -> Path:
    return Path(root, CONTROL_DIR, "quarantine")


def mlc_key_memos(root: str | os.PathLike[str], run_id: str | None = None) -> Path:
    base = Path(root, CONTROL_DIR, "mlckeys")
    return base / run_id if run_id else base


def runs_file(root: str | os.PathLike[str]) -> Path:
    return Path(root, CONTROL_DIR, RUNS_FILE)


def runs_lock(root: str | os.PathLike[str]) -> Path:
    """``<root>/.mlcjit/runs.lock``: held while the run history is appended to or cut."""
    return Path(root, CONTROL_DIR, "runs.lock")
