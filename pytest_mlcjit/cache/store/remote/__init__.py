"""Remotes: content-addressed stores of libraries shared between machines.

A remote is an S3 bucket (``s3://BUCKET[/PREFIX]``, needs the ``remote`` extra: boto3) or a
directory (``file:///ABSOLUTE/PATH``, e.g. a shared mount): two *adapters* of one interface,
:class:`.base.Remote`, which implements everything once over a few storage primitives
(list, stream, put, delete). A new kind of remote is one module with a ``Remote``
subclass and one line in :data:`ADAPTERS`. Every remote holds the same layout under its
root::

    blobs/<sha256>                          a library's bytes, named by their SHA-256
    entries/<key_digest>/<entry_digest>.json  a manifest (JSON), written last, create-only
    entries/<key_digest>/<entry_digest>.<N>.json  generation N of it (a signed REDO)
    quarantine/<key_digest>/<entry_digest>.json  a refused entry's manifest, moved aside

A key may have several entries (variants). A manifest is the dict given to
:meth:`Remote.upload` (the local cache's: ``digest`` equal to the key digest, ``sha256``,
``size``, and optionally ``created``), stored as JSON, plus a ``signature`` when the writer
has a signing key, over the canonical JSON of the manifest without it (:mod:`.signing`):
``ed25519:<key id>:<base64>`` (an Ed25519 private key; readers verify with public keys) or
``hmac-sha256:<hex>`` (a shared secret). A REDO by a signing writer publishes generation
N+1 (the signed field ``generation``) and removes the older ones; a reader never prefers a
generation a newer valid one supersedes, so an old signed manifest put back is not used.

Guarantees:

- Publishing uploads the blob first and the manifest last, with a create-only write (S3
  ``If-None-Match: *``; a hard link for directories): a reader sees no entry or a whole
  one, and of concurrent publishers of one entry exactly one wins.
- :meth:`Remote.download` checks size and SHA-256 against the manifest before it returns;
  on any failure the partial file is deleted. Nothing the remote sends is trusted.
- With a signing key or trusted keys (:attr:`Remote.verifies`), manifests without a valid
  signature are reported, never used: write access to the bucket is not enough to make a
  reader load a library. A signing writer is never blocked by an object it would refuse
  to read (a squatter at its entry's name is replaced), and a blob counts as present only
  with a verified digest (a same-size object planted at ``blobs/<sha256>`` is overwritten).
- Every operation has a total deadline besides the per-request timeouts
  (:meth:`Remote.within`: ``deadline + size / min_throughput`` seconds): a server that
  trickles bytes is given up, its connection closed. A manifest that is junk (not JSON,
  too large, nested too deep) is an entry with a problem, never an exception.
- Failures are distinct errors, never a silent miss: :class:`RemoteUnavailableError`
  (network, timeouts, throttling, 5xx), :class:`RemoteAuthError` (refused credentials),
  :class:`RemoteIntegrityError` (bad bytes or signature), :class:`RemoteConfigError` (bad
  URL, missing bucket or extra). Messages show URLs with any credentials redacted.

boto3 is imported on first use of an S3 remote, never when this package is imported.
"""


from __future__ import annotations

import dataclasses
import importlib
import urllib.parse
from typing import Any, NamedTuple

from pytest_mlcjit._util import remote_limits
from pytest_mlcjit.cache.store.remote.base import Remote, RemoteOptions
from pytest_mlcjit.cache.store.remote.url import RemoteURL, redact_url
from pytest_mlcjit.errors import BadURL, RemoteConfigError


class Adapter(NamedTuple):
    """A kind of remote: the class that serves it (``module:Class``, imported on first
    use) and its URL's form, for messages."""

    cls: str
    form: str


#: URL scheme -> its adapter. A new kind of remote is a new module and one line here.
ADAPTERS: dict[str, Adapter] = {
    "s3": Adapter("pytest_mlcjit.cache.store.remote.s3:S3Remote", "s3://BUCKET[/PREFIX]"),
    "file": Adapter("pytest_mlcjit.cache.store.remote.file:FileRemote",
                    "file:///ABSOLUTE/PATH"),
    "az": Adapter("pytest_mlcjit.cache.store.remote.azure:AzureRemote",
                  "az://CONTAINER[/PREFIX]"),
    "gha": Adapter("pytest_mlcjit.cache.store.remote.gha:GHARemote", "gha://[SCOPE]"),
}


def _bad_url(url: str, why: str) -> RemoteConfigError:
    forms = " or ".join(a.form for a in ADAPTERS.values())
    return RemoteConfigError(f"invalid remote cache URL {redact_url(url)!r}: {why}; expected "
                             f"{forms}")


def adapter_class(scheme: str) -> type[Remote]:
    """The :class:`Remote` subclass that serves ``scheme``."""
    module, _, name = ADAPTERS[scheme].cls.partition(":")
    cls: type[Remote] = getattr(importlib.import_module(module), name)
    return cls


def parse_remote_url(url: str) -> RemoteURL:
    """Parse a remote URL of one of the :data:`ADAPTERS`' forms; RemoteConfigError (naming
    the value, credentials redacted, and the valid forms) for anything else."""
    if not isinstance(url, str) or not url.strip():
        raise _bad_url(str(url), "it is empty")
    if any(ch.isspace() or ord(ch) < 32 or ch == "\x7f" for ch in url):
        raise _bad_url(url, "it contains whitespace or control characters")
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as exc:
        raise _bad_url(url, str(exc)) from None
    scheme = parts.scheme.lower()
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        raise _bad_url(url, "it has a query or fragment")
    if scheme not in ADAPTERS:
        raise _bad_url(url, f"unsupported scheme {parts.scheme!r}" if scheme else "no scheme")
    try:
        return adapter_class(scheme).parse_url(parts)
    except BadURL as exc:
        raise _bad_url(url, str(exc)) from None


def open_remote(url: str, options: RemoteOptions | None = None, **fields: Any) -> Remote:
    """The remote at ``url``, reached with ``options`` (or :class:`RemoteOptions` made of
    ``fields``). Opening touches no network (a missing bucket shows on first use) but
    fails fast, with RemoteConfigError, on a bad URL or option, a missing directory, or a
    client library that is not installed."""
    options = dataclasses.replace(options or RemoteOptions(), **fields)
    remote_url = parse_remote_url(url)
    key = options.signing_key
    if key is not None and (not isinstance(key, bytes) or not key):
        raise RemoteConfigError("invalid remote signing key: expected non-empty bytes (an "
                                "empty key signs nothing; check the variable that holds it)")
    if key is not None and options.ed25519_key is not None:
        raise RemoteConfigError("invalid remote signing keys: an HMAC key and an Ed25519 key "
                                "are both set; uploads are signed with one")
    for name, raw in [("ed25519_key", options.ed25519_key),
                      *(("trusted_keys", k) for k in _keys_of(options.trusted_keys))]:
        if raw is not None and (not isinstance(raw, bytes) or len(raw) != 32):
            raise RemoteConfigError(f"invalid remote {name}: expected raw 32-byte Ed25519 "
                                    "keys (bytes)")
    for name in ("connect_timeout", "read_timeout"):
        value = getattr(options, name)
        if isinstance(value, bool) or not isinstance(value, int | float) or not (
                0 < value <= remote_limits.MAX_TIMEOUT_S):
            raise RemoteConfigError(f"invalid remote {name} {value!r}: expected a number of "
                                    "seconds greater than 0 and at most "
                                    f"{remote_limits.MAX_TIMEOUT_S:g}")
    retries = options.retries
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise RemoteConfigError(f"invalid remote retries {retries!r}: expected an integer >= 0")
    return adapter_class(remote_url.scheme)(remote_url, options)


def _keys_of(trusted: Any) -> tuple[Any, ...]:
    if not isinstance(trusted, tuple | list):
        raise RemoteConfigError("invalid remote trusted_keys: expected a tuple of raw 32-byte "
                                "Ed25519 public keys")
    return tuple(trusted)


__all__ = ["ADAPTERS", "Adapter", "Remote", "RemoteOptions", "RemoteURL", "open_remote",
           "parse_remote_url", "redact_url"]
