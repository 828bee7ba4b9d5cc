"""Every setting, declared once: :class:`Settings` *is* the option table.

Each field made with :func:`option` is one row: its command-line flag, ini key and
environment variable, its parser, default and help. From the rows come the pytest options
and ini keys (:mod:`pytest_mlcjit.plugin.options`), the resolution "command line >
environment > ini > default" (:func:`resolve`), the hand-off to xdist workers
(:meth:`Settings.to_json`, :meth:`Settings.from_json`) and the reference documentation. The
fields without a row are facts of the run (its id, the devices as probed).

Adding an option is one row here; nothing else changes (the documentation's option
reference is generated from these rows: docs/hooks/reference.py). Importing this module
is cheap (no pytest, no device probe).
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from pytest_mlcjit._util import remote_limits
from pytest_mlcjit.device import Presence
from pytest_mlcjit.engine import parsers
from pytest_mlcjit.engine import remote as remote_keys
from pytest_mlcjit.errors import ConfigError
from pytest_mlcjit.policy import Policy

#: The limit for one compilation, in seconds (``--mlc-jit-timeout``).
DEFAULT_COMPILE_TIMEOUT_S = 1800.0


@dataclasses.dataclass(frozen=True)
class Option:
    """One row of the option table (the metadata of a :class:`Settings` field)."""

    #: ``--mlc-jit-…`` (None: no command-line flag).
    flag: str | None
    #: The ini key (None: none); a ``path`` option's ini value is relative to the ini file.
    ini: str | None
    #: The environment variable (None: none).
    env: str | None
    #: ``(source, text) -> value``; ConfigError naming the source; None: not set there.
    parse: parsers.Parse
    help: str
    #: The ini key's one-line help.
    ini_help: str = ""
    metavar: str | None = None
    #: ``value`` (``--flag VALUE``), ``switch`` (``--flag`` alone: true), ``path``.
    kind: Literal["value", "switch", "path"] = "value"
    #: Whether xdist workers receive it (the controller's report options need not).
    workers: bool = True
    #: A second environment variable read after ``env`` (TVM's ``TVM_TEST_TARGETS``).
    env_fallback: tuple[str, parsers.Parse] | None = None
    #: Whether ``env`` set but empty is given to the parser (which refuses it), instead of
    #: counting as unset (a key variable: empty is a mistake, never "no key").
    empty_is_set: bool = False

    @property
    def dest(self) -> str:
        """The attribute of pytest's ``config.option`` that holds the flag's value."""
        assert self.flag is not None
        return self.flag.lstrip("-").replace("-", "_")


def option(flag: str | None, *, ini: str | None = None, env: str | None = None,
           parse: parsers.Parse, default: Any, help: str, ini_help: str = "",
           metavar: str | None = None, kind: Literal["value", "switch", "path"] = "value",
           workers: bool = True, env_fallback: tuple[str, parsers.Parse] | None = None,
           empty_is_set: bool = False) -> Any:
    """A :class:`Settings` field that is an option (one row of the table)."""
    row = Option(flag, ini, env, parse, help, ini_help, metavar, kind, workers, env_fallback,
                 empty_is_set)
    return dataclasses.field(default=default, metadata={"option": row})


_AUTO_OFF_ON = "auto, on or off"


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything a run is configured with, resolved once (by the plugin, or by you)."""

    # -- the option table -----------------------------------------------------------------
    policy: Policy = option(
        "--mlc-jit-policy", ini="mlc_jit_policy", env="MLC_JIT_POLICY", parse=parsers.policy,
        default=Policy.ON, metavar="{ON,OFF,REDO,READONLY}",
        ini_help="JIT policy (ON, OFF, REDO, READONLY)",
        help="JIT policy: ON compiles on a miss, OFF never compiles nor reads, REDO "
        "recompiles each key once per run, READONLY only reads. Case-insensitive. "
        "Env MLC_JIT_POLICY; ini mlc_jit_policy; default ON.")
    #: The devices as named (``auto`` is resolved by the probe: :attr:`devices`).
    device: str = option(
        "--mlc-device", ini="mlc_device", parse=parsers.devices, default="auto",
        metavar="LIST", env_fallback=("TVM_TEST_TARGETS", parsers.tvm_targets),
        ini_help="comma-separated devices (default auto)",
        help="comma-separated devices each test runs on: auto, cpu, cuda, cuda:1, rocm, "
        "metal, vulkan, opencl, webgpu. Absent devices are skipped. Env TVM_TEST_TARGETS "
        "(';'-separated TVM targets, as tvm.testing reads them: llvm;cuda); ini mlc_device; "
        "default auto (the first present GPU, else cpu).")
    require_devices: bool = option(
        "--mlc-jit-require-devices", ini="mlc_jit_require_devices", parse=parsers.truth,
        default=False, kind="switch",
        ini_help="fail the tests of an absent device instead of skipping them (true or false)",
        help="fail, instead of skipping, the tests of a selected device that is absent (for "
        "GPU runners: a broken driver fails the run instead of skipping every GPU test). "
        "ini mlc_jit_require_devices.")
    cache_dir: Path | None = option(
        "--mlc-jit-cache-dir", ini="mlc_jit_cache_dir", env="MLC_JIT_CACHE_DIR",
        parse=parsers.path("a directory path"), default=None, metavar="PATH", kind="path",
        ini_help="cache directory (relative to the ini file)",
        help="cache directory. Env MLC_JIT_CACHE_DIR; ini mlc_jit_cache_dir; default "
        "$XDG_CACHE_HOME/pytest-mlcjit or ~/.cache/pytest-mlcjit (MLC model directories: "
        "$MLC_LLM_HOME).")
    compile_timeout: float = option(
        "--mlc-jit-timeout", ini="mlc_jit_timeout", parse=parsers.seconds,
        default=DEFAULT_COMPILE_TIMEOUT_S, metavar="SECONDS",
        ini_help="limit in seconds for one compilation",
        help=f"limit for one compilation. ini mlc_jit_timeout; default "
        f"{DEFAULT_COMPILE_TIMEOUT_S:g}.")
    #: How long to wait for another process's compile; None: compile timeout + 5 minutes.
    lock_timeout: float | None = option(
        "--mlc-jit-lock-timeout", ini="mlc_jit_lock_timeout", parse=parsers.seconds,
        default=None, metavar="SECONDS", ini_help="limit in seconds for a lock wait",
        help="limit for waiting on another process compiling the same library. "
        "ini mlc_jit_lock_timeout; default: the compile timeout plus 300.")
    allow_untrusted: bool = option(
        "--mlc-jit-allow-untrusted-cache", ini="mlc_jit_allow_untrusted_cache",
        parse=parsers.truth, default=False, kind="switch",
        ini_help="load from a cache others can write to (true or false)",
        help="load from a cache directory that other users can write to (refused by default: "
        "loading a library runs its code). ini mlc_jit_allow_untrusted_cache.")
    prepare: bool = option(
        "--mlc-jit-prepare", parse=parsers.truth, default=False, kind="switch",
        help="warm the cache: collect the tests, compile every distinct library they request "
        "(in parallel under -n), run no test; exit 0 only if every library compiled. With "
        "--mlc-jit-policy=READONLY it only checks that every library is cached.")
    prefetch: str = option(
        "--mlc-jit-prefetch", ini="mlc_jit_prefetch", parse=parsers.choice("auto", "on", "off"),
        default="auto", metavar="{auto,on,off}",
        ini_help="background prefetch: " + _AUTO_OFF_ON,
        help="compile, in the background right after collection, the libraries the "
        "collected tests need, longest expected compile first, each worker taking the next "
        "one no other worker is compiling. auto: under xdist with 2+ workers; off: also "
        "no remote hit fetched ahead (MLC_JIT_REMOTE_AHEAD). ini mlc_jit_prefetch; default "
        "auto.")
    max_size: int | None = option(
        "--mlc-jit-max-size", ini="mlc_jit_max_size", parse=parsers.size, default=None,
        metavar="SIZE", ini_help="cache size cap applied after each run (10G, 500M)",
        help="after the run, evict least recently used entries until the cache is at most "
        "SIZE (10G, 500M, 2GiB), never one this run used. ini mlc_jit_max_size; default: "
        "no cap.")
    progress: str = option(
        "--mlc-jit-progress", ini="mlc_jit_progress", parse=parsers.choice("auto", "on", "off"),
        default="auto", metavar="{auto,on,off}", ini_help="live progress: " + _AUTO_OFF_ON,
        help="show what is compiling, downloading or waiting for another's compile once it "
        "has taken mlc_jit_progress_delay (2s by default): model, target, worker, seconds. "
        "auto: a status line redrawn in place on a terminal, plain start/end lines (and a "
        "heartbeat every 30s) otherwise; on: the "
        "redrawn line even where no terminal is detected; off: nothing. ini "
        "mlc_jit_progress; default auto.")
    progress_delay: float = option(
        None, ini="mlc_jit_progress_delay", env="MLC_JIT_PROGRESS_DELAY",
        parse=parsers.seconds, default=2.0,
        ini_help="seconds a job runs before live progress shows it (default 2)",
        help="seconds a compile, download or wait runs before the live progress shows it. "
        "Env MLC_JIT_PROGRESS_DELAY; ini mlc_jit_progress_delay; default 2.")
    progress_interval: float = option(
        None, ini="mlc_jit_progress_interval", env="MLC_JIT_PROGRESS_INTERVAL",
        parse=parsers.seconds, default=0.5,
        ini_help="seconds between two looks of the live progress (default 0.5)",
        help="how often the live progress looks at what the run's processes are doing, in "
        "seconds. Env MLC_JIT_PROGRESS_INTERVAL; ini mlc_jit_progress_interval; default 0.5.")
    #: Where to write the JSON accounting (--mlc-jit-report), if anywhere.
    report_path: Path | None = option(
        "--mlc-jit-report", ini="mlc_jit_report", parse=parsers.path("a file path"),
        default=None, metavar="PATH", kind="path", workers=False,
        ini_help="JSON accounting report path (relative to the ini file)",
        help="write the run's accounting as JSON to PATH (requests, outcomes, one record per "
        "library), merged across xdist workers; a symlink, FIFO or device is written through, "
        "not replaced; a report that cannot be written makes the exit status 4. ini "
        "mlc_jit_report (relative to the ini file).")
    #: Where to write the run's timeline (--mlc-jit-trace), if anywhere.
    trace_path: Path | None = option(
        "--mlc-jit-trace", ini="mlc_jit_trace", env="MLC_JIT_TRACE",
        parse=parsers.path("a file path"), default=None, metavar="PATH", kind="path",
        ini_help="Chrome trace-event JSON timeline path (relative to the ini file)",
        help="write the run's timeline to PATH as Chrome trace-event JSON (open it in "
        "ui.perfetto.dev or chrome://tracing): one track per xdist worker and per thread, "
        "with compiles, downloads, waits for another's compile or the GPU lock, and each "
        "test's setup and call. Env MLC_JIT_TRACE; ini mlc_jit_trace (relative to the ini "
        "file).")
    #: How many of the slowest compiles the summary lists (0: all; None: 5 when one took
    #: over 10s).
    durations: int | None = option(
        "--mlc-jit-durations", ini="mlc_jit_durations", parse=parsers.count, default=None,
        metavar="N", workers=False, ini_help="list the N slowest compiles (0: all)",
        help="list the N slowest compiles in the summary (0: all). ini mlc_jit_durations; "
        "default 5 when a compile took over 10s, else none.")
    #: The remote tier (``s3://``, ``az://``, ``gha://`` or ``file://``), None for none.
    remote: str | None = option(
        "--mlc-jit-remote", ini="mlc_jit_remote", env="MLC_JIT_REMOTE",
        parse=parsers.remote_url, default=None, metavar="URL",
        ini_help="remote tier URL (s3://bucket/prefix, az://container/prefix, gha://[scope], "
        "file:///path)",
        help="a second cache tier shared by many machines: s3://bucket/prefix (needs "
        "pytest-mlcjit[remote]; credentials, region and endpoint from the AWS_* variables), "
        "az://container/prefix (needs pytest-mlcjit[azure]; AZURE_STORAGE_* variables), "
        "gha://[scope] (GitHub Actions' cache; ACTIONS_RESULTS_URL, ACTIONS_RUNTIME_TOKEN) "
        "or file:///path. Env MLC_JIT_REMOTE; ini mlc_jit_remote; default: none.")
    remote_mode: str = option(
        "--mlc-jit-remote-mode", ini="mlc_jit_remote_mode", env="MLC_JIT_REMOTE_MODE",
        parse=parsers.choice("read", "readwrite"), default="readwrite",
        metavar="{read,readwrite}", ini_help="remote mode: read or readwrite",
        help="read: only download from the remote; readwrite: also upload what this run "
        "compiles. Env MLC_JIT_REMOTE_MODE; ini mlc_jit_remote_mode; default readwrite.")
    remote_required: bool = option(
        "--mlc-jit-remote-required", ini="mlc_jit_remote_required", parse=parsers.truth,
        default=False, kind="switch", ini_help="fail on remote errors (true or false)",
        help="a remote error (unreachable, timeout, throttled) fails the tests that meet it "
        "instead of falling back to compiling locally, and an upload that could not be made "
        "fails the run. ini mlc_jit_remote_required.")
    #: The remote's size budget, applied by the controller after a prepare run that
    #: uploaded (None: none).
    remote_max_size: int | None = option(
        "--mlc-jit-remote-max-size", ini="mlc_jit_remote_max_size",
        env="MLC_JIT_REMOTE_MAX_SIZE", parse=parsers.size, default=None, metavar="SIZE",
        workers=False, ini_help="remote size budget applied after a prepare run (10G, 500M)",
        help="after a --mlc-jit-prepare run that uploaded, remove the remote's least "
        "recently used entries until the blobs the others use total at most SIZE (10G, "
        "500M, 2GiB), as 'pytest-mlcjit remote prune --max-size' does, never an entry this "
        "run used or uploaded. Env MLC_JIT_REMOTE_MAX_SIZE; ini mlc_jit_remote_max_size; "
        "default: no budget.")
    remote_connect_timeout: float = option(
        None, env="MLC_JIT_REMOTE_CONNECT_TIMEOUT",
        parse=parsers.seconds_up_to(remote_limits.MAX_TIMEOUT_S),
        default=remote_limits.CONNECT_TIMEOUT_S,
        help="seconds to wait for a connection to the remote (more than 0, at most "
        f"{remote_limits.MAX_TIMEOUT_S:g}). Env MLC_JIT_REMOTE_CONNECT_TIMEOUT; default "
        f"{remote_limits.CONNECT_TIMEOUT_S:g}.")
    remote_read_timeout: float = option(
        None, env="MLC_JIT_REMOTE_READ_TIMEOUT",
        parse=parsers.seconds_up_to(remote_limits.MAX_TIMEOUT_S),
        default=remote_limits.READ_TIMEOUT_S,
        help="seconds to wait for each read from the remote (more than 0, at most "
        f"{remote_limits.MAX_TIMEOUT_S:g}). Env MLC_JIT_REMOTE_READ_TIMEOUT; default "
        f"{remote_limits.READ_TIMEOUT_S:g}.")
    remote_deadline: float = option(
        None, env="MLC_JIT_REMOTE_DEADLINE",
        parse=parsers.seconds_up_to(remote_limits.MAX_TIMEOUT_S),
        default=remote_limits.DEADLINE_S,
        help="seconds one remote operation (a listing page, a manifest, a download, an "
        "upload) may take in all, plus its size at MLC_JIT_REMOTE_MIN_THROUGHPUT: past it "
        "the operation is given up as a remote error. Env MLC_JIT_REMOTE_DEADLINE; default "
        f"{remote_limits.DEADLINE_S:g}.")
    remote_min_throughput: int = option(
        None, env="MLC_JIT_REMOTE_MIN_THROUGHPUT", parse=parsers.throughput,
        default=remote_limits.MIN_THROUGHPUT,
        help="the slowest transfer accepted, in bytes per second (1MB: 1,000,000): an "
        "operation's deadline is MLC_JIT_REMOTE_DEADLINE plus its size at this rate. Env "
        "MLC_JIT_REMOTE_MIN_THROUGHPUT; default 1MB.")
    #: The gha:// adapter reads these three itself (the cache layer: also for the CLI);
    #: the rows document them and check their values at the start of a run.
    gha_max_wait: float = option(
        None, env="MLC_JIT_GHA_MAX_WAIT", parse=parsers.seconds_up_to(remote_limits.MAX_TIMEOUT_S),
        default=120.0,
        help="gha:// remotes: the most seconds one request to the GitHub Actions cache waits in "
        "all for throttling (429) and server errors (5xx), as Retry-After asks, within the "
        "operation's deadline; then the write or read is given up and reported. Env "
        "MLC_JIT_GHA_MAX_WAIT; default 120.")
    gha_rate: int = option(
        None, env="MLC_JIT_GHA_RATE", parse=parsers.count, default=200,
        help="gha:// remotes: the GitHub Actions cache's limit of new entries per "
        "MLC_JIT_GHA_RATE_WINDOW seconds per repository; creations are paced to a burst of a "
        "tenth of it, then 90% of it (0: not paced). Env MLC_JIT_GHA_RATE; default 200.")
    gha_rate_window: float = option(
        None, env="MLC_JIT_GHA_RATE_WINDOW",
        parse=parsers.seconds_up_to(remote_limits.MAX_TIMEOUT_S), default=60.0,
        help="gha:// remotes: the window of MLC_JIT_GHA_RATE, in seconds. Env "
        "MLC_JIT_GHA_RATE_WINDOW; default 60.")
    #: What MLC_JIT_REMOTE_SIGNING_KEY holds (``ed25519:<key id>``, ``hmac-sha256``), never
    #: the key: the engine reads it from the environment (:mod:`.remote`).
    remote_signing_key: str | None = option(
        None, env="MLC_JIT_REMOTE_SIGNING_KEY", parse=remote_keys.signing_key_kind,
        default=None, empty_is_set=True,
        help="the key that signs what this run uploads to the remote: an Ed25519 private key "
        "(PEM text, or the path of a .pem file: readers verify it with its public key) or "
        "an HMAC secret (which signs and verifies). Set but empty, malformed, or a public "
        "key: a usage error. Env MLC_JIT_REMOTE_SIGNING_KEY; default: none (unsigned).")
    #: The key ids of MLC_JIT_REMOTE_TRUSTED_KEYS' public keys (the keys: :mod:`.remote`).
    remote_trusted_keys: tuple[str, ...] = option(
        None, env="MLC_JIT_REMOTE_TRUSTED_KEYS", parse=remote_keys.trusted_key_ids,
        default=(), empty_is_set=True,
        help="Ed25519 public keys (PEM text, or paths of PEM files, separated by newlines or "
        f"{os.pathsep!r}): remote entries are loaded only when signed by one of them. Set "
        "but empty or malformed: a usage error. Env MLC_JIT_REMOTE_TRUSTED_KEYS; default: "
        "none.")
    #: Remote hits downloaded at once ahead of time, right after collection (0: none).
    remote_ahead: int = option(
        None, ini="mlc_jit_remote_ahead", env="MLC_JIT_REMOTE_AHEAD", parse=parsers.count,
        default=4, ini_help="remote hits downloaded at once ahead of time (0: none)",
        help="how many of the run's remote hits to download at once, in the background "
        "right after collection (the first library the tests use before they start, the "
        "others longest expected compile first; each once per machine), before the tests "
        "ask; 0: each is downloaded when a test first asks. --mlc-jit-prefetch=off turns it "
        "off too. Env MLC_JIT_REMOTE_AHEAD; ini mlc_jit_remote_ahead; default 4.")
    #: The prepare shard ``(I, N)`` (--mlc-jit-shard), None for all.
    shard: tuple[int, int] | None = option(
        "--mlc-jit-shard", ini="mlc_jit_shard", parse=parsers.shard, default=None,
        metavar="I/N", ini_help="prepare shard I/N",
        help="with --mlc-jit-prepare: compile only the libraries whose key falls in shard I "
        "of N (1 <= I <= N, stable by key digest), so N CI jobs fill a remote together. "
        "ini mlc_jit_shard.")
    #: Pre-warmed compile workers: ``auto`` and ``on`` use them where they can run (Linux),
    #: ``off`` starts a fresh process per compile.
    compile_workers: str = option(
        "--mlc-jit-compile-workers", ini="mlc_jit_compile_workers",
        env="MLC_JIT_COMPILE_WORKERS", parse=parsers.compile_workers, default="auto",
        metavar="{auto,on,off}", ini_help="pre-warmed compile workers: " + _AUTO_OFF_ON,
        help="run each compile in a fork of a worker that imported TVM once per test "
        "process (still one process per compile, killed whole on timeout, dying with the "
        "test process), instead of a new interpreter that imports TVM each time. auto: "
        "where it can (Linux); on: the same, an error elsewhere; off: a new interpreter "
        "per compile. Env MLC_JIT_COMPILE_WORKERS; ini mlc_jit_compile_workers; default auto.")
    retry_failed: bool = option(
        "--mlc-jit-retry-failed", ini="mlc_jit_retry_failed", parse=parsers.truth,
        default=False, kind="switch", ini_help="compile known failures again (true or false)",
        help="compile again the known failures: a library whose factory or compiler raised "
        "the same error twice in a row (never for running out of memory) is otherwise "
        "reported at once, without compiling, while its key and recorded inputs are "
        "unchanged. ini mlc_jit_retry_failed.")
    gpu_lock: str = option(
        "--mlc-jit-gpu-lock", ini="mlc_jit_gpu_lock", env="MLC_JIT_GPU_LOCK",
        parse=parsers.gpu_lock, default="auto", metavar="{auto,on,off}",
        ini_help="hold the GPU lock while gpu tests run: " + _AUTO_OFF_ON,
        help="run the call phase of every test marked gpu holding the machine's GPU lock, "
        "TVM's own (tvm.testing.run_with_gpu_lock: flock on $TVM_TEST_LOCK_DIR/gpu.lock, "
        "gpu-<i>.lock for GPU i > 0); setup (compiling, loading) and teardown stay outside "
        "it. auto: under xdist with 2+ workers, and whenever TVM_TEST_LOCK_DIR is set. Env "
        "MLC_JIT_GPU_LOCK; ini mlc_jit_gpu_lock; default auto.")
    gpu_assign: str = option(
        "--mlc-jit-gpu-assign", ini="mlc_jit_gpu_assign", env="MLC_JIT_GPU_ASSIGN",
        parse=parsers.gpu_assign, default="auto", metavar="{auto,off}",
        ini_help="spread xdist workers over the GPUs: auto or off",
        help="on a host with several GPUs of a kind named without an index (--mlc-device="
        "cuda), xdist worker gwI runs its tests on GPU I mod G (cuda:1…); a library is "
        "shared by the GPUs of one architecture; an explicit index is never moved. auto: "
        "when the probe finds 2+ GPUs; off: every worker on GPU 0. Env MLC_JIT_GPU_ASSIGN; "
        "ini mlc_jit_gpu_assign; default auto.")

    # -- facts of the run (no row) ----------------------------------------------------------
    #: Identifies one test run across all its xdist workers (REDO and failure memory).
    run_id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)
    #: Probed devices, ``{str(device): Presence}``; others are probed on first use.
    presence: Mapping[str, Presence] = dataclasses.field(default_factory=dict)
    #: The devices tests run on (:attr:`device` with ``auto`` resolved by the probe).
    devices: tuple[str, ...] = ("cpu",)
    #: Where each option's value came from, for messages: ``{"device": "--mlc-device=cpu"}``.
    origins: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "policy", Policy.parse(self.policy))
        if self.cache_dir is not None and not isinstance(self.cache_dir, Path):
            object.__setattr__(self, "cache_dir", Path(self.cache_dir))

    @property
    def effective_lock_timeout(self) -> float:
        return self.lock_timeout if self.lock_timeout is not None else self.compile_timeout + 300

    @property
    def device_origin(self) -> str:
        """Where the devices came from, for messages: ``TVM_TEST_TARGETS=llvm;cuda`` when
        TVM's variable chose them, else ``--mlc-device=cpu,cuda``."""
        origin = self.origins.get("device", "")
        return origin if origin.startswith("TVM_TEST_TARGETS=") else f"--mlc-device={self.device}"

    # -- the hand-off to xdist workers --------------------------------------------------------
    def to_json(self, *, workers: bool = False) -> dict[str, Any]:
        """Plain data that execnet can send (``workers``: only what workers need)."""
        data: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            row = field.metadata.get("option")
            if workers and row is not None and not row.workers:
                continue
            value = getattr(self, field.name)
            data[field.name] = ({k: v.to_json() for k, v in value.items()}
                                if field.name == "presence" else _plain(value))
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Settings:
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            if field.name not in data:
                continue
            value, row = data[field.name], field.metadata.get("option")
            if field.name == "presence":
                value = {k: Presence.from_json(v) for k, v in value.items()}
            elif isinstance(value, list):
                value = tuple(value)
            elif row is not None and row.kind == "path" and value is not None:
                value = Path(value)
            values[field.name] = value
        return cls(**values)


def _plain(value: Any) -> Any:
    if isinstance(value, Policy):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, Mapping):
        return dict(value)
    return value


def rows() -> list[tuple[str, Option]]:
    """The option table: ``(field name, row)`` in declaration order."""
    return [(f.name, f.metadata["option"]) for f in dataclasses.fields(Settings)
            if "option" in f.metadata]


#: ``name -> (text or value, where from)``: what a source holds for an option.
Source = Callable[[str, Option], tuple[Any, str] | None]


def resolve(*, cli: Source | None = None, ini: Source | None = None,
            environ: Mapping[str, str] | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """Every option's value, command line > environment > ini > default, and where each
    came from. ``cli`` gives a parsed value (argparse ran the row's parser), ``ini`` its
    text (parsed here, naming the key); bad values raise ConfigError naming their source.
    """
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for field in dataclasses.fields(Settings):
        row = field.metadata.get("option")
        if row is None:
            continue
        found = _lookup(field.name, row, cli, ini, env)
        if found is None:
            values[field.name] = field.default
            continue
        values[field.name], origins[field.name] = found
    return values, origins


def _lookup(name: str, row: Option, cli: Source | None, ini: Source | None,
            env: Mapping[str, str]) -> tuple[Any, str] | None:
    if cli is not None and (given := cli(name, row)) is not None:
        return given
    for var, parse in ((row.env, row.parse), row.env_fallback or (None, row.parse)):
        if var and ((text := env.get(var)) or (text == "" and row.empty_is_set)):
            value = parse(var, text)
            if value is not None:
                return value, f"{var}={text}"
    if ini is not None and (given := ini(name, row)) is not None:
        text, source = given
        value = row.parse(source, text)
        if value is not None:
            return value, f"{source}={text}"
    return None


def from_environment(**overrides: Any) -> Settings:
    """Settings from the environment and defaults alone (plain Python, the CLI)."""
    values, origins = resolve()
    values.update(overrides)
    return Settings(**values, origins=origins)


def check_rows() -> None:
    """ConfigError if two rows share a flag, an ini key or an environment variable."""
    seen: dict[str, str] = {}
    for name, row in rows():
        for key in (row.flag, row.ini, row.env):
            if key is not None and seen.setdefault(key, name) != name:
                raise ConfigError(f"options {seen[key]} and {name} both use {key}")
