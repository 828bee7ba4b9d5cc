"""This process's state of one pytest run, kept in ``config.stash``: the resolved settings,
then (made on first need) the device probe and the engine, and what the xdist workers sent
back. Everything a run sets lives here, so a second run in the same process (pytester)
starts from nothing of the first.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import pytest

from pytest_mlcjit._util.fs import WriteWarnings
from pytest_mlcjit.cache.layout import default_cache_dir, mlc_llm_home
from pytest_mlcjit.device import Presence
from pytest_mlcjit.engine.settings import Settings

if TYPE_CHECKING:
    from pytest_mlcjit.engine.jit import JIT
    from pytest_mlcjit.engine.stats import Stats
    from pytest_mlcjit.plugin.prefetch import Prefetcher
    from pytest_mlcjit.plugin.progress import Progress

#: The run's state (set at configure, unless the plugin is disabled).
state_key = pytest.StashKey["RunState"]()
#: A test whose compile failed: its report section (title, the compile log's last lines).
compile_log_key = pytest.StashKey[tuple[str, str]]()
#: A test whose compile failed or was interrupted: the first line of its message, for -rE.
failure_line_key = pytest.StashKey[str]()


def _pytest_warning(message: str) -> None:
    """A write the cache can do without failed: a PytestWarning, as pytest's own
    cacheprovider warns (shown in the warnings summary)."""
    warnings.warn(pytest.PytestWarning(message), stacklevel=3)


class RunState:
    """This process's view of the run.

    On the controller (or without xdist) the options are resolved at configure; the
    device probe and the engine are made on first need: by a test that asks for a model
    or a device, by the report header, or when the workers are started, which receive the
    settings ready-made, probe included (``probed``).
    """

    def __init__(self, options: Settings, *, probed: bool = False,
                 board: str | None = None) -> None:
        #: The resolved options (without the probe, unless ``probed``).
        self.options = options
        self._settings: Settings | None = options if probed else None
        #: The progress board this run's processes publish their jobs on (None: default).
        self.board = board
        #: Writes the cache can do without that failed, said once per path in this run.
        self.warnings = WriteWarnings(_pytest_warning)
        #: The live progress display (controller, or without xdist), once started.
        self.progress: Progress | None = None
        #: The JSON report written after the run (``--mlc-jit-report``), or why not.
        self.report_written: str | None = None
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
        #: Told of each job the engine's board ended (the trace, ``--mlc-jit-trace``).
        self.on_job: Callable[[dict[str, Any]], None] | None = None

    @property
    def settings(self) -> Settings:
        """The settings, the devices probed (once)."""
        if self._settings is None:
            from pytest_mlcjit.device import devices_to_probe, probe, resolve_auto

            names = self.options.device.split(",")
            # Counting the GPUs (for --mlc-jit-gpu-assign) costs nothing more where one
            # is asked: the same subprocess probes the other indexes.
            presence = probe(devices_to_probe(names), count=self.options.gpu_assign != "off")
            self._settings = dataclasses.replace(
                self.options, presence=presence, devices=tuple(resolve_auto(names, presence)))
        return self._settings

    @property
    def engine(self) -> JIT:
        if self._engine is None:
            from pytest_mlcjit.engine.activity import Board
            from pytest_mlcjit.engine.jit import JIT

            settings = self.settings
            board = Board(run_id=settings.run_id, worker=self.worker,
                          directory=self.progress_board(), publish=True,
                          warnings=self.warnings)
            board.on_end = self.on_job
            self._engine = JIT(settings, board=board, warnings=self.warnings)
        return self._engine

    @property
    def engine_made(self) -> bool:
        return self._engine is not None

    def stats(self) -> Stats | None:
        """This process's statistics merged with the workers'; None if none were kept."""
        if self._engine is None and not self.worker_stats:
            return None
        from pytest_mlcjit.engine.stats import Stats

        total = Stats()
        if self._engine is not None:
            total.merge(self._engine.stats.to_json())
        for stats in self.worker_stats:
            total.merge(stats)
        return total

    # -- the xdist hand-off ---------------------------------------------------------------
    def worker_input(self) -> dict[str, Any]:
        """What a worker needs: the settings (probing the devices once, here) and where the
        run's jobs are published."""
        return {"settings": self.settings.to_json(workers=True), "board": self.progress_board()}

    @classmethod
    def from_worker_input(cls, data: Mapping[str, Any]) -> RunState:
        return cls(Settings.from_json(data["settings"]), probed=True, board=data.get("board"))

    def header_line(self) -> str:
        """The policy, the devices as probed, and the cache (probes the devices)."""
        s = self.settings
        parts = []
        for name in s.devices:
            p = s.presence.get(name, Presence(True))
            parts.append(f"{name} ({_spread(s, name)})" if p.present
                         else f"{name} (absent: {p.reason})")
        if s.cache_dir is not None:
            where = f"cache={s.cache_dir}"
        else:
            where = f"cache={default_cache_dir()} (MLC: {mlc_llm_home()})"
        header = f"mlcjit: policy={s.policy.value}, devices={', '.join(parts)}, {where}"
        from pytest_mlcjit.engine.remote import trust_line  # the remote's signatures

        trust = trust_line(s)
        return header if trust is None else f"{header}\n{trust}"

    def used_the_plugin(self) -> bool:
        """Whether this run has anything to report at its end (a request, a report to
        write, a size cap): a run that never used the plugin pays for nothing more."""
        return bool(self.engine_made or self.worker_stats
                    or self.options.report_path is not None
                    or self.options.max_size is not None)

    def progress_board(self) -> str | None:
        """The board where this run's processes publish their jobs (:mod:`..engine.activity`)."""
        if self.board is None:
            from pytest_mlcjit.engine.activity import default_board

            board = default_board()
            self.board = str(board) if board is not None else None
        return self.board


def _spread(settings: Settings, name: str) -> str:
    """``present``, and for a GPU named without an index whose kind has several GPUs
    here, how xdist workers are spread over them (``--mlc-jit-gpu-assign``)."""
    from pytest_mlcjit.device import Device, gpus_present

    device = Device.parse(name)
    gpus = gpus_present(settings.presence, device.kind) if device.is_gpu else []
    if len(gpus) < 2 or device.index != 0 or settings.prepare:
        return "present"
    spread = settings.gpu_assign != "off"
    how = (f"xdist worker gwI runs on {device.kind}:(I mod {len(gpus)})" if spread
           else "every worker on GPU 0")
    archs = sorted({settings.presence[str(g)].arch or "?" for g in gpus})
    return (f"present, {len(gpus)} GPUs ({', '.join(archs)}): {how} "
            "(--mlc-jit-gpu-assign)")


def run_state(config: pytest.Config) -> RunState:
    """The run's state; a UsageError if the plugin was not configured (disabled with -p)."""
    if state_key not in config.stash:
        raise pytest.UsageError("pytest-mlcjit is not configured (was it disabled with -p?)")
    return config.stash[state_key]


def get_engine(config: pytest.Config) -> JIT:
    """The run's engine (made on first call)."""
    return run_state(config).engine
