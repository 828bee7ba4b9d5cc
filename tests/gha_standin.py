"""A stand-in for GitHub's Actions cache service, for the tests.

GitHub's cache service runs only behind GitHub's runners: it cannot run here, so this
replaces it (a mock, the only one of the ``gha://`` tests). The blobs are not mocked: they
live in Azurite, Microsoft's Azure Storage emulator (:mod:`azurite`), behind the Azure Blob
SAS URLs the stand-in hands out, as GitHub's own service hands out URLs of Azure Blob
Storage. ``tests/node/gha_client.js`` runs the official client, ``@actions/cache`` 4.1.0,
against it (``test_remote_gha.py``): the stand-in speaks the protocol GitHub's own client
speaks.

The protocol (cache service v2, as ``@actions/cache`` speaks it:
``lib/internal/shared/cacheTwirpClient.js``, ``lib/generated/results/api/v1/cache*.js``,
``lib/cache.js`` ``saveCacheV2``/``restoreCacheV2``): Twirp with JSON bodies (proto field
names), ``POST ${ACTIONS_RESULTS_URL}/twirp/github.actions.results.api.v1.CacheService/
<Method>`` with ``Authorization: Bearer ${ACTIONS_RUNTIME_TOKEN}``:

- ``CreateCacheEntry {key, version}`` -> ``{ok, signed_upload_url}``: a SAS URL (create
  and write) of a new blob, which the client PUTs the archive to. Entries are immutable: a
  second entry of the same key, version and scope is refused (409 ``already_exists``,
  ``cache entry with the same key, version, and scope already exists``), also while the
  first is still being uploaded.
- ``FinalizeCacheEntryUpload {key, version, size_bytes}`` -> ``{ok, entry_id}`` (int64 as
  a JSON string, as protobuf's JSON mapping writes it): the entry becomes visible; its
  blob must hold ``size_bytes`` bytes (400 ``invalid_argument`` otherwise; 404
  ``not_found`` for an entry never created).
- ``GetCacheEntryDownloadURL {key, restore_keys, version}`` -> ``{ok, signed_download_url,
  matched_key}`` (a SAS URL, read), or ``{ok: false}`` (HTTP 200) for a miss. As GitHub
  documents the lookup: in each scope the token may read, in the token's order, the
  entries of that ``version`` whose key equals ``key``, else whose key starts with
  ``key``, else starts with each restore key in turn; the most recently created of the
  first that matches.

Errors are Twirp error JSON ``{"code", "msg"}`` with the HTTP status of the code
(``invalid_argument`` 400, ``unauthenticated`` 401, ``permission_denied`` 403,
``not_found`` 404, ``already_exists`` 409, ``resource_exhausted`` 429, ``internal`` 500),
which the official client retries (429, 500, 502, 503, 504) or not.

**Scoping, as the service does it.** The runtime token is a JWT (signed here with the
stand-in's own secret; a token it did not sign is 401 ``unauthenticated``) whose ``ac``
claim is a JSON string listing scopes and permissions (1 read, 2 write, 3 both), for a run
on a feature branch ``[{"Scope":"refs/heads/feature","Permission":3},
{"Scope":"refs/heads/main","Permission":1}]``: writes go to the first writable scope (a
token with none may not create: 403 ``permission_denied``); reads see the entries of every
readable scope of the token, its own branch first, then the default branch. A run on
another branch (another token) never sees the feature branch's entries; every branch sees
the default branch's.

Besides answering, the stand-in can **throttle** (:meth:`GHAStandin.throttle`: the next N
requests answered 429 with the given ``Retry-After`` values, a storm), enforces GitHub's
**creation limit** (``limit`` new entries per ``window`` seconds per repository, 200 a
minute by default; a shorter window lets a test run fast; a creation past it is answered
429 with ``Retry-After`` and counted in :attr:`GHAStandin.refused_for_rate`), and
**counts** requests (:attr:`GHAStandin.requests`, per method) and the creations it
accepted (:attr:`GHAStandin.creations`, :meth:`GHAStandin.max_in_window`).
"""

from __future__ import annotations

import base64
import collections
import contextlib
import dataclasses
import datetime
import hashlib
import hmac
import json
import math
import secrets
import threading
import time
from collections.abc import Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from azurite import ACCOUNT, ACCOUNT_KEY, Azurite

SERVICE = "github.actions.results.api.v1.CacheService"

#: Twirp's error codes and their HTTP statuses (those the stand-in answers).
TWIRP_STATUS = {"invalid_argument": 400, "malformed": 400, "unauthenticated": 401,
                "permission_denied": 403, "not_found": 404, "bad_route": 404,
                "already_exists": 409, "resource_exhausted": 429, "internal": 500,
                "unavailable": 503}

READ, WRITE = 1, 2


@dataclasses.dataclass
class Entry:
    """One cache entry: immutable once finalized."""

    id: int
    scope: str
    key: str
    version: str
    blob: str
    size: int | None = None  #: set by FinalizeCacheEntryUpload: the entry is visible


class TwirpError(Exception):
    def __init__(self, code: str, msg: str, retry_after: str | None = None) -> None:
        super().__init__(msg)
        self.code, self.msg, self.retry_after = code, msg, retry_after


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class GHAStandin:
    """The stand-in service on 127.0.0.1 (a thread), its blobs in a container of
    ``azurite`` (None: no blob store; creating an entry is then a 500, for tests that
    never get that far). :attr:`url` is what ``ACTIONS_RESULTS_URL`` is set to."""

    def __init__(self, azurite: Azurite | None, *, limit: int = 200, window: float = 60.0
                 ) -> None:
        self.azurite = azurite
        self.container = azurite.container() if azurite is not None else ""
        self.limit, self.window = limit, window
        self._secret = secrets.token_bytes(32)
        self._lock = threading.Lock()
        self._entries: list[Entry] = []
        self._storm: collections.deque[tuple[frozenset[str] | None, int, str | None]] = (
            collections.deque())
        #: Requests answered, per method (throttled ones included).
        self.requests: collections.Counter[str] = collections.Counter()
        #: When each accepted CreateCacheEntry arrived (time.monotonic()).
        self.creations: list[float] = []
        #: CreateCacheEntry requests refused for the creation limit.
        self.refused_for_rate = 0
        #: Requests answered from a storm (:meth:`throttle`).
        self.throttled = 0
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                standin._serve(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        daemon=True, name="gha-standin")
        self._thread.start()

    # -- for the tests -------------------------------------------------------------------
    def token(self, write: str | None = "refs/heads/main", read: Iterable[str] = ()) -> str:
        """A runtime token of a run that writes to ``write`` (None: may not write) and
        also reads ``read`` (the default branch, for a run on another branch)."""
        scopes = ([{"Scope": write, "Permission": READ | WRITE}] if write else []) + [
            {"Scope": scope, "Permission": READ} for scope in read]
        header = _b64(json.dumps({"typ": "JWT", "alg": "HS256"}).encode())
        payload = _b64(json.dumps({"ac": json.dumps(scopes), "iss": "gha-standin",
                                   "exp": int(time.time()) + 3600}).encode())
        signature = hmac.new(self._secret, f"{header}.{payload}".encode(), hashlib.sha256)
        return f"{header}.{payload}.{_b64(signature.digest())}"

    def throttle(self, count: int, *, retry_after: Iterable[str | None] = ("1",),
                 methods: Iterable[str] | None = None, status: int = 429) -> None:
        """Answer the next ``count`` requests (of ``methods``, or any) with ``status``,
        their ``Retry-After`` taken from ``retry_after`` in turn (None: no header)."""
        values = list(retry_after)
        only = frozenset(methods) if methods is not None else None
        with self._lock:
            self._storm.extend((only, status, values[i % len(values)]) for i in range(count))

    def visible(self, scope: str | None = None) -> list[str]:
        """The keys of the visible (finalized) entries, of ``scope`` or of all."""
        with self._lock:
            return [e.key for e in self._entries
                    if e.size is not None and scope in (None, e.scope)]

    def entries(self) -> list[Entry]:
        with self._lock:
            return [dataclasses.replace(e) for e in self._entries]

    def max_in_window(self) -> int:
        """The most creations accepted within any ``window`` seconds."""
        times, most, start = sorted(self.creations), 0, 0
        for end, t in enumerate(times):
            while t - times[start] >= self.window:
                start += 1
            most = max(most, end - start + 1)
        return most

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)

    # -- serving -------------------------------------------------------------------------
    def _serve(self, request: BaseHTTPRequestHandler) -> None:
        method = request.path.rsplit("/", 1)[-1]
        length = int(request.headers.get("Content-Length") or 0)
        raw = request.rfile.read(length)
        status, headers, body = 200, {}, b""
        try:
            with self._lock:
                self.requests[method] += 1
                storm = self._stormy(method)
            if storm is not None:
                status, retry_after = storm
                raise TwirpError("resource_exhausted" if status == 429 else "unavailable",
                                 "too many requests (a storm)", retry_after)
            if not request.path.startswith(f"/twirp/{SERVICE}/"):
                raise TwirpError("bad_route", f"no such route: {request.path}")
            scopes = self._scopes(request.headers.get("Authorization", ""))
            try:
                data = json.loads(raw or b"{}")
            except ValueError:
                raise TwirpError("malformed", "the body is not JSON") from None
            if not isinstance(data, dict):
                raise TwirpError("malformed", "the body is not a JSON object")
            handler = {"CreateCacheEntry": self._create,
                       "FinalizeCacheEntryUpload": self._finalize,
                       "GetCacheEntryDownloadURL": self._lookup}.get(method)
            if handler is None:
                raise TwirpError("bad_route", f"no such method: {method}")
            body = json.dumps(handler(data, scopes)).encode()
        except TwirpError as exc:
            status = TWIRP_STATUS[exc.code]
            body = json.dumps({"code": exc.code, "msg": exc.msg}).encode()
            if exc.retry_after is not None:
                headers["Retry-After"] = exc.retry_after
        request.send_response(status)
        for name, value in {"Content-Type": "application/json",
                            "Content-Length": str(len(body)), **headers}.items():
            request.send_header(name, value)
        request.end_headers()
        request.wfile.write(body)

    def _stormy(self, method: str) -> tuple[int, str | None] | None:
        for i, (only, status, retry_after) in enumerate(self._storm):
            if only is None or method in only:
                del self._storm[i]
                self.throttled += 1
                return status, retry_after
        return None

    def _scopes(self, authorization: str) -> list[tuple[str, int]]:
        """The token's scopes, in its order: (scope, permission bits)."""
        scheme, _, token = authorization.partition(" ")
        parts = token.split(".")
        if scheme != "Bearer" or len(parts) != 3:
            raise TwirpError("unauthenticated", "missing or malformed bearer token")
        signature = hmac.new(self._secret, f"{parts[0]}.{parts[1]}".encode(), hashlib.sha256)
        scopes: list[tuple[str, int]] = []
        with contextlib.suppress(ValueError, KeyError, TypeError):
            if hmac.compare_digest(_unb64(parts[2]), signature.digest()):
                claims = json.loads(_unb64(parts[1]))
                scopes = [(str(s["Scope"]), int(s["Permission"]))
                          for s in json.loads(claims["ac"])]
        if not scopes:
            raise TwirpError("unauthenticated", "invalid token")
        return scopes

    @staticmethod
    def _fields(data: dict[str, Any], *names: str) -> list[str]:
        values = [data.get(name) for name in names]
        if not all(isinstance(v, str) and v for v in values):
            raise TwirpError("invalid_argument", f"{', '.join(names)} must be non-empty strings")
        return values  # type: ignore[return-value]

    def _create(self, data: dict[str, Any], scopes: list[tuple[str, int]]) -> dict[str, Any]:
        key, version = self._fields(data, "key", "version")
        if len(key) > 512 or "," in key:
            raise TwirpError("invalid_argument", "key: at most 512 characters, no commas")
        scope = next((s for s, perm in scopes if perm & WRITE), None)
        if scope is None:
            raise TwirpError("permission_denied", "the token may not write to the cache")
        if self.azurite is None:
            raise TwirpError("internal", "this stand-in has no blob store")
        with self._lock:
            now = time.monotonic()
            recent = [t for t in self.creations if t > now - self.window]
            if len(recent) >= self.limit:
                self.refused_for_rate += 1
                wait = math.ceil(min(recent) + self.window - now)
                raise TwirpError("resource_exhausted", "too many cache entries created: "
                                 f"{self.limit} per {self.window:g}s", str(max(wait, 1)))
            if any((e.scope, e.key, e.version) == (scope, key, version)
                   for e in self._entries):
                raise TwirpError("already_exists", "cache entry with the same key, version, "
                                 "and scope already exists")
            self.creations.append(now)
            entry = Entry(len(self._entries) + 1, scope, key, version, "")
            entry.blob = f"{entry.id}-" + hashlib.sha256(
                f"{scope}\0{key}\0{version}".encode()).hexdigest()[:16]
            self._entries.append(entry)
        return {"ok": True, "signed_upload_url": self._sas(entry.blob, write=True)}

    def _finalize(self, data: dict[str, Any], scopes: list[tuple[str, int]]) -> dict[str, Any]:
        key, version = self._fields(data, "key", "version")
        try:
            size = int(data.get("size_bytes", 0))  # int64: a JSON string or number
        except (TypeError, ValueError):
            raise TwirpError("invalid_argument", "size_bytes must be an integer") from None
        scope = next((s for s, perm in scopes if perm & WRITE), None)
        with self._lock:
            entry = next((e for e in self._entries if e.size is None
                          and (e.scope, e.key, e.version) == (scope, key, version)), None)
        if entry is None:
            raise TwirpError("not_found", "no cache entry being uploaded with this key and "
                             "version in the token's scope")
        stored = self._blob_size(entry.blob)
        if stored != size:
            raise TwirpError("invalid_argument", f"size_bytes {size} does not match the "
                             f"uploaded blob ({stored} bytes)")
        with self._lock:
            entry.size = size
        return {"ok": True, "entry_id": str(entry.id)}

    def _lookup(self, data: dict[str, Any], scopes: list[tuple[str, int]]) -> dict[str, Any]:
        key, version = self._fields(data, "key", "version")
        restore = data.get("restore_keys") or []
        if not isinstance(restore, list) or not all(isinstance(k, str) for k in restore):
            raise TwirpError("invalid_argument", "restore_keys must be a list of strings")
        with self._lock:
            visible = [e for e in self._entries if e.size is not None and e.version == version]
        for scope, perm in scopes:
            if not perm & READ:
                continue
            mine = [e for e in visible if e.scope == scope]
            # The key exactly, the key as a prefix, then each restore key as a prefix.
            for exact, prefix in [(True, key), (False, key), *((False, p) for p in restore)]:
                found = [e for e in mine
                         if (e.key == prefix if exact else e.key.startswith(prefix))]
                if found:
                    newest = max(found, key=lambda e: e.id)
                    return {"ok": True, "signed_download_url": self._sas(newest.blob),
                            "matched_key": newest.key}
        return {"ok": False}

    # -- the blob store (Azurite) --------------------------------------------------------
    def _sas(self, blob: str, *, write: bool = False) -> str:
        from azure.storage.blob import BlobSasPermissions, generate_blob_sas

        assert self.azurite is not None
        now = datetime.datetime.now(datetime.timezone.utc)
        permission = (BlobSasPermissions(create=True, write=True) if write
                      else BlobSasPermissions(read=True))
        sas = generate_blob_sas(ACCOUNT, self.container, blob, account_key=ACCOUNT_KEY,
                                permission=permission, start=now - datetime.timedelta(minutes=5),
                                expiry=now + datetime.timedelta(hours=1))
        return f"{self.azurite.endpoint}/{self.container}/{blob}?{sas}"

    def _blob_size(self, blob: str) -> int | None:
        from azure.core.exceptions import ResourceNotFoundError
        from azure.storage.blob import BlobClient

        assert self.azurite is not None
        client = BlobClient.from_connection_string(self.azurite.connection_string,
                                                   self.container, blob)
        try:
            size: int = client.get_blob_properties().size
        except ResourceNotFoundError:
            return None
        return size

    def read_blob(self, entry: Entry) -> bytes:
        """An entry's bytes, read from Azurite directly (not through the service)."""
        from azure.storage.blob import BlobClient

        assert self.azurite is not None
        client = BlobClient.from_connection_string(self.azurite.connection_string,
                                                   self.container, entry.blob)
        data: bytes = client.download_blob().readall()
        return data

    def write_blob(self, entry: Entry, data: bytes) -> None:
        """Replace an entry's bytes in Azurite (a tampered blob)."""
        from azure.storage.blob import BlobClient

        assert self.azurite is not None
        BlobClient.from_connection_string(self.azurite.connection_string, self.container,
                                          entry.blob).upload_blob(data, overwrite=True)


@contextlib.contextmanager
def running(azurite: Azurite | None, **kwargs: Any) -> Iterator[GHAStandin]:
    standin = GHAStandin(azurite, **kwargs)
    try:
        yield standin
    finally:
        standin.stop()
