"""How the engine and the CLI reach the remote tier: its options from the settings, the keys
from the environment, and the run header's line on whether remote entries are verified.

The option table (:mod:`.settings`) imports this module for its parsers: it stays cheap to
import (the cache's remote package is imported where it is used)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pytest_mlcjit.cache.store.interface import EntryQuery
    from pytest_mlcjit.cache.store.remote import RemoteOptions
    from pytest_mlcjit.engine.activity import Board
    from pytest_mlcjit.engine.settings import Settings

#: How many times botocore retries a failed remote request (throttling, 5xx).
REMOTE_RETRIES = 2

_ENV_SIGNING_KEY = "MLC_JIT_REMOTE_SIGNING_KEY"
_ENV_TRUSTED_KEYS = "MLC_JIT_REMOTE_TRUSTED_KEYS"


def signing_key_kind(source: str, text: str) -> str:
    """The option table's parser of ``MLC_JIT_REMOTE_SIGNING_KEY``: what it holds, never
    the secret (``ed25519:<key id>`` or ``hmac-sha256``); RemoteConfigError naming the
    variable for a bad or empty value. The engine reads the key itself from the
    environment (:func:`remote_options`)."""
    from pytest_mlcjit.cache.store.remote.signing import (  # noqa: PLC0415 - cheap import
        describe_signing_key,
    )

    return describe_signing_key(source, text)


def trusted_key_ids(source: str, text: str) -> tuple[str, ...]:
    """The option table's parser of ``MLC_JIT_REMOTE_TRUSTED_KEYS``: the key ids of its
    Ed25519 public keys; RemoteConfigError naming the variable for a bad or empty value."""
    from pytest_mlcjit.cache.store.remote import signing  # noqa: PLC0415 - cheap import

    return signing.trusted_key_ids(source, text)


def remote_mode(settings: Settings) -> str:
    """The remote mode a run uses: the option's, except that a job which verifies with
    trusted Ed25519 keys but holds no signing key only reads: every entry it could upload
    would be unsigned, refused by each reader that verifies (its own later runs included).
    The run header says so (:func:`trust_line`)."""
    if (settings.remote_mode == "readwrite" and settings.remote_trusted_keys
            and settings.remote_signing_key is None):
        return "read"
    return settings.remote_mode


def remote_options(settings: Settings) -> RemoteOptions:
    """How a run or the CLI reaches the remote: the keys of ``MLC_JIT_REMOTE_SIGNING_KEY``
    and ``MLC_JIT_REMOTE_TRUSTED_KEYS`` (RemoteConfigError for a bad or set-but-empty
    value), the timeouts and the run's board."""
    from pytest_mlcjit.cache.store.remote import RemoteOptions  # noqa: PLC0415
    from pytest_mlcjit.cache.store.remote.signing import keys_from_env  # noqa: PLC0415
    from pytest_mlcjit.engine.activity import default_board  # noqa: PLC0415

    hmac_key, ed25519_key, trusted = keys_from_env()
    return RemoteOptions(hmac_key, settings.remote_connect_timeout,
                         settings.remote_read_timeout, REMOTE_RETRIES, None, settings.run_id,
                         default_board() if settings.remote else None,
                         settings.remote_deadline, settings.remote_min_throughput,
                         ed25519_key=ed25519_key, trusted_keys=trusted)


def trust_line(settings: Settings) -> str | None:
    """The run header's line on the remote's signatures (None without a remote): whether
    what it downloads is verified, with which keys, and what its uploads are signed with.
    A run that does not verify says so, with the fix."""
    if settings.remote is None:
        return None
    from pytest_mlcjit.cache.store.remote import redact_url  # noqa: PLC0415

    url = redact_url(settings.remote)
    signer = settings.remote_signing_key
    trusted = list(settings.remote_trusted_keys)
    if signer is not None and signer.startswith("ed25519:"):
        trusted.append(signer.removeprefix("ed25519:"))
    if signer is None and not trusted:
        return (f"mlcjit: remote {url}: entries are NOT verified: anyone who can write to it "
                "can make this run load their code; set {0} to the public keys of the "
                "trusted writers (or {1} on a trusted writer)".format(_ENV_TRUSTED_KEYS,
                                                                       _ENV_SIGNING_KEY))
    by = []
    if trusted:
        by.append(f"Ed25519 key{'s' if len(set(trusted)) > 1 else ''} "
                  f"{', '.join(sorted(set(trusted)))}")
    if signer == "hmac-sha256":
        by.append("the HMAC secret")
    if signer is None:  # verifies, cannot sign: read only (remote_mode)
        uploads = (f"no uploads: this job holds no signing key ({_ENV_SIGNING_KEY}), and "
                   "readers that verify refuse unsigned entries")
    else:
        uploads = ("uploads signed with "
                   f"{'the HMAC secret' if signer == 'hmac-sha256' else 'key ' + signer}")
    return f"mlcjit: remote {url}: entries verified with {' or '.join(by)}; {uploads}"


def upload_job(board: Board) -> Callable[[str, EntryQuery, str],
                                         contextlib.AbstractContextManager[Any]]:
    """Announces the remote tier's uploads on the run's ``board``, unshown by the live
    display (:meth:`~.activity.Board.unshown`: the trace, ``--mlc-jit-trace``, has them)."""
    from pytest_mlcjit.engine.activity import describe_spec, describe_target  # noqa: PLC0415

    def announce(kind: str, query: EntryQuery, where: str
                 ) -> contextlib.AbstractContextManager[Any]:
        req = getattr(query, "req", None)
        model = describe_spec(req.spec, req.describe) if req is not None else query.describe
        target = describe_target(req.target) if req is not None else ""
        return board.unshown(kind, model=model, target=target, digest=query.digest,
                             root=where)

    return announce
