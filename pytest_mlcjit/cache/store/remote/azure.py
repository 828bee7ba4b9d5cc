"""The Azure Blob Storage adapter: ``az://CONTAINER[/PREFIX]``, reached with
``azure-storage-blob`` (the ``azure`` extra), imported on first use.

**Credentials** never go in the URL; they come from the environment, as the Azure CLI
reads it, the first set (and not empty) winning: 1. ``AZURE_STORAGE_CONNECTION_STRING``;
2. ``AZURE_STORAGE_ACCOUNT`` with ``AZURE_STORAGE_KEY`` or ``AZURE_STORAGE_SAS_TOKEN`` (a
read-only SAS, permissions ``rl``, for pull-request jobs); 3. ``AZURE_STORAGE_ACCOUNT``
alone with ``azure-identity`` installed: ``DefaultAzureCredential`` (a managed identity,
workload identity federation, ``AZURE_CLIENT_ID``/``AZURE_TENANT_ID``/..., ``az login``).
The blob endpoint is ``AZURE_STORAGE_ACCOUNT_URL`` when set (another cloud, Azurite), else
``https://<account>.blob.core.windows.net``. None set: a :class:`RemoteConfigError` naming
the variables, at start (:func:`require_azure`).

**Create-only manifests**: ``upload_blob(overwrite=False)`` sends ``If-None-Match: *``;
the service answers 409 ``BlobAlreadyExists`` to all writers but the first: a lost race.

**Presence of a blob** (:meth:`AzureRemote._blob_present`): Azure keeps no checksum that
it verified and a writer cannot set: it checks a transactional ``Content-MD5`` on upload,
but the stored ``Content-MD5`` property and the metadata can be set to anything later by
anyone with write access (Set Blob Properties/Metadata, Put Block List), and
``blobs/<sha256>`` is predictable. So a blob is present only when it has the library's
size and our ``sha256`` metadata (one HEAD: most squatters fail here) **and its bytes,
read back and hashed, have that SHA-256**; else it is overwritten. The cost: reading a blob
an upload would reuse (same bytes under another key; a publisher that raced another).

**Uploads** send each request with a transactional MD5 (the service refuses bytes that do
not match it) and hash the bytes as the SDK reads them: bytes that are not the library's
(it changed meanwhile) remove the blob and fail the upload (RemoteIntegrityError).

**Time**: the options' connect and read timeouts; ``options.retries`` retries of a failed
request (backoff about 1 s, 3 s, 5 s); every request (a listing page, a 4 MiB range of a
download) within the operation's total deadline (:meth:`Remote.within`). **Errors**:
401/403 RemoteAuthError, a missing container RemoteConfigError, 429/5xx/timeouts/no
connection RemoteUnavailableError, a refused MD5 RemoteIntegrityError; messages never show
an account key, a SAS signature or a connection string (:func:`redact`).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import re
import socket
import threading
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from pytest_mlcjit.cache.store.remote.base import Chunks, Remote, RemoteOptions, StoredObject
from pytest_mlcjit.cache.store.remote.maintenance import blob_problem
from pytest_mlcjit.cache.store.remote.url import RemoteURL, object_path, redact_url
from pytest_mlcjit.errors import (
    BadURL,
    RemoteAuthError,
    RemoteConfigError,
    RemoteError,
    RemoteIntegrityError,
    RemoteUnavailableError,
)

#: How to install what an az:// remote needs.
EXTRA_HINT = 'pip install "pytest-mlcjit[azure]"'

CONNECTION_STRING_ENV = "AZURE_STORAGE_CONNECTION_STRING"
ACCOUNT_ENV = "AZURE_STORAGE_ACCOUNT"
KEY_ENV = "AZURE_STORAGE_KEY"
SAS_ENV = "AZURE_STORAGE_SAS_TOKEN"
ACCOUNT_URL_ENV = "AZURE_STORAGE_ACCOUNT_URL"

#: What to set, for messages.
CREDENTIALS_HINT = (f"set {CONNECTION_STRING_ENV}, or {ACCOUNT_ENV} with {KEY_ENV} or "
                    f"{SAS_ENV} (or {ACCOUNT_ENV} alone with azure-identity installed, for "
                    f"DefaultAzureCredential); {ACCOUNT_URL_ENV} names another blob endpoint")

#: A container's name: 3 to 63 lowercase letters, digits and single hyphens.
_CONTAINER_RE = re.compile(r"(?=.{3,63}\Z)[a-z0-9]+(?:-[a-z0-9]+)*")
_ACCOUNT_RE = re.compile(r"[a-z0-9]{3,24}")

_MAX_PREFIX = 800  #: a blob name has at most 1024 characters; ours add up to ~170

#: Every request reads at most this many bytes (one range of a download).
_RANGE = 4 << 20

#: Secrets a message may hold: a SAS's signature, a connection string's key or SAS.
_SIG_RE = re.compile(r"((?:^|[?&\s;])sig=)[^&\s\"'<;]*", re.IGNORECASE)
_CONN_SECRET_RE = re.compile(r"((?:AccountKey|SharedAccessSignature|SharedAccessKey)=)"
                             r"[^;\s\"'<]*", re.IGNORECASE)

_UNAVAILABLE_CODES = frozenset({"ServerBusy", "OperationTimedOut", "InternalError"})
_INTEGRITY_CODES = frozenset({"Md5Mismatch", "InvalidMd5", "Crc64Mismatch", "InvalidCrc64"})
#: What a create-only put that lost its race gets (any other 409/412 is an error).
_LOST_CODES = frozenset({"BlobAlreadyExists", "ConditionNotMet"})


def redact(text: str) -> str:
    """``text`` without credentials: URL userinfo and signed queries (:func:`redact_url`),
    SAS signatures (``sig=``), and the keys and SAS of connection strings."""
    return _CONN_SECRET_RE.sub(r"\1***", _SIG_RE.sub(r"\1***", redact_url(text)))


# -- credentials ----------------------------------------------------------------------------
@dataclass(frozen=True)
class AzureAuth:
    """How to reach the account, from the environment (:func:`auth_from_environment`)."""

    how: str  #: in words, for messages (names the variable, never its value)
    connection_string: str | None = field(default=None, repr=False)
    account_url: str | None = None
    account: str | None = None
    key: str | None = field(default=None, repr=False)
    sas: str | None = field(default=None, repr=False)


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # its parent package is missing
        return False


def auth_from_environment(environ: Mapping[str, str],
                          endpoint_url: str | None = None) -> AzureAuth:
    """The credentials and endpoint the environment gives (see the module docstring), or
    RemoteConfigError naming the variables. Imports nothing of the SDK."""
    def get(name: str) -> str:
        return environ.get(name, "").strip()

    if get(CONNECTION_STRING_ENV):
        return AzureAuth(f"${CONNECTION_STRING_ENV}", connection_string=get(CONNECTION_STRING_ENV))
    account, url = get(ACCOUNT_ENV), (endpoint_url or get(ACCOUNT_URL_ENV)).strip()
    if not account:
        raise RemoteConfigError(f"an az:// remote needs credentials, and none are set: "
                                f"{CREDENTIALS_HINT}")
    if not _ACCOUNT_RE.fullmatch(account):
        raise RemoteConfigError(f"${ACCOUNT_ENV} {account[:40]!r} is not a storage account name "
                                "(3 to 24 lowercase letters and digits)")
    if url:
        parts = urllib.parse.urlsplit(url)
        if (parts.scheme not in ("http", "https") or not parts.hostname or "@" in parts.netloc
                or parts.query or parts.fragment):
            raise RemoteConfigError(f"${ACCOUNT_URL_ENV} {redact(url)!r} is not a blob endpoint "
                                    "URL (https://ACCOUNT.blob.core.windows.net, without a "
                                    f"query: a SAS token goes in ${SAS_ENV})")
    else:
        url = f"https://{account}.blob.core.windows.net"
    if get(KEY_ENV):
        return AzureAuth(f"${ACCOUNT_ENV} and ${KEY_ENV}", account_url=url, account=account,
                         key=get(KEY_ENV))
    if get(SAS_ENV):
        return AzureAuth(f"${ACCOUNT_ENV} and ${SAS_ENV}", account_url=url, account=account,
                         sas=get(SAS_ENV).lstrip("?"))
    if _importable("azure.identity"):
        return AzureAuth(f"${ACCOUNT_ENV} and DefaultAzureCredential", account_url=url,
                         account=account)
    raise RemoteConfigError(f"${ACCOUNT_ENV} is set, but no credential for it: set {KEY_ENV} "
                            f"or {SAS_ENV}, or install azure-identity for "
                            f"DefaultAzureCredential (or set {CONNECTION_STRING_ENV} instead)")


def require_azure(environ: Mapping[str, str] | None = None) -> None:
    """RemoteConfigError unless azure-storage-blob is installed (not imported) and the
    environment gives credentials: when the option is read, so a usage error at start."""
    if not _importable("azure.storage.blob"):
        raise RemoteConfigError(f"an az:// remote needs azure-storage-blob, which is not "
                                f"installed: {EXTRA_HINT}")
    auth_from_environment(os.environ if environ is None else environ)


# -- errors ---------------------------------------------------------------------------------
def _code(exc: BaseException) -> str:
    code = getattr(exc, "error_code", None)
    return str(getattr(code, "value", code) or "")


def _detail(exc: BaseException) -> str:
    """The service's code, HTTP status and first line of message (no request details)."""
    status = getattr(exc, "status_code", None)
    message = str(getattr(exc, "message", None) or exc).strip().splitlines()
    text = ", ".join(p for p in (_code(exc), f"HTTP {status}" if status else "") if p)
    first = message[0] if message else type(exc).__name__
    return redact(f"{text}: {first}" if text else first)


def classify_azure_error(exc: BaseException, *, container: str, what: str) -> RemoteError:
    """The RemoteError for an exception of the Azure SDK raised while doing ``what`` (a
    phrase naming the action and the object's URL)."""
    from azure.core import exceptions as ax

    status, code, detail = getattr(exc, "status_code", None), _code(exc), _detail(exc)
    if isinstance(exc, ax.ClientAuthenticationError) or status in (401, 403):
        return RemoteAuthError(f"{what} was refused ({detail}); check the credentials "
                               f"({CREDENTIALS_HINT}: a key, a SAS token's permissions and "
                               "expiry) and the container's access")
    if code == "ContainerNotFound":
        return RemoteConfigError(f"{what} failed: container {container!r} does not exist; "
                                 f"create it (az storage container create --name {container}) "
                                 "or fix the remote URL and the account")
    if code in _INTEGRITY_CODES:
        return RemoteIntegrityError(f"{what} failed: the service received bytes that do not "
                                    f"match their checksum ({detail})")
    return _unavailable(exc, status, code, detail, what) or RemoteError(
        f"{what} failed ({type(exc).__name__}: {detail})")


def _unavailable(exc: BaseException, status: int | None, code: str, detail: str,
                 what: str) -> RemoteUnavailableError | None:
    from azure.core import exceptions as ax

    if isinstance(exc, ax.ResourceModifiedError):
        return RemoteUnavailableError(f"{what} failed: the object changed while it was read "
                                      f"({detail}); retry")
    if isinstance(exc, (ax.ServiceRequestError, ax.ServiceResponseError)):
        timed_out = "timed out" in str(exc).lower() or "timeout" in type(exc).__name__.lower()
        why = "timed out" if timed_out else "failed: the server cannot be reached"
        return RemoteUnavailableError(f"{what} {why} ({detail}); check the network and the "
                                      f"endpoint (${ACCOUNT_URL_ENV} or the connection "
                                      "string's BlobEndpoint), or raise the timeouts")
    if isinstance(exc, ax.HttpResponseError) and (
            status is None or status == 429 or status >= 500 or code in _UNAVAILABLE_CODES):
        return RemoteUnavailableError(f"{what} failed: the server is unavailable, throttling "
                                      f"or broke the connection ({detail}); retry later, or "
                                      "raise the retries")
    return None


class _HashingReader:
    """A library file as the SDK reads it (forward only), hashing what it hands out."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.sha256 = hashlib.sha256()
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data = self._f.read(size)
        self.sha256.update(data)
        self.count += len(data)
        return data


# -- the adapter ----------------------------------------------------------------------------
class AzureRemote(Remote):
    """A container (and blob-name prefix) of an Azure storage account (see the module
    docstring for credentials, presence, timeouts and errors)."""

    def __init__(self, url: RemoteURL, options: RemoteOptions) -> None:
        super().__init__(url, options)
        require_azure()  # nothing imported yet: the extra, then the credentials
        try:
            import requests  # noqa: PLC0415 - the SDK's own transport
            from azure.core.exceptions import AzureError
            from azure.core.pipeline.transport import RequestsTransport
            from azure.storage.blob import BlobServiceClient, ExponentialRetry
        except ImportError:
            raise RemoteConfigError(f"remote cache {url.redacted} needs azure-storage-blob, "
                                    f"which is not installed: {EXTRA_HINT}") from None
        auth = auth_from_environment(os.environ, options.endpoint_url)
        self.auth = auth.how
        session = requests.Session()
        session.hooks["response"].append(self._hang_up_at_deadline)
        kwargs: dict[str, Any] = {
            "transport": RequestsTransport(session=session, session_owner=True,
                                           connection_timeout=options.connect_timeout,
                                           read_timeout=options.read_timeout),
            "retry_policy": ExponentialRetry(initial_backoff=1, increment_base=2,
                                             retry_total=options.retries,
                                             random_jitter_range=1),
            "max_single_get_size": _RANGE, "max_chunk_get_size": _RANGE}
        try:
            if auth.connection_string is not None:
                service = BlobServiceClient.from_connection_string(auth.connection_string,
                                                                   **kwargs)
            else:
                service = BlobServiceClient(auth.account_url or "",
                                            credential=self._credential(auth), **kwargs)
        except (AzureError, ValueError, TypeError) as exc:
            source = (CONNECTION_STRING_ENV if auth.connection_string is not None
                      else f"{ACCOUNT_ENV}/{ACCOUNT_URL_ENV}")
            raise RemoteConfigError(f"remote cache {url.redacted} cannot be set up from "
                                    f"${source}: {redact(str(exc))}") from None
        self._container = service.get_container_client(url.bucket)
        self.endpoint = redact(urllib.parse.urlsplit(service.url)._replace(
            query="", fragment="").geturl().rstrip("/"))

    @staticmethod
    def _credential(auth: AzureAuth) -> Any:
        if auth.key is not None:
            from azure.core.credentials import AzureNamedKeyCredential

            return AzureNamedKeyCredential(auth.account or "", auth.key)
        if auth.sas is not None:
            from azure.core.credentials import AzureSasCredential

            return AzureSasCredential(auth.sas)
        identity = importlib.import_module("azure.identity")  # not typed, maybe absent
        return identity.DefaultAzureCredential()

    @classmethod
    def parse_url(cls, parts: urllib.parse.SplitResult) -> RemoteURL:
        if "@" in parts.netloc:
            raise BadURL(f"credentials do not belong in the URL ({CREDENTIALS_HINT})")
        if not parts.netloc:
            raise BadURL("it names no container")
        if not _CONTAINER_RE.fullmatch(parts.netloc):
            raise BadURL(f"{parts.netloc!r} is not a valid container name (3 to 63 "
                         "characters: lowercase letters, digits and single hyphens, starting "
                         "and ending with a letter or digit)")
        prefix, _ = object_path(parts.path)
        if len(prefix) > _MAX_PREFIX:
            raise BadURL(f"its prefix is longer than {_MAX_PREFIX} characters")
        return RemoteURL("az", parts.netloc, prefix, "",
                         f"az://{parts.netloc}/{prefix}".rstrip("/"))

    def describe(self) -> str:
        return f"remote cache {self.url} (endpoint {self.endpoint}, credentials from {self.auth})"

    # -- helpers -------------------------------------------------------------------------
    @contextlib.contextmanager
    def _calling(self, action: str, name: str) -> Iterator[None]:
        """Map the SDK's exceptions raised inside to RemoteError, naming the object."""
        from azure.core.exceptions import AzureError

        try:
            yield
        except AzureError as exc:
            what = f"{action} {self._location(name)} (endpoint {self.endpoint})"
            raise classify_azure_error(exc, container=self.remote_url.bucket,
                                       what=what) from None

    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` (requests) in a thread of its own that has this one's
        deadline, given up when it expires (:meth:`_hang_up_at_deadline`)."""
        deadline = self.current_deadline()
        if deadline is None:
            return fn(*args, **kwargs)
        done, box = threading.Event(), {}

        def call() -> None:
            self._local.deadline = deadline
            try:
                box["value"] = fn(*args, **kwargs)
            except BaseException as exc:
                box["error"] = exc
            finally:
                done.set()

        threading.Thread(target=call, name="mlcjit-azure-request", daemon=True).start()
        if not done.wait(deadline.remaining()):
            deadline.expire()
            raise RemoteUnavailableError("deadline")  # worded by Remote.within
        if "error" in box:
            raise box["error"]
        return box["value"]

    def _hang_up_at_deadline(self, response: Any, *args: Any, **kwargs: Any) -> Any:
        """A hook of the requests session, called before a body is read: when the
        operation's deadline expires while the body is still being read (each byte of a
        trickle resets the read timeout), its socket is shut down and the read returns."""
        deadline, raw = self.current_deadline(), getattr(response, "raw", None)
        conn = getattr(raw, "connection", None)
        if deadline is not None and conn is not None:
            def hang_up() -> None:
                sock = getattr(conn, "sock", None)
                if sock is not None and getattr(raw, "connection", None) is conn:  # in use
                    sock.shutdown(socket.SHUT_RDWR)
            deadline.on_expiry(hang_up)
        return response

    def _blob(self, name: str) -> Any:
        return self._container.get_blob_client(self.remote_url.prefix + name)

    @contextlib.contextmanager
    def _absent_is_none(self) -> Iterator[None]:  # a 404 of the object, not the container
        from azure.core.exceptions import ResourceNotFoundError

        try:
            yield
        except ResourceNotFoundError as exc:
            if _code(exc) == "ContainerNotFound":
                raise

    def _properties(self, name: str) -> Any:
        """The blob's properties, None if it is absent."""
        with self._calling("checking", name), self._absent_is_none():
            return self._call(self._blob(name).get_blob_properties)
        return None

    # -- storage primitives --------------------------------------------------------------
    def _location(self, name: str) -> str:
        return f"az://{self.remote_url.bucket}/{self.remote_url.prefix}{name}"

    def _list(self, prefix: str) -> Iterator[StoredObject]:
        skip = len(self.remote_url.prefix)
        with self._calling("listing", prefix):
            pages = self._container.list_blobs(
                name_starts_with=self.remote_url.prefix + prefix,
                results_per_page=1000).by_page()

        def fetch() -> list[Any] | None:
            page = next(pages, None)
            return None if page is None else list(page)

        while True:
            # Each page (up to 1000 objects) within its own deadline.
            with self.within(f"listing {self._location(prefix)}"), \
                    self._calling("listing", prefix):
                page = self._call(fetch)
            if page is None:
                return
            for blob in page:
                yield StoredObject(blob.name[skip:], int(blob.size),
                                   blob.last_modified.timestamp())

    def _open_stream(self, name: str) -> Chunks | None:
        # A failure mid-body names what was being fetched: a blob is downloaded, anything
        # else (a manifest, through Remote._read) is read.
        action = "downloading" if name.startswith("blobs/") else "reading"
        with self._calling(action, name), self._absent_is_none():
            downloader = self._call(self._blob(name).download_blob, max_concurrency=1)
            return self._chunks(action, name, downloader)
        return None

    def _chunks(self, action: str, name: str, downloader: Any) -> Chunks:
        # Each range is a request of its own, within the operation's deadline.
        with self._calling(action, name):
            chunks = downloader.chunks()
            while (chunk := self._call(next, chunks, None)) is not None:
                yield chunk

    def _blob_present(self, name: str, sha256: str, size: int) -> bool:
        # See the module docstring: properties and metadata prove nothing, the bytes do.
        props = self._properties(name)
        if props is None or props.size != size or (props.metadata or {}).get(
                "sha256") != sha256:
            return False
        return blob_problem(self, sha256, size) is None  # read back and hashed

    def _stat(self, name: str) -> StoredObject | None:
        props = self._properties(name)
        if props is None:
            return None
        return StoredObject(name, int(props.size), props.last_modified.timestamp())

    def _touch(self, name: str) -> None:
        # Setting the metadata again gives the blob a new Last-Modified; only if its ETag
        # is unchanged (a blob replaced meanwhile is new anyway).
        from azure.core import MatchConditions
        from azure.core.exceptions import ResourceModifiedError

        props = self._properties(name)
        if props is None:
            return
        with self._calling("touching", name), self._absent_is_none(), \
                contextlib.suppress(ResourceModifiedError):
            self._call(self._blob(name).set_blob_metadata, props.metadata or {},
                       etag=props.etag, match_condition=MatchConditions.IfNotModified)

    def _put_blob(self, name: str, library: Path, sha256: str, size: int) -> None:
        from azure.storage.blob import ContentSettings

        with open(library, "rb") as f, self._calling("uploading", name):
            reader = _HashingReader(f)
            self._call(self._blob(name).upload_blob, reader, length=size, overwrite=True,
                       validate_content=True, max_concurrency=1, metadata={"sha256": sha256},
                       content_settings=ContentSettings(
                           content_type="application/octet-stream"))
        if reader.count != size or reader.sha256.hexdigest() != sha256:
            with contextlib.suppress(RemoteError):
                self._delete(name)
            raise RemoteIntegrityError(
                f"uploading {self._location(name)} failed: the bytes sent ({reader.count}, "
                f"sha256 {reader.sha256.hexdigest()}) are not the library's ({size}, sha256 "
                f"{sha256}): {library} changed while it was uploaded; the blob was removed")

    def _put_manifest(self, name: str, data: bytes, *, create_only: bool) -> bool:
        from azure.core.exceptions import ResourceExistsError, ResourceModifiedError
        from azure.storage.blob import ContentSettings

        with self._calling("publishing", name):
            try:
                # overwrite=False: If-None-Match: *, atomic on the service.
                self._call(self._blob(name).upload_blob, data, overwrite=not create_only,
                           validate_content=True,
                           content_settings=ContentSettings(content_type="application/json"))
            except (ResourceExistsError, ResourceModifiedError) as exc:
                # Lost to another publisher (or to our own write, when the SDK retried a
                # request whose answer was lost): the manifest there is whole either way.
                if create_only and _code(exc) in _LOST_CODES:
                    return False
                raise
        return True

    def _delete(self, name: str) -> None:
        with self._calling("removing", name), self._absent_is_none():
            self._call(self._blob(name).delete_blob, delete_snapshots="include")
