"""How the engine and the CLI reach the remote tier: its options from the settings."""

from __future__ import annotations

from pytest_mlcjit.cache.store.remote import RemoteOptions
from pytest_mlcjit.cache.store.remote.signing import signing_key_from_env
from pytest_mlcjit.engine.activity import default_board
from pytest_mlcjit.engine.settings import Settings

#: How many times botocore retries a failed remote request (throttling, 5xx).
REMOTE_RETRIES = 2


def remote_options(settings: Settings) -> RemoteOptions:
    """How a run or the CLI reaches the remote (signing key, timeouts, the run's board)."""
    return RemoteOptions(signing_key_from_env(), settings.remote_connect_timeout,
                         settings.remote_read_timeout, REMOTE_RETRIES, None, settings.run_id,
                         default_board() if settings.remote else None,
                         settings.remote_deadline, settings.remote_min_throughput)
