"""What a remote holds, as data: the names of its objects, its manifests' rules, and the
entries and objects a listing yields (no I/O here: :mod:`.base` reads and writes)."""

from __future__ import annotations

import contextlib
import json
import math
import re
import time
from collections.abc import Generator, Iterator, Mapping
from typing import Any, NamedTuple

from pytest_mlcjit._util.jsonsafe import MAX_JSON_BYTES, loads_bounded
from pytest_mlcjit._util.remote_limits import Deadline
from pytest_mlcjit.cache.layout import DIGEST_RE
from pytest_mlcjit.cache.store.remote.signing import SIGNATURE_FIELD, ManifestKeys
from pytest_mlcjit.errors import (
    RemoteConfigError,
    RemoteError,
    RemoteIntegrityError,
    RemoteUnavailableError,
)

#: A manifest is a few hundred bytes; anything far larger is not one.
MAX_MANIFEST_BYTES = MAX_JSON_BYTES
#: The largest library a remote manifest may name (1 PiB: anything larger is junk, and a
#: size is used in arithmetic, as the download's deadline).
MAX_LIBRARY_BYTES = 1 << 50

CHUNK = 1 << 20


#: An object's bytes, in chunks: a generator, closed when the reader stops early.
Chunks = Generator[bytes, None, None]


SHA256_RE = re.compile(r"[0-9a-f]{64}")


#: A manifest's name: ``entries/<key>/<entry>.json`` (generation 0) or
#: ``entries/<key>/<entry>.<generation>.json`` (a REDO's: :func:`entry_name`); the groups
#: are the key and entry digests (the generation: :func:`name_generation`).
ENTRY_NAME_RE = re.compile(r"entries/([0-9a-f]{32}|[0-9a-f]{64})/"
                            r"([0-9a-f]{32}|[0-9a-f]{64})(?:\.[1-9][0-9]{0,17})?\.json")
_GENERATION_RE = re.compile(r"\.([1-9][0-9]{0,17})\.json\Z")

#: The signed field of a manifest that a REDO published: its generation (absent: 0).
GENERATION_FIELD = "generation"
#: The highest generation a name may carry (18 digits).
MAX_GENERATION = 10**18 - 1

#: Where :meth:`.base.Remote.quarantine` moves a refused entry's manifest.
QUARANTINE_PREFIX = "quarantine/"


BLOB_NAME_RE = re.compile(r"blobs/([0-9a-f]{64})")


def entry_name(key_digest: str, entry_digest: str, generation: int = 0) -> str:
    """The object name of generation ``generation`` of an entry's manifest."""
    tail = f".{generation}" if generation else ""
    return f"entries/{key_digest}/{entry_digest}{tail}.json"


def name_generation(name: str) -> int:
    """The generation of the manifest named ``name`` (one :data:`ENTRY_NAME_RE` matches)."""
    match = _GENERATION_RE.search(name)
    return int(match.group(1)) if match else 0


def manifest_problem(manifest: Any, key_digest: str | None,
                      entry_digest: str | None = None, generation: int | None = None
                      ) -> str | None:
    """Why ``manifest`` is not a usable manifest (of ``key_digest`` and ``entry_digest``,
    and stored as ``generation``, if given), or None.

    The manifest must name its key (``key_digest``, else ``digest``) and, with a
    ``key_digest``, its entry (``digest``): that binds a signature to both, so a signed
    manifest copied under another key or entry is refused. A signed manifest states its
    generation (``generation``, absent for 0), so one moved to another generation's name
    is refused; an unsigned one is of the generation its name says."""
    if not isinstance(manifest, dict):
        return "is not a JSON object"
    sha, size = manifest.get("sha256"), manifest.get("size")
    if not isinstance(sha, str) or not SHA256_RE.fullmatch(sha):
        return f"has an invalid sha256 {shown(sha)} (expected 64 lowercase hex digits)"
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= MAX_LIBRARY_BYTES:
        return (f"has an invalid size {shown(size)} (expected an integer from 0 to "
                f"{MAX_LIBRARY_BYTES})")
    digest = manifest.get("digest")
    named_key = manifest.get("key_digest", digest)
    if key_digest is not None and named_key != key_digest:
        return f"is for key {shown(named_key)}, not {key_digest}"
    if entry_digest is not None and "key_digest" in manifest and digest != entry_digest:
        return f"is for entry {shown(digest)}, not {entry_digest}"
    return None if generation is None else _generation_problem(manifest, generation)


def _generation_problem(manifest: dict[str, Any], generation: int) -> str | None:
    stated = manifest.get(GENERATION_FIELD, 0 if SIGNATURE_FIELD in manifest else generation)
    if stated != generation or isinstance(stated, bool):
        return (f"states generation {shown(stated)}, but is stored as generation "
                f"{generation} (an older manifest put back under a newer name?)")
    return None


def shown(value: Any) -> str:
    """A value a manifest holds, as a message quotes it: escaped (``ascii``: a lone
    surrogate is valid JSON but no text a terminal can print) and cut short."""
    text = ascii(value)
    return text if len(text) <= 100 else text[:96] + "..."


def manifest_data(manifest: Mapping[str, Any], generation: int, keys: ManifestKeys,
                  library: object) -> bytes:
    """The bytes of the manifest an upload of ``library`` publishes: ``manifest`` with
    the ``generation`` (when ``keys`` sign) and the signature of ``keys``, as JSON;
    RemoteError when it is not JSON or too large."""
    body = {k: v for k, v in manifest.items() if k not in (SIGNATURE_FIELD, GENERATION_FIELD)}
    if generation and keys.signs:
        body[GENERATION_FIELD] = generation
    try:
        if (signature := keys.sign(body)) is not None:
            body[SIGNATURE_FIELD] = signature
        data = (json.dumps(body, indent=1, sort_keys=True, ensure_ascii=False,
                           allow_nan=False) + "\n").encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise RemoteError(f"refusing to upload {library}: its manifest is not JSON "
                          f"({exc})") from None
    if len(data) > MAX_MANIFEST_BYTES:
        raise RemoteError(f"refusing to upload {library}: its manifest has {len(data)} "
                          f"bytes, more than {MAX_MANIFEST_BYTES}")
    return data


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
    #: Which publication of the entry this is: 0, then one more for each REDO (signed).
    generation: int = 0

    @property
    def usable(self) -> bool:
        return self.problem is None

    @property
    def name(self) -> str:
        """The manifest object's name under the remote's root (to delete or move it)."""
        return entry_name(self.key_digest, self.entry_digest, self.generation)

    @property
    def created(self) -> float | None:
        """The manifest's ``created`` time if it has a number there, else ``modified``."""
        created = (self.manifest or {}).get("created")
        if isinstance(created, (int, float)) and not isinstance(created, bool):
            with contextlib.suppress(OverflowError):  # 10**400: valid JSON, no float
                if math.isfinite(created := float(created)):
                    return created
        return self.modified


class StoredObject(NamedTuple):
    """An object as a store lists it: its name under the remote's root, size, mtime."""

    name: str
    size: int
    modified: float


def superseding(entries: list[RemoteEntry]) -> list[int | None]:
    """For each of ``entries``, the newer generation that supersedes it, or None: a usable
    entry is superseded by a usable one of a newer generation of the same key and entry
    digest, and a reader never prefers it (an old signed manifest put back after a REDO)."""
    newest: dict[tuple[str, str], int] = {}
    for e in entries:
        if e.usable:
            ident = (e.key_digest, e.entry_digest)
            newest[ident] = max(newest.get(ident, 0), e.generation)
    return [newest[e.key_digest, e.entry_digest]
            if e.usable and e.generation < newest[e.key_digest, e.entry_digest] else None
            for e in entries]


def mark_superseded(batch: list[RemoteEntry]) -> Iterator[RemoteEntry]:
    """``batch`` (entries of one key), each superseded generation with a problem."""
    for entry, newer in zip(batch, superseding(batch), strict=True):
        yield entry if newer is None else entry._replace(
            problem=f"manifest {entry.location} is superseded by generation {newer} of its "
                    "entry (a REDO published it); it is never used")


#: How much of a quarantined manifest's text its record keeps.
QUARANTINE_KEPT = 64 * 1024


def quarantine_record(entry: RemoteEntry, raw: bytes | None, why: str) -> bytes:
    """The quarantine record of ``entry`` (its manifest's bytes ``raw``, None if gone)."""
    text = None if raw is None else raw.decode("utf-8", "replace")
    record = {"entry": entry.location, "generation": entry.generation, "why": why,
              "time": time.time(),
              "manifest": text if text is None else text[:QUARANTINE_KEPT],
              "truncated": text is not None and len(text) > QUARANTINE_KEPT}
    return json.dumps(record, indent=1, sort_keys=True).encode("utf-8")


def same_manifest(raw: bytes, manifest: dict[str, Any] | None) -> bool:
    """Whether ``raw`` (a manifest's bytes, read again) holds ``manifest`` (as read
    before; None: it held no JSON object)."""
    try:
        again = loads_bounded(raw, max_bytes=MAX_MANIFEST_BYTES)
    except ValueError:
        again = None
    again = again if isinstance(again, dict) else None
    return json.dumps(again, sort_keys=True) == json.dumps(manifest, sort_keys=True)


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
