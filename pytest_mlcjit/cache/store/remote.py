"""The remote tier: a content-addressed store of libraries shared between machines.

A remote is an S3 bucket (``s3://BUCKET[/PREFIX]``, needs the ``remote`` extra: boto3) or a
directory (``file:///ABSOLUTE/PATH``, e.g. a shared mount). Both hold the same layout under
their root::

    blobs/<sha256>                          a library's bytes, named by their SHA-256
    entries/<key_digest>/<entry_digest>.json  a manifest (JSON), written last, create-only

A key may have several entries (variants). A manifest is the dict given to
:meth:`Remote.upload` (the local cache's: ``digest`` equal to the key digest, ``sha256``,
``size``, and optionally ``created``), stored as JSON, plus ``"signature":
"hmac-sha256:<hex>"`` when the writer has a signing key: HMAC-SHA256 over the canonical JSON
of the manifest without its ``signature`` field (:func:`manifest_signature`).

Guarantees:

- Publishing uploads the blob first and the manifest last, with a create-only write (S3
  ``If-None-Match: *``; a hard link for directories): a reader sees no entry or a whole
  one, and of concurrent publishers of one entry exactly one wins.
- :meth:`Remote.download` checks size and SHA-256 against the manifest before it returns;
  on any failure the partial file is deleted. Nothing the remote sends is trusted.
- With a signing key, manifests without a valid signature are reported, never used: write
  access to the bucket is not enough to make a reader load a library.
- Failures are distinct errors, never a silent miss: :class:`RemoteUnavailableError`
  (network, timeouts, throttling, 5xx), :class:`RemoteAuthError` (refused credentials),
  :class:`RemoteIntegrityError` (bad bytes or signature), :class:`RemoteConfigError` (bad
  URL, missing bucket or extra). Messages show URLs with any credentials redacted.

boto3 is imported on first use of an S3 remote, never when this module is imported.
"""

from __future__ import annotations

import abc
import contextlib
import errno
import json
import math
import os
import re
import time
import urllib.parse
from collections.abc import Generator, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

from pytest_mlcjit.errors import ConfigError, MlcJitError
from pytest_mlcjit._util.fs import FILE_MODE, write_temp

#: How to install what an S3 remote needs.
EXTRA_HINT = 'pip install "pytest-mlcjit[remote]"'


def require_boto3() -> None:
    """RemoteConfigError naming the extra unless boto3 is importable (checked without
    importing it)."""
    import importlib.util

    if importlib.util.find_spec("boto3") is None:
        raise RemoteConfigError(f"an s3:// remote needs boto3, which is not installed: "
                                f"{EXTRA_HINT}")
SIGNATURE_FIELD = "signature"
SIGNATURE_SCHEME = "hmac-sha256:"
#: A manifest is a few hundred bytes; anything far larger is not one.
MAX_MANIFEST_BYTES = 1 << 20
_CHUNK = 1 << 20

#: An object's bytes, in chunks: a generator, closed when the reader stops early.
Chunks = Generator[bytes, None, None]

_HEX_DIGEST_RE = re.compile(r"[0-9a-f]{32}|[0-9a-f]{64}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_ENTRY_NAME_RE = re.compile(r"entries/([0-9a-f]{32}|[0-9a-f]{64})/"
                            r"([0-9a-f]{32}|[0-9a-f]{64})\.json")
_BLOB_NAME_RE = re.compile(r"blobs/([0-9a-f]{64})")
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_USERINFO_RE = re.compile(r"(?<=//)[^/@\s\"']*@")
_SECRET_QUERY_RE = re.compile(
    r"((?:X-Amz-(?:Signature|Credential|Security-Token)|Signature|AWSAccessKeyId)=)[^&\s\"']*",
    re.IGNORECASE,
)

_AUTH_CODES = frozenset({
    "AccessDenied", "AllAccessDisabled", "AuthorizationHeaderMalformed", "ExpiredToken",
    "InvalidAccessKeyId", "InvalidToken", "SignatureDoesNotMatch", "TokenRefreshRequired",
    "RequestTimeTooSkewed", "401", "403",
})
_UNAVAILABLE_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded",
    "TooManyRequests", "TooManyRequestsException", "ServiceUnavailable", "InternalError",
    "RequestTimeout", "503", "500", "429",
})
_DIGEST_MISMATCH_CODES = frozenset({"BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch"})
#: A create-only put that lost: the object exists (412) or another write to it is running (409).
_LOST_RACE_CODES = frozenset({"PreconditionFailed", "ConditionalRequestConflict", "412", "409"})


# -- errors ---------------------------------------------------------------------------------
class RemoteError(MlcJitError):
    """A remote cache operation failed (base class of the remote errors)."""


class RemoteUnavailableError(RemoteError):
    """The remote could not be reached or did not answer in time: connection refused,
    timeouts, throttling (429, 503 SlowDown) or a server error (5xx), after retries."""


class RemoteAuthError(RemoteError):
    """The remote refused the credentials (401/403, invalid or expired keys, access denied).
    Never a cache miss: the configuration is wrong and must be fixed."""


class RemoteIntegrityError(RemoteError):
    """Bytes or a manifest from the remote do not match what they claim: wrong size or
    SHA-256, a missing blob, or a missing or invalid signature."""


class RemoteConfigError(RemoteError, ConfigError):
    """The remote is misconfigured: a malformed URL, a bucket or directory that does not
    exist, or the ``remote`` extra (boto3) is not installed."""


# -- URLs -----------------------------------------------------------------------------------
def redact_url(text: str) -> str:
    """``text`` with any ``user:password@`` of a URL and signed query values replaced by
    ``***``, for messages and logs."""
    return _SECRET_QUERY_RE.sub(r"\1***", _USERINFO_RE.sub("***@", text))


class RemoteURL(NamedTuple):
    """A parsed remote location (see :func:`parse_remote_url`)."""

    scheme: str  #: ``"s3"`` or ``"file"``
    bucket: str  #: the S3 bucket ("" for ``file``)
    prefix: str  #: the S3 key prefix, "" or ending in "/" ("" for ``file``)
    path: str  #: the absolute directory of a ``file`` remote ("" for ``s3``)

    @property
    def redacted(self) -> str:
        """The URL in canonical form; it never holds credentials (parsing refuses them)."""
        if self.scheme == "s3":
            return f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        return "file://" + urllib.parse.quote(self.path)


def _bad_url(url: str, why: str) -> RemoteConfigError:
    return RemoteConfigError(
        f"invalid remote cache URL {redact_url(url)!r}: {why}; expected s3://BUCKET[/PREFIX] "
        "or file:///ABSOLUTE/PATH"
    )


def parse_remote_url(url: str) -> RemoteURL:
    """Parse ``s3://bucket[/prefix]`` or ``file:///absolute/path``; RemoteConfigError (naming
    the value, credentials redacted) for anything else."""
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
    if scheme == "s3":
        if "@" in parts.netloc:
            raise _bad_url(url, "credentials do not belong in the URL (use the AWS_* "
                                "environment variables or a profile)")
        if not _BUCKET_RE.fullmatch(parts.netloc) or ".." in parts.netloc:
            raise _bad_url(url, f"{parts.netloc!r} is not a valid bucket name (3 to 63 "
                                "characters: lowercase letters, digits, '.' and '-')")
        segments = [s for s in parts.path.split("/") if s]
        if "//" in parts.path.strip("/") or any(s in (".", "..") for s in segments):
            raise _bad_url(url, "its prefix has empty, '.' or '..' segments")
        prefix = "".join(f"{s}/" for s in segments)
        return RemoteURL("s3", parts.netloc, prefix, "")
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise _bad_url(url, f"a file URL names no host ({parts.netloc!r}); use three "
                                "slashes and an absolute path")
        path = urllib.parse.unquote(parts.path)
        if not path.startswith("/") or "\0" in path:
            raise _bad_url(url, "the path is not absolute")
        return RemoteURL("file", "", "", os.path.normpath(path))
    raise _bad_url(url, f"unsupported scheme {parts.scheme!r}" if scheme else "no scheme")


# -- manifests and signatures ---------------------------------------------------------------
def manifest_signature(manifest: Mapping[str, Any], key: bytes) -> str:
    """``hmac-sha256:<hex>`` over the canonical JSON of ``manifest`` without its signature."""
    import hashlib
    import hmac

    from pytest_mlcjit.key import canonical_json

    body = {k: v for k, v in manifest.items() if k != SIGNATURE_FIELD}
    mac = hmac.new(key, canonical_json(body).encode("utf-8"), hashlib.sha256)
    return SIGNATURE_SCHEME + mac.hexdigest()


def signature_problem(manifest: Mapping[str, Any], key: bytes) -> str | None:
    """Why ``manifest`` is not validly signed with ``key``, or None if it is."""
    import hmac

    given = manifest.get(SIGNATURE_FIELD)
    if given is None:
        return "is unsigned, and a signing key is set: only signed manifests are trusted"
    if not isinstance(given, str) or not given.startswith(SIGNATURE_SCHEME):
        return f"has a malformed signature (expected {SIGNATURE_SCHEME}<hex>)"
    try:
        expected = manifest_signature(manifest, key)
    except ValueError:  # not JSON-able (NaN): it cannot have been signed
        return "cannot be signed (not canonical JSON)"
    if not hmac.compare_digest(given.encode(), expected.encode()):
        return "has a signature that does not match its content and the signing key"
    return None


def _manifest_problem(manifest: Any, key_digest: str | None,
                      entry_digest: str | None = None) -> str | None:
    """Why ``manifest`` is not a usable manifest (of ``key_digest`` and ``entry_digest``,
    if given), or None.

    The manifest must name its key (``key_digest``, else ``digest``) and, with a
    ``key_digest``, its entry (``digest``): that binds a signature to both, so a signed
    manifest copied under another key or entry is refused."""
    if not isinstance(manifest, dict):
        return "is not a JSON object"
    sha, size = manifest.get("sha256"), manifest.get("size")
    if not isinstance(sha, str) or not _SHA256_RE.fullmatch(sha):
        return f"has an invalid sha256 {sha!r} (expected 64 lowercase hex digits)"
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        return f"has an invalid size {size!r} (expected a non-negative integer)"
    digest = manifest.get("digest")
    named_key = manifest.get("key_digest", digest)
    if key_digest is not None and named_key != key_digest:
        return f"is for key {named_key!r}, not {key_digest}"
    if entry_digest is not None and "key_digest" in manifest and digest != entry_digest:
        return f"is for entry {digest!r}, not {entry_digest}"
    return None


def _check_digest(digest: str, what: str) -> str:
    if not isinstance(digest, str) or not _HEX_DIGEST_RE.fullmatch(digest):
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


# -- the remote interface -------------------------------------------------------------------
class Remote(abc.ABC):
    """A remote store (see the module docstring for layout and guarantees).

    The public methods are implemented here once, over a few storage primitives that each
    backend provides; backends map their failures to the :class:`RemoteError` classes.
    """

    def __init__(self, url: RemoteURL, signing_key: bytes | None) -> None:
        self.remote_url = url
        self._signing_key = signing_key

    @property
    def url(self) -> str:
        """The remote's URL, safe to show (no credentials)."""
        return self.remote_url.redacted

    @property
    def signed(self) -> bool:
        """Whether uploads are signed and downloads require a valid signature."""
        return self._signing_key is not None

    def describe(self) -> str:
        """A one-line description for messages."""
        return f"remote cache {self.url}"

    # -- reading -------------------------------------------------------------------------
    def list_manifests(self, key_digest: str) -> list[RemoteEntry]:
        """Every manifest stored for ``key_digest``, ordered by entry digest.

        Usable entries have ``problem`` None; the others are returned too, with the reason,
        so that the caller can report them (a manifest that is malformed, is for another
        key or, when a signing key is set, lacks a valid signature). Raises the
        :class:`RemoteError` subclasses for failures of the remote itself.
        """
        _check_digest(key_digest, "cache key digest")
        found = (self._entry(obj) for obj in self._list(f"entries/{key_digest}/"))
        return sorted((e for e in found if e is not None), key=lambda e: e.entry_digest)

    def iter_entries(self) -> Iterator[RemoteEntry]:
        """Every manifest on the remote, usable or not (see :meth:`list_manifests`)."""
        for obj in self._list("entries/"):
            entry = self._entry(obj)
            if entry is not None:
                yield entry

    def download(self, manifest: Mapping[str, Any], dest: Path) -> Path:
        """Fetch the library that ``manifest`` names into ``dest`` (a new file) and return it.

        The bytes are streamed to disk and checked against the manifest's ``size`` and
        ``sha256`` before this returns; with a signing key the manifest's signature is
        checked first. On any failure ``dest`` is removed and RemoteIntegrityError (or the
        transport's RemoteError) is raised. ``dest`` must not exist.
        """
        import hashlib

        sha, size = self._usable_blob(manifest)
        name = f"blobs/{sha}"
        where = self._location(name)
        stream = self._open_stream(name)
        if stream is None:
            raise RemoteIntegrityError(
                f"{where} is missing although a manifest names it; prune or re-publish the "
                "entry (upload with replace=True)"
            )
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        with contextlib.closing(stream):
            fd = os.open(dest, flags, FILE_MODE)
            try:
                h, n = hashlib.sha256(), 0
                with open(fd, "wb") as f:
                    for chunk in stream:
                        n += len(chunk)
                        if n > size:
                            break
                        h.update(chunk)
                        f.write(chunk)
                if n != size or h.hexdigest() != sha:
                    got = (f"more than {size} bytes" if n > size
                           else f"{n} bytes, sha256 {h.hexdigest()}")
                    raise RemoteIntegrityError(
                        f"{where} is corrupt: got {got}; the manifest says {size} bytes, "
                        f"sha256 {sha}. The download was deleted; prune or re-publish the entry"
                    )
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(dest)
                raise
        return dest

    def _usable_blob(self, manifest: Mapping[str, Any]) -> tuple[str, int]:
        problem = _manifest_problem(dict(manifest), None)
        if problem is None and self._signing_key is not None:
            problem = signature_problem(manifest, self._signing_key)
        if problem is not None:
            raise RemoteIntegrityError(f"refusing to download from {self.url}: the manifest "
                                       f"{problem}")
        return manifest["sha256"], manifest["size"]

    # -- writing -------------------------------------------------------------------------
    def upload(self, key_digest: str, entry_digest: str, library: Path,
               manifest: Mapping[str, Any], *, replace: bool = False) -> bool:
        """Publish ``library`` with ``manifest`` as entry ``entry_digest`` of ``key_digest``.

        The manifest's ``digest`` must be ``key_digest`` and the library must match its
        ``size`` and ``sha256`` (else RemoteIntegrityError, nothing uploaded). The blob goes
        first (skipped if the remote already holds it, unless ``replace``), the manifest
        last, signed if a signing key is set. The manifest is created only if absent:
        returns False, changing nothing, when the entry already exists (another job
        published it). ``replace=True`` overwrites the blob and the manifest (a forced
        rebuild) and returns True.
        """
        from pytest_mlcjit.key import file_sha256

        _check_digest(key_digest, "cache key digest")
        _check_digest(entry_digest, "entry digest")
        problem = _manifest_problem(dict(manifest), key_digest, entry_digest)
        if problem is not None:
            raise RemoteIntegrityError(f"refusing to upload {library}: its manifest {problem}")
        sha, size = manifest["sha256"], manifest["size"]
        actual_size, actual_sha = os.stat(library).st_size, file_sha256(library)
        if (actual_size, actual_sha) != (size, sha):
            raise RemoteIntegrityError(
                f"refusing to upload {library}: it has {actual_size} bytes, sha256 "
                f"{actual_sha}; its manifest says {size} bytes, sha256 {sha}"
            )
        body = {k: v for k, v in manifest.items() if k != SIGNATURE_FIELD}
        try:
            if self._signing_key is not None:
                body[SIGNATURE_FIELD] = manifest_signature(body, self._signing_key)
            data = (json.dumps(body, indent=1, sort_keys=True, ensure_ascii=False,
                               allow_nan=False) + "\n").encode("utf-8")
        except (TypeError, ValueError) as exc:
            raise RemoteError(f"refusing to upload {library}: its manifest is not JSON "
                              f"({exc})") from None
        if len(data) > MAX_MANIFEST_BYTES:
            raise RemoteError(f"refusing to upload {library}: its manifest has {len(data)} "
                              f"bytes, more than {MAX_MANIFEST_BYTES}")
        blob = f"blobs/{sha}"
        if replace or not self._blob_present(blob, sha, size):
            self._put_blob(blob, library, sha, size)
        return self._put_manifest(f"entries/{key_digest}/{entry_digest}.json", data,
                                  create_only=not replace)

    # -- maintenance ---------------------------------------------------------------------
    def verify(self) -> list[RemoteEntry]:
        """Check every entry: its manifest (and signature, if a key is set) and its blob's
        bytes (read in full and hashed). Returns the entries with a problem (each blob is
        read once however many entries name it)."""
        bad: list[RemoteEntry] = []
        blobs: dict[tuple[str, int], str | None] = {}
        for entry in self.iter_entries():
            if entry.problem is not None or entry.manifest is None:
                bad.append(entry)
                continue
            sha, size = entry.manifest["sha256"], entry.manifest["size"]
            if (sha, size) not in blobs:
                blobs[sha, size] = self._blob_problem(sha, size)
            if blobs[sha, size] is not None:
                bad.append(entry._replace(problem=f"manifest {entry.location} "
                                                  f"{blobs[sha, size]}"))
        return bad

    def _blob_problem(self, sha: str, size: int) -> str | None:
        """Why blob ``sha`` does not hold ``size`` bytes hashing to ``sha``, or None."""
        import hashlib

        h, n = hashlib.sha256(), 0
        name = f"blobs/{sha}"
        stream = self._open_stream(name)
        if stream is None:
            return f"names {self._location(name)}, which is missing"
        with contextlib.closing(stream):
            for chunk in stream:
                n += len(chunk)
                if n > size:
                    return f"names {self._location(name)}, which has more than {size} bytes"
                h.update(chunk)
        if n != size or h.hexdigest() != sha:
            return (f"names {self._location(name)}, which is corrupt: {n} bytes, sha256 "
                    f"{h.hexdigest()} (the manifest says {size} bytes, sha256 {sha})")
        return None

    def prune(self, older_than_seconds: float, *,
              blob_grace_seconds: float = 3600.0) -> list[str]:
        """Remove the manifests created more than ``older_than_seconds`` ago (their
        ``created`` field, else the object's time), then the blobs no remaining manifest
        names that are older than ``blob_grace_seconds`` (a blob younger than that may
        belong to an upload whose manifest is not written yet). Returns the removed
        objects' URLs.

        Blobs are listed before manifests, so a blob uploaded while this runs is never
        removed. Run it from one maintenance job: an upload that reuses an old orphaned
        blob in the instant between listing and removal leaves an entry whose blob is
        missing, which :meth:`download` and :meth:`verify` report and ``replace=True``
        repairs.
        """
        now = time.time()
        blobs = list(self._list("blobs/"))
        referenced: set[str] = set()
        removed: list[str] = []
        for entry in self.iter_entries():
            created = entry.created
            if created is not None and created < now - older_than_seconds:
                self._delete(f"entries/{entry.key_digest}/{entry.entry_digest}.json")
                removed.append(entry.location)
            elif isinstance(entry.manifest, dict):
                referenced.add(str(entry.manifest.get("sha256")))
        for blob in blobs:
            match = _BLOB_NAME_RE.fullmatch(blob.name)
            if (match and match.group(1) not in referenced
                    and blob.modified < now - blob_grace_seconds):
                self._delete(blob.name)
                removed.append(self._location(blob.name))
        return removed

    # -- helpers -------------------------------------------------------------------------
    def _entry(self, obj: StoredObject) -> RemoteEntry | None:
        match = _ENTRY_NAME_RE.fullmatch(obj.name)
        if match is None:
            return None  # not a manifest name: ignored
        key_digest, entry_digest = match.groups()
        where = self._location(obj.name)
        manifest: Any = None
        try:
            raw = self._read(obj.name)
            if raw is None:
                return None  # removed since it was listed
            manifest = json.loads(raw.decode("utf-8"))
        except RemoteIntegrityError:
            problem: str | None = f"is larger than {MAX_MANIFEST_BYTES} bytes"
        except ValueError:
            problem = "is not UTF-8 JSON"
        else:
            problem = _manifest_problem(manifest, key_digest, entry_digest)
            if problem is None and self._signing_key is not None:
                problem = signature_problem(manifest, self._signing_key)
        return RemoteEntry(key_digest, entry_digest, where,
                           manifest if isinstance(manifest, dict) else None,
                           None if problem is None else f"manifest {where} {problem}",
                           obj.modified)

    # -- storage primitives: names are "/"-separated, relative to the remote's root -------
    @abc.abstractmethod
    def _location(self, name: str) -> str:
        """The URL of object ``name``, safe to show."""

    @abc.abstractmethod
    def _list(self, prefix: str) -> Iterator[StoredObject]:
        """The objects whose names start with ``prefix`` (a directory-like "x/y/")."""

    @abc.abstractmethod
    def _read(self, name: str) -> bytes | None:
        """A small object's bytes (at most MAX_MANIFEST_BYTES, else RemoteIntegrityError),
        None if absent."""

    @abc.abstractmethod
    def _open_stream(self, name: str) -> Chunks | None:
        """The object's bytes in chunks (a generator to close when done), None if absent."""

    @abc.abstractmethod
    def _blob_present(self, name: str, sha256: str, size: int) -> bool:
        """Whether the store holds blob ``name`` with this size (and SHA-256, where the
        store can tell cheaply)."""

    @abc.abstractmethod
    def _put_blob(self, name: str, library: Path, sha256: str, size: int) -> None:
        """Store ``library`` as ``name``, atomically; RemoteIntegrityError if the bytes sent
        do not hash to ``sha256``."""

    @abc.abstractmethod
    def _put_manifest(self, name: str, data: bytes, *, create_only: bool) -> bool:
        """Write a manifest atomically; with ``create_only``, False if it already exists."""

    @abc.abstractmethod
    def _delete(self, name: str) -> None:
        """Remove an object; absent is fine."""


def _read_limited(chunks: Iterator[bytes], where: str) -> bytes:
    data = bytearray()
    for chunk in chunks:
        data += chunk
        if len(data) > MAX_MANIFEST_BYTES:
            raise RemoteIntegrityError(f"{where} is larger than {MAX_MANIFEST_BYTES} bytes: "
                                       "not a manifest")
    return bytes(data)


# -- S3 -------------------------------------------------------------------------------------
def classify_s3_error(exc: BaseException, *, bucket: str, what: str) -> RemoteError:
    """The RemoteError for a boto3/botocore exception raised while doing ``what`` (a phrase
    naming the action and the redacted object URL)."""
    from botocore import exceptions as bx  # type: ignore[import-untyped]

    detail = redact_url(str(exc))
    if isinstance(exc, bx.ClientError):
        return _classify_response(exc.response, bucket=bucket, what=what)
    if isinstance(exc, (bx.NoCredentialsError, bx.PartialCredentialsError)):
        return RemoteAuthError(f"{what} failed: {detail}; set AWS_ACCESS_KEY_ID and "
                               "AWS_SECRET_ACCESS_KEY or AWS_PROFILE")
    if isinstance(exc, (bx.ConnectTimeoutError, bx.ReadTimeoutError)):
        return RemoteUnavailableError(f"{what} timed out ({detail}); check the network and "
                                      "the endpoint, or raise the timeouts")
    if isinstance(exc, (bx.EndpointConnectionError, bx.ConnectionClosedError,
                        bx.HTTPClientError, bx.ResponseStreamingError,
                        bx.IncompleteReadError)):
        return RemoteUnavailableError(f"{what} failed: the server cannot be reached ({detail}); "
                                      "check the network and AWS_ENDPOINT_URL")
    return RemoteError(f"{what} failed ({type(exc).__name__}: {detail})")


def _classify_response(response: Mapping[str, Any], *, bucket: str, what: str) -> RemoteError:
    """The RemoteError for an S3 error answer (a ClientError's ``response``)."""
    error = response.get("Error", {})
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    code = str(error.get("Code") or status)
    detail = redact_url(f"{code}, HTTP {status}: {error.get('Message') or ''}".rstrip(": "))
    if code == "NoSuchBucket":
        return RemoteConfigError(f"{what} failed: bucket {bucket!r} does not exist; create it "
                                 "or fix the remote URL and AWS_ENDPOINT_URL")
    if code in _AUTH_CODES or status in (401, 403):
        return RemoteAuthError(f"{what} was refused ({detail}); check the credentials "
                               "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, a session "
                               "token's expiry) and the bucket policy")
    if code in _UNAVAILABLE_CODES or status == 429 or (isinstance(status, int) and status >= 500):
        return RemoteUnavailableError(f"{what} failed: the server is unavailable or throttling "
                                      f"({detail}); retry later, or raise the retries")
    if code in _DIGEST_MISMATCH_CODES:
        return RemoteIntegrityError(f"{what} failed: the server received bytes that do not "
                                    f"match their checksum ({detail})")
    return RemoteError(f"{what} failed ({detail})")


def _error_code(exc: Any) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code")
               or response.get("ResponseMetadata", {}).get("HTTPStatusCode"))


class S3Remote(Remote):
    """A bucket (and key prefix) reached with boto3.

    Timeouts and retries come from :func:`open_remote`; botocore retries throttling, 5xx
    and connection errors itself (standard mode), so an error raised here is final. The
    endpoint is ``endpoint_url``, else botocore's (``AWS_ENDPOINT_URL_S3`` or
    ``AWS_ENDPOINT_URL``, else AWS); the region is the session's (``AWS_DEFAULT_REGION``,
    a profile), else us-east-1.
    """

    def __init__(self, url: RemoteURL, *, signing_key: bytes | None, connect_timeout: float,
                 read_timeout: float, retries: int, endpoint_url: str | None = None) -> None:
        super().__init__(url, signing_key)
        try:
            import boto3  # type: ignore[import-untyped]
            from botocore.config import Config  # type: ignore[import-untyped]
            from botocore.exceptions import BotoCoreError  # type: ignore[import-untyped]
        except ImportError:
            raise RemoteConfigError(f"remote cache {url.redacted} needs boto3, which is not "
                                    f"installed: {EXTRA_HINT}") from None
        config = Config(connect_timeout=connect_timeout, read_timeout=read_timeout,
                        retries={"max_attempts": retries, "mode": "standard"})
        try:
            session = boto3.session.Session()
            self._client = session.client("s3", region_name=session.region_name or "us-east-1",
                                          endpoint_url=endpoint_url, config=config)
        except (BotoCoreError, ValueError) as exc:
            raise RemoteConfigError(f"remote cache {url.redacted} cannot be set up: "
                                    f"{redact_url(str(exc))}") from None
        self.endpoint = redact_url(str(self._client.meta.endpoint_url))

    def describe(self) -> str:
        return f"remote cache {self.url} (endpoint {self.endpoint})"

    @contextlib.contextmanager
    def _calling(self, action: str, name: str) -> Iterator[None]:
        """Map boto3's exceptions raised inside to RemoteError, naming the object."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except (BotoCoreError, ClientError) as exc:
            what = f"{action} {self._location(name)} (endpoint {self.endpoint})"
            raise classify_s3_error(exc, bucket=self.remote_url.bucket, what=what) from None

    def _key(self, name: str) -> str:
        return self.remote_url.prefix + name

    def _location(self, name: str) -> str:
        return f"s3://{self.remote_url.bucket}/{self._key(name)}"

    def _list(self, prefix: str) -> Iterator[StoredObject]:
        skip = len(self.remote_url.prefix)
        with self._calling("listing", prefix):
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.remote_url.bucket, Prefix=self._key(prefix))
            for page in pages:
                for obj in page.get("Contents", ()):
                    yield StoredObject(obj["Key"][skip:], int(obj["Size"]),
                                       obj["LastModified"].timestamp())

    def _get(self, name: str) -> Any:
        """The get_object response, None if the object is absent."""
        from botocore.exceptions import ClientError

        with self._calling("reading", name):
            try:
                return self._client.get_object(Bucket=self.remote_url.bucket,
                                               Key=self._key(name))
            except ClientError as exc:
                if _error_code(exc) in ("NoSuchKey", "404"):
                    return None
                raise

    def _read(self, name: str) -> bytes | None:
        response = self._get(name)
        if response is None:
            return None
        body = response["Body"]
        with contextlib.closing(body), self._calling("reading", name):
            return _read_limited(body.iter_chunks(_CHUNK), self._location(name))

    def _open_stream(self, name: str) -> Chunks | None:
        response = self._get(name)
        if response is None:
            return None
        return self._chunks(name, response["Body"])

    def _chunks(self, name: str, body: Any) -> Chunks:
        with contextlib.closing(body), self._calling("downloading", name):
            yield from body.iter_chunks(_CHUNK)

    def _blob_present(self, name: str, sha256: str, size: int) -> bool:
        from botocore.exceptions import ClientError

        with self._calling("checking", name):
            try:
                head = self._client.head_object(Bucket=self.remote_url.bucket,
                                                Key=self._key(name), ChecksumMode="ENABLED")
            except ClientError as exc:
                if _error_code(exc) in ("NoSuchKey", "404"):
                    return False
                raise
        checksum = head.get("ChecksumSHA256")
        return bool(head.get("ContentLength") == size
                    and (checksum is None or checksum == _b64_sha256(sha256)))

    def _put_blob(self, name: str, library: Path, sha256: str, size: int) -> None:
        # S3 checks the bytes it receives against ChecksumSHA256 (BadDigest otherwise).
        with open(library, "rb") as f, self._calling("uploading", name):
            self._client.put_object(Bucket=self.remote_url.bucket, Key=self._key(name), Body=f,
                                    ContentLength=size, ChecksumSHA256=_b64_sha256(sha256),
                                    ContentType="application/octet-stream")

    def _put_manifest(self, name: str, data: bytes, *, create_only: bool) -> bool:
        from botocore.exceptions import ClientError

        condition = {"IfNoneMatch": "*"} if create_only else {}
        with self._calling("publishing", name):
            try:
                self._client.put_object(Bucket=self.remote_url.bucket, Key=self._key(name),
                                        Body=data, ContentType="application/json", **condition)
            except ClientError as exc:
                # Lost to another publisher (or to our own write, when botocore retried a
                # request whose answer was lost): the manifest there is whole either way.
                if create_only and _error_code(exc) in _LOST_RACE_CODES:
                    return False
                raise
        return True

    def _delete(self, name: str) -> None:
        with self._calling("removing", name):
            self._client.delete_object(Bucket=self.remote_url.bucket, Key=self._key(name))


def _b64_sha256(hex_digest: str) -> str:
    import base64

    return base64.b64encode(bytes.fromhex(hex_digest)).decode("ascii")


# -- a directory ----------------------------------------------------------------------------
class FileRemote(Remote):
    """A directory, e.g. on a shared mount. Every write goes to a temp file (``.*.tmp``,
    never listed) that is fsynced and renamed into place; manifests are created with a hard
    link, which fails if the name exists, so publishing is create-only."""

    def __init__(self, url: RemoteURL, *, signing_key: bytes | None) -> None:
        super().__init__(url, signing_key)
        self.root = Path(url.path)
        if not self.root.is_dir():
            raise RemoteConfigError(f"remote cache directory {self.root} (from {url.redacted}) "
                                    "does not exist or is not a directory; create it or fix "
                                    "the URL")

    @contextlib.contextmanager
    def _calling(self, action: str, name: str) -> Iterator[None]:
        """Map OSError raised inside to RemoteError, naming the file."""
        try:
            yield
        except PermissionError as exc:
            raise RemoteAuthError(f"{action} {self._location(name)} was refused "
                                  f"({exc.strerror}); check the directory's permissions") from None
        except OSError as exc:
            if not self.root.is_dir():
                raise RemoteConfigError(f"remote cache directory {self.root} has gone "
                                        f"({action} {self._location(name)})") from None
            raise RemoteUnavailableError(f"{action} {self._location(name)} failed "
                                         f"({exc.strerror or exc})") from None

    def _path(self, name: str) -> Path:
        return self.root / name

    def _location(self, name: str) -> str:
        return "file://" + urllib.parse.quote(str(self._path(name)))

    def _list(self, prefix: str) -> Iterator[StoredObject]:
        base = self._path(prefix)
        with self._calling("listing", prefix):
            if not base.is_dir():
                return
            for top, dirs, files in os.walk(base, onerror=_raise):  # unreadable: no miss
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for file in sorted(files):
                    if file.startswith("."):
                        continue
                    path = Path(top, file)
                    try:
                        st = path.stat()
                    except FileNotFoundError:
                        continue
                    yield StoredObject(path.relative_to(self.root).as_posix(), st.st_size,
                                       st.st_mtime)

    def _read(self, name: str) -> bytes | None:
        stream = self._open_stream(name)
        if stream is None:
            return None
        with contextlib.closing(stream):
            return _read_limited(stream, self._location(name))

    def _open_stream(self, name: str) -> Chunks | None:
        with self._calling("reading", name):
            try:
                f = open(self._path(name), "rb")  # noqa: SIM115 (the generator closes it)
            except FileNotFoundError:
                return None
        return self._chunks(name, f)

    def _chunks(self, name: str, f: Any) -> Chunks:
        with f, self._calling("reading", name):
            yield from iter(lambda: f.read(_CHUNK), b"")

    def _blob_present(self, name: str, sha256: str, size: int) -> bool:
        from pytest_mlcjit.key import file_sha256

        path = self._path(name)
        with self._calling("checking", name):
            try:
                return path.stat().st_size == size and file_sha256(path) == sha256
            except FileNotFoundError:
                return False

    def _write_temp(self, path: Path, chunks: Iterator[bytes]) -> tuple[Path, str]:
        """Write ``chunks`` to a new fsynced temp file beside ``path``; (temp, sha256)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_temp(path, chunks)

    def _put_blob(self, name: str, library: Path, sha256: str, size: int) -> None:
        path = self._path(name)
        with open(library, "rb") as src, self._calling("uploading", name):
            tmp, actual = self._write_temp(path, iter(lambda: src.read(_CHUNK), b""))
            try:
                if actual != sha256:
                    raise RemoteIntegrityError(
                        f"uploading {library} to {self._location(name)} failed: it changed "
                        f"while being copied (sha256 {actual}, expected {sha256})")
                os.replace(tmp, path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()

    def _put_manifest(self, name: str, data: bytes, *, create_only: bool) -> bool:
        path = self._path(name)
        with self._calling("publishing", name):
            tmp, _ = self._write_temp(path, iter([data]))
            try:
                if not create_only:
                    os.replace(tmp, path)
                    return True
                try:
                    os.link(tmp, path)  # fails if the name exists: create-only
                except FileExistsError:
                    return False
                except OSError as exc:
                    if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP):
                        raise
                    raise RemoteConfigError(
                        f"remote cache directory {self.root} is on a filesystem without hard "
                        "links, which publishing needs (create-only); use another directory "
                        "or an s3:// remote") from None
                return True
            finally:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()

    def _delete(self, name: str) -> None:
        with self._calling("removing", name), contextlib.suppress(FileNotFoundError):
            self._path(name).unlink()

    def prune(self, older_than_seconds: float, *,
              blob_grace_seconds: float = 3600.0) -> list[str]:
        """As :meth:`Remote.prune`; also removes temp files older than the blob grace
        period (left by writers that died)."""
        removed = super().prune(older_than_seconds, blob_grace_seconds=blob_grace_seconds)
        cutoff = time.time() - blob_grace_seconds
        with self._calling("pruning", ""):
            for top, _dirs, files in os.walk(self.root):
                for file in files:
                    path = Path(top, file)
                    with contextlib.suppress(FileNotFoundError):
                        if (file.startswith(".") and file.endswith(".tmp")
                                and path.lstat().st_mtime < cutoff):
                            path.unlink()
                            removed.append("file://" + urllib.parse.quote(str(path)))
        return removed


def _raise(exc: OSError) -> NoReturn:
    raise exc


# -- opening --------------------------------------------------------------------------------
def open_remote(url: str, *, signing_key: bytes | None = None, connect_timeout: float = 5.0,
                read_timeout: float = 30.0, retries: int = 2,
                endpoint_url: str | None = None) -> Remote:
    """The remote at ``url`` (``s3://BUCKET[/PREFIX]`` or ``file:///ABSOLUTE/PATH``).

    ``signing_key``: sign uploads and accept only validly signed manifests. Timeouts are
    per connection attempt and per socket read; ``retries`` is how many times botocore
    retries a failed request (throttling, 5xx, connection errors) after the first try.
    ``endpoint_url`` overrides the S3 endpoint botocore would use. Opening touches no
    network (a missing bucket shows on first use) but fails fast, with RemoteConfigError,
    on a bad URL or setting, a missing directory, or boto3 not installed.
    """
    remote_url = parse_remote_url(url)
    if signing_key is not None and (not isinstance(signing_key, bytes) or not signing_key):
        raise RemoteConfigError("invalid remote signing key: expected non-empty bytes (an "
                                "empty key signs nothing; check the variable that holds it)")
    for name, value in (("connect_timeout", connect_timeout), ("read_timeout", read_timeout)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                math.isfinite(value) and value > 0):
            raise RemoteConfigError(f"invalid remote {name} {value!r}: expected a positive "
                                    "number of seconds")
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise RemoteConfigError(f"invalid remote retries {retries!r}: expected an integer >= 0")
    if remote_url.scheme == "file":
        return FileRemote(remote_url, signing_key=signing_key)
    return S3Remote(remote_url, signing_key=signing_key, connect_timeout=connect_timeout,
                    read_timeout=read_timeout, retries=retries, endpoint_url=endpoint_url)
