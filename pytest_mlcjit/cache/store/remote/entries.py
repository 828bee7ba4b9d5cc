"""What a remote holds, as data: the names of its objects, its manifests' rules, and the
entries and objects a listing yields (no I/O here: :mod:`.base` reads and writes)."""

from __future__ import annotations

import re
from collections.abc import Generator, Iterator
from typing import Any, NamedTuple

from pytest_mlcjit._util.jsonsafe import MAX_JSON_BYTES
from pytest_mlcjit._util.remote_limits import Deadline
from pytest_mlcjit.cache.layout import DIGEST_RE
from pytest_mlcjit.errors import RemoteConfigError, RemoteIntegrityError, RemoteUnavailableError

#: A manifest is a few hundred bytes; anything far larger is not one.
MAX_MANIFEST_BYTES = MAX_JSON_BYTES
#: The largest library a remote manifest may name (1 PiB: anything larger is junk, and a
#: size is used in arithmetic, as the download's deadline).
MAX_LIBRARY_BYTES = 1 << 50

CHUNK = 1 << 20


#: An object's bytes, in chunks: a generator, closed when the reader stops early.
Chunks = Generator[bytes, None, None]


SHA256_RE = re.compile(r"[0-9a-f]{64}")


ENTRY_NAME_RE = re.compile(r"entries/([0-9a-f]{32}|[0-9a-f]{64})/"
                            r"([0-9a-f]{32}|[0-9a-f]{64})\.json")


BLOB_NAME_RE = re.compile(r"blobs/([0-9a-f]{64})")


def manifest_problem(manifest: Any, key_digest: str | None,
                      entry_digest: str | None = None) -> str | None:
    """Why ``manifest`` is not a usable manifest (of ``key_digest`` and ``entry_digest``,
    if given), or None.

    The manifest must name its key (``key_digest``, else ``digest``) and, with a
    ``key_digest``, its entry (``digest``): that binds a signature to both, so a signed
    manifest copied under another key or entry is refused."""
    if not isinstance(manifest, dict):
        return "is not a JSON object"
    sha, size = manifest.get("sha256"), manifest.get("size")
    if not isinstance(sha, str) or not SHA256_RE.fullmatch(sha):
        return f"has an invalid sha256 {sha!r} (expected 64 lowercase hex digits)"
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= MAX_LIBRARY_BYTES:
        return (f"has an invalid size {str(size)[:40]} (expected an integer from 0 to "
                f"{MAX_LIBRARY_BYTES})")
    digest = manifest.get("digest")
    named_key = manifest.get("key_digest", digest)
    if key_digest is not None and named_key != key_digest:
        return f"is for key {named_key!r}, not {key_digest}"
    if entry_digest is not None and "key_digest" in manifest and digest != entry_digest:
        return f"is for entry {digest!r}, not {entry_digest}"
    return None


def check_digest(digest: str, what: str) -> str:
    if not isinstance(digest, str) or not DIGEST_RE.fullmatch(digest):
        raise RemoteConfigError(f"invalid {what} {digest!r}: expected 32 or 64 lowercase hex "
                                "digits")
    return digest


class RemoteEntry(NamedTuple):
    """One manifest found on a remote, usable or not.

    ``problem`` is None for a usable entry; otherwise it says why the entry must not be
    used (unreadable JSON, bad fields, missing or invalid signature, or, from
    :meth:`Remote.verify`, a bad blob), and ``manifest`` holds what could be parsed.
    """

    key_digest: str
    entry_digest: str
    location: str  #: the manifest object's URL (redacted)
    manifest: dict[str, Any] | None
    problem: str | None
    modified: float | None  #: when the store last wrote the manifest object (epoch seconds)

    @property
    def usable(self) -> bool:
        return self.problem is None

    @property
    def created(self) -> float | None:
        """The manifest's ``created`` time if it has a number there, else ``modified``."""
        created = (self.manifest or {}).get("created")
        if isinstance(created, (int, float)) and not isinstance(created, bool):
            return float(created)
        return self.modified


class StoredObject(NamedTuple):
    """An object as a store lists it: its name under the remote's root, size, mtime."""

    name: str
    size: int
    modified: float


def read_limited(chunks: Iterator[bytes], where: str, deadline: Deadline | None = None
                 ) -> bytes:
    data = bytearray()
    for chunk in chunks:
        if deadline is not None and deadline.passed():
            raise RemoteUnavailableError(f"{where}: deadline")  # worded by Remote.within
        data += chunk
        if len(data) > MAX_MANIFEST_BYTES:
            raise RemoteIntegrityError(f"{where} is larger than {MAX_MANIFEST_BYTES} bytes: "
                                       "not a manifest")
    return bytes(data)
