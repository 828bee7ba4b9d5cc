"""The GitHub Actions cache adapter, ``gha://[SCOPE]``: a client of the cache service v2
(Twirp JSON at ``$ACTIONS_RESULTS_URL``, ``Bearer $ACTIONS_RUNTIME_TOKEN``) as
``@actions/cache`` speaks it, standard library only (docs/how-to/remote.md: The GitHub
Actions cache).

An object (``blobs/<sha256>``, ``entries/<key>/<entry>.json``...) is entries keyed
``mlcjit/[SCOPE/]<name>@<generation>``, versioned by the cache format and SCOPE. Entries
are immutable: an object is the newest entry of its name (GetCacheEntryDownloadURL of the
prefix ``<name>@``); a rewrite is a new random generation; a create-only manifest is
generation ``0`` (a second one of a key, version and scope is refused: one publisher wins,
the others wait ~8 s for it to be finalized; nothing visible then, as after an upload
that died, or hidden: a new generation). A listing yields the newest object of a prefix.
Nothing is removed (GitHub evicts): prune and rm are refused, saying so; a quarantined
entry is hidden by a newer generation marked removed (``@x...``). A blob is present only
when read and hashed here (the service verifies nothing); a wrong one is superseded.
Throttling (429, 5xx) is retried as ``Retry-After`` asks, within ``MLC_JIT_GHA_MAX_WAIT``
and the deadline, then RemoteUnavailableError; creations are paced (:class:`_Pacer`).
"""

from __future__ import annotations

import base64
import contextlib
import email.utils
import fcntl
import hashlib
import http.client
import io
import json
import math
import os
import random
import re
import secrets
import socket
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

from pytest_mlcjit import errors as err
from pytest_mlcjit._util.remote_limits import MAX_TIMEOUT_S
from pytest_mlcjit.cache.store.remote.base import CHUNK, Chunks, Remote, RemoteOptions
from pytest_mlcjit.cache.store.remote.entries import RemoteEntry, StoredObject
from pytest_mlcjit.cache.store.remote.maintenance import blob_problem
from pytest_mlcjit.cache.store.remote.url import RemoteURL, redact_url
from pytest_mlcjit.key import CACHE_FORMAT

ENV_URL, ENV_TOKEN = "ACTIONS_RESULTS_URL", "ACTIONS_RUNTIME_TOKEN"
ENV_MAX_WAIT, ENV_RATE, ENV_WINDOW = ("MLC_JIT_GHA_MAX_WAIT", "MLC_JIT_GHA_RATE",
                                      "MLC_JIT_GHA_RATE_WINDOW")
DEFAULT_MAX_WAIT, DEFAULT_RATE, DEFAULT_WINDOW = 120.0, 200, 60.0
SERVICE = "github.actions.results.api.v1.CacheService"
#: How pytest gets the variables (GitHub gives them to actions, not to ``run`` steps).
EXPORT_STEP = (
    "GitHub gives them to actions, not to run steps: export them in a step before pytest, "
    "`- uses: actions/github-script@v7` with `script: for (const v of ['ACTIONS_RESULTS_URL',"
    " 'ACTIONS_RUNTIME_TOKEN']) core.exportVariable(v, process.env[v] || '')` "
    "(docs: how-to/remote, The GitHub Actions cache)")
EVICTION = (
    "the GitHub Actions cache service lets a job create and read entries, never remove "
    "them: GitHub evicts them itself (entries unused for 7 days, and the least recently used "
    "once the repository holds more than 10 GB); to start afresh, change the URL's scope "
    "(gha://v2 -> gha://v3), or delete entries in the repository's Actions > Caches page")
_SCOPE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
#: A generation: ``0`` (create-only), 16 hex digits (a rewrite), ``x`` + 16 (removed).
_GEN_RE = re.compile(r"0|x?[0-9a-f]{16}")
_RETRIED = frozenset({429, 500, 502, 503, 504})
_SAS_RE = re.compile(r"(https?://[^\s?\"']+)\?[^\s\"']*")
_HIDDEN = b"removed\n"


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds a ``Retry-After`` asks to wait (a number, an HTTP date), None if unreadable."""
    with contextlib.suppress(ValueError, TypeError):
        seconds = float(value or "")
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    with contextlib.suppress(TypeError, ValueError, IndexError):
        when = email.utils.parsedate_to_datetime(str(value).strip())
        if when.tzinfo is not None:
            return max(0.0, when.timestamp() - (time.time() if now is None else now))
    return None


def _env_number(name: str, default: float, *, count: bool = False) -> float:
    text = os.environ.get(name, "").strip()
    try:
        value = (float(int(text)) if count else float(text)) if text else default
    except ValueError:
        value = math.nan
    if not (0 <= value <= 1e9 if count else 0 < value <= MAX_TIMEOUT_S):
        raise err.RemoteConfigError(
            f"invalid {name} {text!r}: expected " + ("a whole number, 0 or more" if count else
            f"a number of seconds greater than 0 and at most {MAX_TIMEOUT_S:g}"))
    return value


def service_env(url: str = "gha://") -> tuple[str, str]:
    """The service's URL and token, from the environment; RemoteConfigError if not usable."""
    env = {name: os.environ.get(name, "").strip() for name in (ENV_URL, ENV_TOKEN)}
    if missing := [name for name, value in env.items() if not value]:
        raise err.RemoteConfigError(f"remote cache {url} needs {' and '.join(missing)}, which "
                                    f"{'are' if missing[1:] else 'is'} not set: {EXPORT_STEP}")
    base, token = env[ENV_URL].rstrip("/"), env[ENV_TOKEN]
    parts = urllib.parse.urlsplit(base)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise err.RemoteConfigError(f"invalid {ENV_URL} {redact_url(base)!r}: expected the "
                                    "http(s) URL GitHub sets for actions")
    if any(ch.isspace() or ord(ch) < 32 or ch == "\x7f" for ch in token):
        raise err.RemoteConfigError(f"invalid {ENV_TOKEN}: it holds whitespace or control "
                                    "characters (its value is not shown)")
    return base, token


class _Exists(err.RemoteError):
    """CreateCacheEntry refused: an entry of that key, version and scope exists."""


class _Pacer:
    """Creations paced (GCRA): a burst of ``limit // 10``, then at most 90 % of ``limit`` in
    any ``window``; the state in file ``state`` under ``flock`` (shared), else in memory."""

    _memory: ClassVar[dict[str, float]] = {}
    _lock = threading.Lock()

    def __init__(self, limit: int, window: float, state: Path | None, ident: str) -> None:
        burst = max(1, limit // 10)
        sustained = limit * 0.9 - burst if limit * 0.9 > burst else limit * 0.5
        self.interval = window / sustained if limit > 0 else 0.0
        self.tolerance, self.state, self.ident = (burst - 1) * self.interval, state, ident

    def _update(self, change: Callable[[float, float], float]) -> None:
        """``tat = change(tat, now)``, under the locks."""
        with self._lock, contextlib.ExitStack() as stack:
            tat, fd = self._memory.get(self.ident, 0.0), None
            with contextlib.suppress(OSError, ValueError):
                if self.state is not None:
                    fd = os.open(self.state, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
                    stack.callback(os.close, fd)  # releases the flock
                    fcntl.flock(fd, fcntl.LOCK_EX)
                    tat = float(os.read(fd, 64) or b"0")
            new = self._memory[self.ident] = change(tat, time.time())
            if fd is not None and new != tat:
                with contextlib.suppress(OSError):
                    os.pwrite(fd, repr(new).encode().ljust(32), 0)

    def reserve(self, budget: float) -> float:
        """Take the next slot; how long to wait for it (more than ``budget``: none taken)."""
        wait = [0.0]

        def change(tat: float, now: float) -> float:
            wait[0] = max(tat, now) - self.tolerance - now
            return max(tat, now) + self.interval if wait[0] <= budget else tat

        if self.interval:
            self._update(change)
        return max(wait[0], 0.0)

    def hold(self, seconds: float) -> None:
        """No creation before ``seconds`` from now (a 429's Retry-After)."""
        if self.interval:
            self._update(lambda tat, now: max(tat, now + seconds + self.tolerance))


class _Reply:
    def __init__(self, status: int, headers: Any, body: bytes, stream: Any = None) -> None:
        self.status, self.headers, self.body, self.stream = status, headers, body, stream


class GHARemote(Remote):
    """The GitHub Actions cache (see the module's docstring)."""

    eviction = EVICTION

    def __init__(self, url: RemoteURL, options: RemoteOptions) -> None:
        super().__init__(url, options)
        self._base, self._token = service_env(url.redacted)
        self.host = urllib.parse.urlsplit(self._base).netloc.rpartition("@")[2]
        self.max_wait = _env_number(ENV_MAX_WAIT, DEFAULT_MAX_WAIT)
        rate = int(_env_number(ENV_RATE, DEFAULT_RATE, count=True))
        window = _env_number(ENV_WINDOW, DEFAULT_WINDOW)
        self._root = "mlcjit/" + (f"{url.bucket}/" if url.bucket else "")
        self._version = hashlib.sha256(
            f"pytest-mlcjit gha://{url.bucket} format {CACHE_FORMAT}".encode()).hexdigest()
        ident = hashlib.sha256(
            f"{self._base}\0{os.environ.get('GITHUB_REPOSITORY', '')}".encode()).hexdigest()
        self._pacer = _Pacer(rate, window, None if options.run_dir is None else
                             Path(options.run_dir, f".gha-pace-{ident[:16]}"), ident)
        self._urls: dict[str, tuple[str, str]] = {}  # a listing's finds: (generation, URL)
        self._urls_lock = threading.Lock()
        self._opener = urllib.request.build_opener(
            _handler(False, options.read_timeout, self._watch),
            _handler(True, options.read_timeout, self._watch),  # and no redirect: the
            type("NoRedirect", (urllib.request.HTTPRedirectHandler,),  # token stays here
                 {"redirect_request": lambda *args, **kwargs: None})())

    @classmethod
    def parse_url(cls, parts: urllib.parse.SplitResult) -> RemoteURL:
        if "@" in parts.netloc or ":" in parts.netloc:
            raise err.BadURL(f"a gha:// URL holds no credentials and no port ({ENV_TOKEN})")
        if parts.netloc and not _SCOPE_RE.fullmatch(parts.netloc):
            raise err.BadURL(f"{parts.netloc!r} is not a valid scope (1 to 64 letters, digits, "
                             "'.', '_' and '-', starting with a letter or digit)")
        if parts.path.strip("/"):
            raise err.BadURL("a gha:// URL has one segment at most: gha:// or gha://SCOPE")
        return RemoteURL("gha", parts.netloc, "", "", f"gha://{parts.netloc}")

    # -- HTTP ----------------------------------------------------------------------------
    def _watch(self, sock: socket.socket) -> None:
        """Shut ``sock`` down when the current operation's deadline expires."""
        if (deadline := self.current_deadline()) is not None:
            deadline.on_expiry(lambda: sock.shutdown(socket.SHUT_RDWR))

    def _redact(self, text: str) -> str:
        return _SAS_RE.sub(r"\1?***", redact_url(text.replace(self._token, "***")))

    def _budget(self, waited: float) -> float:
        """How much longer a request may wait: MLC_JIT_GHA_MAX_WAIT, and its deadline."""
        deadline = self.current_deadline()
        return min(self.max_wait - waited, math.inf if deadline is None else deadline.remaining())

    def _request(self, what: str, method: str, url: str, *,
                 body: Callable[[], Any] | None = None, headers: dict[str, str] | None = None,
                 stream: bool = False, create: bool = False) -> _Reply:
        """One HTTP exchange, retried within the budget since its first attempt: 429 and 5xx
        as Retry-After asks (a growing pause at least), a failed connection
        ``options.retries`` times; ``create``: paced (:class:`_Pacer`)."""
        attempts = failures = 0
        start = time.monotonic()
        while True:
            if create:
                budget = self._budget(time.monotonic() - start)
                if (wait := self._pacer.reserve(budget)) > budget:
                    raise err.RemoteUnavailableError(
                        f"{what} was given up: new entries are held back {wait:.0f}s ({ENV_RATE}"
                        f", a 429's Retry-After), more than {ENV_MAX_WAIT} or the deadline allow")
                time.sleep(wait)
            attempts += 1
            request = urllib.request.Request(  # noqa: S310 (an http(s) URL, checked)
                url, data=None if body is None else body(), headers=headers or {},
                method=method)
            try:
                response = self._opener.open(request, timeout=self.options.connect_timeout)
            except urllib.request.HTTPError as exc:
                with contextlib.closing(exc), contextlib.suppress(OSError, ValueError,
                                                                  http.client.HTTPException):
                    reply = _Reply(exc.code, exc.headers, b"")
                    reply.body = exc.read(65536)
                if reply.status not in _RETRIED:
                    return reply
                asked = retry_after(reply.headers.get("Retry-After"))
                wait = _backoff(attempts) if asked is None else max(asked, 0.05 * attempts)
                cause = f"HTTP {reply.status}{_twirp_detail(reply.body)}"
                if create and reply.status == 429:
                    self._pacer.hold(wait)
            except (OSError, http.client.HTTPException) as exc:
                if (deadline := self.current_deadline()) is not None and deadline.expired:
                    raise err.RemoteUnavailableError("deadline") from None  # worded by within
                failures += 1
                cause = f"the connection failed ({exc})"
                if failures > self.options.retries:
                    raise err.RemoteUnavailableError(
                        f"{what} failed after {attempts} attempts: {self._redact(cause)}; "
                        f"check the network and {ENV_URL} ({self.host})") from None
                wait = _backoff(failures)
            else:
                if stream:
                    return _Reply(response.status, response.headers, b"", response)
                with contextlib.closing(response):
                    return _Reply(response.status, response.headers, response.read())
            if wait > self._budget(waited := time.monotonic() - start):
                raise err.RemoteUnavailableError(
                    f"{what} was given up after {attempts} attempts in {waited:.0f}s: "
                    f"{self._redact(cause)}; waiting {wait:.0f}s more would pass {ENV_MAX_WAIT}="
                    f"{self.max_wait:g}s or the deadline (MLC_JIT_REMOTE_DEADLINE)")
            time.sleep(wait)

    def _twirp(self, method: str, payload: dict[str, Any], what: str) -> dict[str, Any]:
        reply = self._request(
            what, "POST", f"{self._base}/twirp/{SERVICE}/{method}",
            body=lambda: json.dumps(payload).encode(), create=method == "CreateCacheEntry",
            headers={"Content-Type": "application/json", "Authorization":
                     f"Bearer {self._token}", "User-Agent": "pytest-mlcjit"})
        if reply.status == 409 and method == "CreateCacheEntry":
            raise _Exists(f"{what} failed: the service has an entry {payload['key']} already")
        if reply.status >= 300:
            raise self._refused(what, reply, f"{method} answered")
        with contextlib.suppress(ValueError):
            if isinstance(answer := json.loads(reply.body), dict):
                return answer
        raise err.RemoteError(f"{what} failed: {method} answered no JSON object")

    def _refused(self, what: str, reply: _Reply, by: str) -> err.RemoteError:
        detail = self._redact(f"{by} HTTP {reply.status}{_twirp_detail(reply.body)}")
        if reply.status in (401, 403):
            return err.RemoteAuthError(
                f"{what} was refused ({detail}): {ENV_TOKEN} is valid while its job runs, "
                "and may only read where GitHub says so (--mlc-jit-remote-mode=read)")
        return err.RemoteError(f"{what} failed ({detail})")

    # -- objects as entries ----------------------------------------------------------------
    def _location(self, name: str) -> str:
        return f"gha://{self.remote_url.bucket}/{name}"

    def _find(self, stem: str, what: str) -> tuple[str, str, str] | None:
        """The newest entry whose name starts with ``stem`` (a name and ``@``, or a
        prefix): (name, generation, download URL), None if there is none."""
        key = self._root + stem
        answer = self._twirp("GetCacheEntryDownloadURL", {
            "key": key, "restore_keys": [key], "version": self._version}, what)
        matched, url = answer.get("matched_key"), answer.get("signed_download_url")
        if not answer.get("ok") or not isinstance(matched, str) or not matched.startswith(key):
            return None
        name, _, gen = matched[len(self._root):].rpartition("@")
        if not name or not _GEN_RE.fullmatch(gen):
            return None  # not one of ours
        if not isinstance(url, str) or not url.startswith(("https://", "http://")):
            raise err.RemoteError(f"{what} failed: the service answered no download URL")
        return name, gen, url

    def _found(self, name: str, what: str) -> str | None:
        """Object ``name``'s download URL (a listing's, else looked up), None if absent."""
        with self._urls_lock:
            kept = self._urls.pop(name, None)
        if kept is None and (found := self._find(f"{name}@", what)) is not None:
            kept = found[1:]
        return None if kept is None or kept[0].startswith("x") else kept[1]

    def _list(self, prefix: str) -> Iterator[StoredObject]:
        where = self._location(prefix)
        with self.within(f"listing {where}"):
            found = self._find(prefix, f"listing {where}")
            if found is None or found[1].startswith("x"):
                return
            obj = self._head(found[0], found[2])
        if obj is not None:
            with self._urls_lock:
                self._urls[obj.name] = found[1:]
            yield obj

    def _head(self, name: str, url: str) -> StoredObject | None:
        reply = self._request(f"checking {self._location(name)}", "HEAD", url)
        if reply.status == 404:
            return None
        if reply.status >= 300:
            raise self._refused(f"checking {self._location(name)}", reply, "the blob store")
        # An HTTP date, as Retry-After may be: its epoch seconds.
        modified = retry_after(reply.headers.get("Last-Modified"), now=0.0) or time.time()
        return StoredObject(name, int(reply.headers.get("Content-Length") or 0), modified)

    def _stat(self, name: str) -> StoredObject | None:
        url = self._found(name, f"checking {self._location(name)}")
        return None if url is None else self._head(name, url)

    def _touch(self, name: str) -> None:
        """Nothing: the service records each use of an entry itself (for its eviction)."""

    def _open_stream(self, name: str) -> Chunks | None:
        what = f"{'downloading' if name[:6] == 'blobs/' else 'reading'} {self._location(name)}"
        if (url := self._found(name, what)) is None:
            return None
        reply = self._request(what, "GET", url, stream=True)
        if reply.status == 404:
            return None
        if reply.status >= 300:
            raise self._refused(what, reply, "the blob store")
        return self._chunks(what, reply.stream)

    def _chunks(self, what: str, response: Any) -> Chunks:
        with contextlib.closing(response):
            try:
                while chunk := response.read(CHUNK):
                    yield chunk
            except (OSError, http.client.HTTPException) as exc:
                raise err.RemoteUnavailableError(self._redact(f"{what} failed: {exc}")) from None

    def _blob_present(self, name: str, sha256: str, size: int) -> bool:
        """Present only when its bytes were read here and hash to ``sha256``."""
        return blob_problem(self, sha256, size) is None

    def _put_blob(self, name: str, library: Path, sha256: str, size: int) -> None:
        try:
            self._write(name, "0", library, sha256)
        except _Exists:  # one being written (then right?), a wrong one: a newer generation
            if not (self._settled(name) and self._blob_present(name, sha256, size)):
                self._write(name, secrets.token_hex(8), library, sha256)

    def _put_manifest(self, name: str, data: bytes, *, create_only: bool) -> bool:
        if create_only:
            try:
                self._write(name, "0", data)
                return True
            except _Exists:
                if self._settled(name):
                    return False  # published by another writer
        # a rewrite; or generation 0 is hidden, or an upload that died unfinished
        self._write(name, secrets.token_hex(8), data)
        return True

    def _settled(self, name: str) -> bool:
        """After ``name@0`` was refused: whether another writer's ``name`` is visible (not
        hidden), waiting ~8 s (in the deadline) for one still being uploaded to be so."""
        found = None
        for pause in (0.0, 0.25, 0.5, 1.0, 2.0, 4.0):
            time.sleep(min(pause, self._budget(0.0)))
            if found := self._find(f"{name}@", f"publishing {self._location(name)}"):
                break
        return found is not None and not found[1].startswith("x")

    def _write(self, name: str, gen: str, source: bytes | Path, sha256: str | None = None
               ) -> None:
        """Create entry ``name@gen`` holding ``source`` (a file: of SHA-256 ``sha256``)."""
        key, what = f"{self._root}{name}@{gen}", f"uploading {self._location(name)}"
        md5, sha, size = hashlib.md5(usedforsecurity=False), hashlib.sha256(), 0
        with open(source, "rb") if isinstance(source, Path) else io.BytesIO(source) as f:
            for chunk in iter(lambda: f.read(CHUNK), b""):
                md5.update(chunk)
                sha.update(chunk)
                size += len(chunk)
        if sha256 is not None and sha.hexdigest() != sha256:
            raise err.RemoteIntegrityError(f"{what} failed: the library changed (sha256 "
                                           f"{sha.hexdigest()}, expected {sha256})")
        created = self._twirp("CreateCacheEntry", {"key": key, "version": self._version},
                              what)
        url = created.get("signed_upload_url") if created.get("ok") else None
        if not isinstance(url, str) or not url.startswith(("https://", "http://")):
            raise err.RemoteError(f"{what} failed: the service gave no upload URL "
                                  f"({self._redact(str(created.get('message') or '-'))})")
        with contextlib.ExitStack() as files:
            reply = self._request(what, "PUT", url, body=lambda: files.enter_context(
                open(source, "rb")) if isinstance(source, Path) else source, headers={
                "x-ms-blob-type": "BlockBlob", "x-ms-version": "2020-04-08",
                "Content-Type": "application/octet-stream", "Content-Length": str(size),
                "Content-MD5": base64.b64encode(md5.digest()).decode("ascii")})
        if reply.status >= 300:
            if b"Md5Mismatch" in reply.body:
                raise err.RemoteIntegrityError(f"{what} failed: the blob store received "
                                               "bytes that do not match their checksum")
            raise self._refused(what, reply, "the blob store")
        done = self._twirp("FinalizeCacheEntryUpload", {
            "key": key, "version": self._version, "size_bytes": str(size)}, what)
        if not done.get("ok"):
            raise err.RemoteError(f"{what} failed: the service did not finalize the entry "
                                  f"({self._redact(str(done.get('message') or '-'))})")
        with self._urls_lock:
            self._urls.pop(name, None)

    # -- what the service cannot do --------------------------------------------------------
    def _delete(self, name: str) -> None:
        if not getattr(self._local, "hiding", False):
            raise err.RemoteConfigError(f"cannot remove {self._location(name)}: {EVICTION}")
        self._write(name, "x" + secrets.token_hex(8), _HIDDEN)

    def quarantine(self, entry: RemoteEntry, why: str) -> str:
        """As :meth:`.base.Remote.quarantine`, the entry hidden by a removed generation."""
        self._local.hiding = True
        try:
            return super().quarantine(entry, why)
        finally:
            self._local.hiding = False


def _backoff(attempt: int) -> float:
    return float(min(10.0, 0.5 * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0))  # noqa: S311


def _twirp_detail(body: bytes) -> str:
    """``: <code>: <msg>`` of a Twirp error body (``: <Code>`` of Azure's), else ""."""
    with contextlib.suppress(ValueError):
        if isinstance(error := json.loads(body), dict) and isinstance(error.get("msg"), str):
            return f": {error.get('code')}: {error['msg'][:300]}"
    match = re.search(rb"<Code>([A-Za-z]{1,80})</Code>", body)
    return f": {match.group(1).decode()}" if match else ""


def _handler(https: bool, read_timeout: float, watch: Callable[[socket.socket], None]
             ) -> urllib.request.BaseHandler:
    """urllib's http(s) handler: connect in the request's timeout, read in ``read_timeout``."""
    base = urllib.request.HTTPSHandler if https else urllib.request.HTTPHandler
    conn = http.client.HTTPSConnection if https else http.client.HTTPConnection

    class Connection(conn):  # type: ignore[valid-type,misc]
        def connect(self) -> None:
            super().connect()
            self.sock.settimeout(read_timeout)
            watch(self.sock)

    def open_(self: Any, req: Any) -> Any:
        return self.do_open(Connection, req, **({"context": self._context} if https else {}))

    return type(f"Timed{base.__name__}", (base,),  # type: ignore[no-any-return]
                {"https_open" if https else "http_open": open_})()

