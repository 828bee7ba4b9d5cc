"""The GPU lock around the call phase of ``gpu`` tests (``--mlc-jit-gpu-lock``).

The call phase of a test marked ``gpu`` (the plugin's own marking, or a user's) runs
holding the lock of its device (:mod:`pytest_mlcjit.device.gpu_lock`: TVM's ``gpu.lock``
for GPU 0 and a test without a device); setup (compiling, downloading, loading the
library) and teardown run outside it. A test that asks for the ``mlc_gpu_lock`` fixture
takes the lock itself, around the part of its body that uses the GPU, and is not wrapped
whole; ``@pytest.mark.mlc_gpu_lock(False)`` opts a test out (``True`` opts a test that is
not marked ``gpu`` in).

The wait is a ``gpu`` job on the run's board (the live progress shows it with the lock's
holder), and the seconds spent waiting for the lock and holding it are counted in the
run's statistics (``gpu_wait_seconds``, ``gpu_hold_seconds``).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Generator, Iterator
from typing import Any

import pytest

from pytest_mlcjit.device import Device
from pytest_mlcjit.device.gpu_lock import ENV_LOCK_DIR, GpuLock, gpu_lock, lock_path
from pytest_mlcjit.errors import MlcJitError
from pytest_mlcjit.plugin.session import run_state

MARKER = ("mlc_gpu_lock(enabled=True): whether this test's call phase holds the GPU lock "
          "(--mlc-jit-gpu-lock): False opts a gpu test out, True opts any test in.")

#: Whether the lock is on in this run (resolved once per run).
_enabled_key = pytest.StashKey[bool]()


def lock_enabled(config: pytest.Config) -> bool:
    """``on``; ``off``; ``auto``: under xdist with 2+ workers, or ``TVM_TEST_LOCK_DIR`` set."""
    if _enabled_key not in config.stash:
        mode = run_state(config).options.gpu_lock
        workers = _workers(config)
        config.stash[_enabled_key] = mode == "on" or (
            mode == "auto" and (workers >= 2 or bool(os.environ.get(ENV_LOCK_DIR))))
    return config.stash[_enabled_key]


def _workers(config: pytest.Config) -> int:
    """How many xdist workers the run has (a worker is told; the controller counts ``-n``;
    ``-n auto`` counts as several)."""
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None:
        return int(workerinput.get("workercount", 1))
    n = getattr(config.option, "numprocesses", None)
    if isinstance(n, int):
        return n
    return 2 if n in ("auto", "logical") else 1


def wraps_call(item: pytest.Item) -> bool:
    """Whether ``item``'s whole call phase runs holding the lock."""
    marker = item.get_closest_marker("mlc_gpu_lock")
    wanted = (bool(marker.args[0] if marker.args else marker.kwargs.get("enabled", True))
              if marker is not None else item.get_closest_marker("gpu") is not None)
    return (wanted and "mlc_gpu_lock" not in getattr(item, "fixturenames", ())
            and lock_enabled(item.config))


def device_of(item: pytest.Item) -> Device | None:
    """The device ``item`` runs on (its ``mlc_device``, or its model's), else None."""
    funcargs: dict[str, Any] = getattr(item, "funcargs", {})
    value = funcargs.get("mlc_device")
    if isinstance(value, str):
        with contextlib.suppress(MlcJitError):
            value = Device.parse(value)
    if isinstance(value, Device):
        return value
    device = getattr(funcargs.get("compiled_model"), "device", None)
    return device if isinstance(device, Device) else None


@contextlib.contextmanager
def holding(config: pytest.Config, device: Device | None, test: str) -> Iterator[GpuLock]:
    """Hold ``device``'s GPU lock for the block, the wait shown on the run's board and
    both durations counted in its statistics."""
    try:
        lock_path(device)  # the directory made, or why it cannot be, before the test runs
    except MlcJitError as exc:
        pytest.fail(f"GPU lock: {exc}", pytrace=False)
    state = run_state(config)
    engine = state.engine
    owner = {"worker": state.worker, "run_id": state.options.run_id, "test": test}

    def waiting(lock: GpuLock) -> contextlib.AbstractContextManager[Any]:
        name = str(device) if device is not None and device.is_gpu else "gpu"
        return engine.board.doing("gpu", model=name, target=str(lock.path),
                                  digest="", root=str(lock.path))

    start = time.monotonic()
    with gpu_lock(device, owner=owner, waiting=waiting) as lock, _tvm_sees_it_held(lock):
        outermost, taken = lock.depth == 1, time.monotonic()
        try:
            yield lock
        finally:
            if outermost:
                engine.stats.gpu_wait_seconds += taken - start
                engine.stats.gpu_hold_seconds += time.monotonic() - taken


@contextlib.contextmanager
def _tvm_sees_it_held(lock: GpuLock) -> Iterator[None]:
    """While this process holds ``lock``, TVM's ``run_with_gpu_lock`` called in this process
    (a gpu test's body, as TVM's own tests do) runs at once instead of waiting forever for
    ourselves: its ``FileLock`` opens the file again, and a second ``flock`` through another
    open file conflicts with ours even in one process. Only when ``tvm.testing.locking``
    is already imported (it is by any test that uses it); restored afterwards."""
    module: Any = sys.modules.get("tvm.testing.locking")
    original: Any = getattr(module, "FileLock", None)
    if module is None or original is None or getattr(original, "_mlcjit_held", False):
        yield
        return
    held = os.path.realpath(lock.path)

    class HeldHere:
        """TVM's ``FileLock``, except for the file this process holds already."""

        _mlcjit_held = True

        def __init__(self, lock_file_path: str) -> None:
            same = os.path.realpath(lock_file_path) == held
            self._inner = None if same else original(lock_file_path)

        def __enter__(self) -> HeldHere:
            if self._inner is not None:
                self._inner.__enter__()
            return self

        def __exit__(self, *exc: object) -> bool:
            return bool(self._inner.__exit__(*exc)) if self._inner is not None else False

    module.FileLock = HeldHere
    try:
        yield
    finally:
        module.FileLock = original


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    """The call phase of a ``gpu`` test, holding its device's GPU lock."""
    if not wraps_call(item):
        return (yield)
    with holding(item.config, device_of(item), item.nodeid):
        return (yield)


@pytest.fixture
def mlc_gpu_lock(request: pytest.FixtureRequest
                 ) -> Callable[..., contextlib.AbstractContextManager[Any]]:
    """``with mlc_gpu_lock():`` holds the GPU lock of this test's device (or of
    ``mlc_gpu_lock(device)``) for the block, when ``--mlc-jit-gpu-lock`` is on (else
    the block runs without it); a test that asks for it is not wrapped whole."""
    default: Device | None = None
    if "mlc_device" in request.fixturenames:
        default = request.getfixturevalue("mlc_device")

    def lock(device: Device | str | None = None) -> contextlib.AbstractContextManager[Any]:
        if not lock_enabled(request.config):
            return contextlib.nullcontext()
        if isinstance(device, str):
            device = Device.parse(device)
        return holding(request.config, device or default, request.node.nodeid)

    return lock
