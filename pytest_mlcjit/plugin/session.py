"""This process's state of one pytest run, kept in ``config.stash``: the resolved options,
then (made on first need) the device probe, the :class:`Settings` and the engine, and the
statistics the xdist workers sent back."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import pytest

from pytest_mlcjit.plugin.options import AUTO, Options
from pytest_mlcjit.engine.settings import DEFAULT_COMPILE_TIMEOUT_S, Settings

if TYPE_CHECKING:
    from pytest_mlcjit.engine.jit import JIT, Stats
    from pytest_mlcjit.plugin.prefetch import Prefetcher
    from pytest_mlcjit.plugin.progress import Progress

#: The run's state (set at configure, unless the plugin is disabled).
state_key = pytest.StashKey["RunState"]()
#: A test whose compile failed: its report section (title, the compile log's last lines).
compile_log_key = pytest.StashKey[tuple[str, str]]()
#: A test whose compile failed or was interrupted: the first line of its message, for -rE.
failure_line_key = pytest.StashKey[str]()


class RunState:
    """This process's view of the run.

    On the controller (or without xdist) the options are resolved at configure; the
    device probe, the settings and the engine are made on first need: by a test that asks
    for a model or a device, by the report header, or when the workers are started, which
    receive the settings ready-made (``settings_json``).
    """

    def __init__(self, options: Options, *, settings_json: Mapping[str, Any] | None = None,
                 board: str | None = None) -> None:
        self.options = options
        self._settings_json = settings_json
        #: The progress board this process's jobs are published on (None: the default).
        self.board = board
        #: The live progress display (controller, or without xdist), once started.
        self.progress: Progress | None = None
        #: The JSON report written after the run (``--mlc-jit-report``), or why not.
        self.report_written: str | None = None
        self._settings: Settings | None = None
        self._engine: JIT | None = None
        #: Statistics sent by the workers (controller only), merged with its own.
        self.worker_stats: list[Mapping[str, Any]] = []
        #: The digests this run's tests used (the size cap never evicts them).
        self.used: set[str] = set()
        #: This process's background prefetch, when one runs.
        self.prefetcher: Prefetcher | None = None
        #: What the size cap pruned after the run, per root, or the error that stopped it.
        self.pruned: list[Any] = []
        #: When this run started (controller).
        self.started: float | None = None
        #: This process's name: its xdist worker id (``gw1``, from its config), else main.
        self.worker = "main"

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            if self._settings_json is not None:
                self._settings = Settings.from_json(self._settings_json)
            else:
                from pytest_mlcjit.device import devices_to_probe, probe, resolve_auto

                opts = self.options
                presence = probe(devices_to_probe(list(opts.devices)))
                self._settings = Settings(
                    policy=opts.policy, cache_dir=opts.cache_dir,
                    compile_timeout=opts.compile_timeout or DEFAULT_COMPILE_TIMEOUT_S,
                    lock_timeout=opts.lock_timeout, presence=presence,
                    devices=tuple(resolve_auto(list(opts.devices), presence)),
                    allow_untrusted=opts.allow_untrusted, remote=opts.remote,
                    remote_mode=opts.remote_mode, remote_required=opts.remote_required,
                    compile_workers=opts.compile_workers, retry_failed=opts.retry_failed,
                )
        return self._settings

    @property
    def engine(self) -> JIT:
        if self._engine is None:
            from pytest_mlcjit.engine import activity
            from pytest_mlcjit.engine.jit import JIT

            self._engine = JIT(self.settings)
            activity.configure(run_id=self.settings.run_id, worker=self.worker,
                               board=self.board)
        return self._engine

    @property
    def engine_made(self) -> bool:
        return self._engine is not None

    def stats(self) -> Stats | None:
        """This process's statistics merged with the workers'; None if none were kept."""
        if self._engine is None and not self.worker_stats:
            return None
        from pytest_mlcjit.engine.jit import Stats

        total = Stats()
        if self._engine is not None:
            total.merge(self._engine.stats.to_json())
        for stats in self.worker_stats:
            total.merge(stats)
        return total

    # -- the xdist hand-off ---------------------------------------------------------------
    def worker_input(self) -> dict[str, Any]:
        """What a worker needs: the settings (probing the devices once, here) and the
        options, resolved."""
        opts = self.options
        return {"settings": self.settings.to_json(), "device_option": opts.device_option,
                "prefetch": opts.prefetch, "max_size": opts.max_size,
                "board": self.progress_board(), "progress": opts.progress,
                "require_devices": opts.require_devices, "device_origin": opts.device_origin,
                "shard": list(opts.shard) if opts.shard else None}

    @classmethod
    def from_worker_input(cls, data: Mapping[str, Any], *, prepare: bool) -> RunState:
        settings = Settings.from_json(data["settings"])
        options = Options(
            policy=settings.policy, devices=settings.devices or (AUTO,),
            device_option=data["device_option"], cache_dir=settings.cache_dir,
            compile_timeout=settings.compile_timeout, lock_timeout=settings.lock_timeout,
            allow_untrusted=settings.allow_untrusted, prefetch=data["prefetch"],
            max_size=data["max_size"], prepare=prepare,
            require_devices=bool(data.get("require_devices")),
            device_origin=str(data.get("device_origin") or ""),
            progress=str(data.get("progress") or "auto"),
            remote=settings.remote, remote_mode=settings.remote_mode,
            remote_required=settings.remote_required,
            compile_workers=settings.compile_workers, retry_failed=settings.retry_failed,
            shard=(int(data["shard"][0]), int(data["shard"][1])) if data.get("shard") else None)
        return cls(options, settings_json=data["settings"], board=data.get("board"))

    def progress_board(self) -> str | None:
        """The board where this run's processes publish their jobs (:mod:`.activity`)."""
        if self.board is None:
            from pytest_mlcjit.engine.activity import default_board

            board = default_board()
            self.board = str(board) if board is not None else None
        return self.board


def run_state(config: pytest.Config) -> RunState:
    """The run's state; a UsageError if the plugin was not configured (disabled with -p)."""
    if state_key not in config.stash:
        raise pytest.UsageError("pytest-mlcjit is not configured (was it disabled with -p?)")
    return config.stash[state_key]


def get_engine(config: pytest.Config) -> JIT:
    """The run's engine (made on first call)."""
    return run_state(config).engine
