"""The S3 adapter: a bucket (and key prefix) reached with boto3, imported on first use."""

from __future__ import annotations

import base64
import contextlib
import importlib.util
import re
import socket
import threading
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from pytest_mlcjit.cache.store.remote.base import (
    CHUNK,
    Chunks,
    Remote,
    RemoteOptions,
    StoredObject,
)
from pytest_mlcjit.cache.store.remote.url import RemoteURL, object_path, redact_url
from pytest_mlcjit.errors import (
    BadURL,
    RemoteAuthError,
    RemoteConfigError,
    RemoteError,
    RemoteIntegrityError,
    RemoteUnavailableError,
)

#: How to install what an S3 remote needs.
EXTRA_HINT = 'pip install "pytest-mlcjit[remote]"'


def require_boto3() -> None:
    """RemoteConfigError naming the extra unless boto3 is importable (checked without
    importing it)."""
    if importlib.util.find_spec("boto3") is None:
        raise RemoteConfigError(f"an s3:// remote needs boto3, which is not installed: "
                                f"{EXTRA_HINT}")


_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


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

    def __init__(self, url: RemoteURL, options: RemoteOptions) -> None:
        super().__init__(url, options)
        try:
            import boto3  # type: ignore[import-untyped]
            from botocore.config import Config  # type: ignore[import-untyped]
            from botocore.exceptions import BotoCoreError  # type: ignore[import-untyped]
        except ImportError:
            raise RemoteConfigError(f"remote cache {url.redacted} needs boto3, which is not "
                                    f"installed: {EXTRA_HINT}") from None
        config = Config(connect_timeout=options.connect_timeout,
                        read_timeout=options.read_timeout,
                        retries={"max_attempts": options.retries, "mode": "standard"})
        try:
            session = boto3.session.Session()
            self._client = session.client("s3", region_name=session.region_name or "us-east-1",
                                          endpoint_url=options.endpoint_url,
                                          config=config)
        except (BotoCoreError, ValueError) as exc:
            raise RemoteConfigError(f"remote cache {url.redacted} cannot be set up: "
                                    f"{redact_url(str(exc))}") from None
        self.endpoint = redact_url(str(self._client.meta.endpoint_url))

    @classmethod
    def parse_url(cls, parts: urllib.parse.SplitResult) -> RemoteURL:
        if "@" in parts.netloc:
            raise BadURL("credentials do not belong in the URL (use the AWS_* environment "
                         "variables or a profile)")
        if not _BUCKET_RE.fullmatch(parts.netloc) or ".." in parts.netloc:
            raise BadURL(f"{parts.netloc!r} is not a valid bucket name (3 to 63 characters: "
                         "lowercase letters, digits, '.' and '-')")
        prefix, _ = object_path(parts.path)
        return RemoteURL("s3", parts.netloc, prefix, "",
                         f"s3://{parts.netloc}/{prefix}".rstrip("/"))

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
            pages = iter(self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.remote_url.bucket, Prefix=self._key(prefix)))
        while True:
            # Each page (up to 1000 objects) within its own deadline.
            with self.within(f"listing {self._location(prefix)}"), \
                    self._calling("listing", prefix):
                page = self._call(next, pages, None)
            if page is None:
                return
            for obj in page.get("Contents", ()):
                yield StoredObject(obj["Key"][skip:], int(obj["Size"]),
                                   obj["LastModified"].timestamp())

    def _get(self, name: str) -> Any:
        """The get_object response, None if the object is absent."""
        from botocore.exceptions import ClientError

        with self._calling("reading", name):
            try:
                return self._call(self._client.get_object, Bucket=self.remote_url.bucket,
                                  Key=self._key(name))
            except ClientError as exc:
                if _error_code(exc) in ("NoSuchKey", "404"):
                    return None
                raise

    def _open_stream(self, name: str) -> Chunks | None:
        response = self._get(name)
        if response is None:
            return None
        # A failure mid-body names what was being fetched: a blob is downloaded, anything
        # else (a manifest, through Remote._read) is read.
        action = "downloading" if name.startswith("blobs/") else "reading"
        return self._chunks(action, name, response["Body"])

    def _chunks(self, action: str, name: str, body: Any) -> Chunks:
        deadline = self.current_deadline()
        if deadline is not None:  # a read that waits for a trickle returns when it expires
            deadline.on_expiry(lambda: _hang_up(body))
        with contextlib.closing(body), self._calling(action, name):
            yield from body.iter_chunks(CHUNK)

    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``, a request to the server, given up when the operation's
        deadline expires (:meth:`Remote.within`): botocore's timeouts bound each read, not
        a server that trickles. The request runs in a thread of its own, which is left to
        botocore's read timeout when the deadline expires."""
        deadline = self.current_deadline()
        if deadline is None:
            return fn(*args, **kwargs)
        done, box = threading.Event(), {}

        def call() -> None:
            try:
                box["value"] = fn(*args, **kwargs)
            except BaseException as exc:
                box["error"] = exc
            finally:
                done.set()

        threading.Thread(target=call, name="mlcjit-remote-request", daemon=True).start()
        if not done.wait(deadline.remaining()):
            deadline.expire()
            raise RemoteUnavailableError("deadline")  # worded by Remote.within
        if "error" in box:
            raise box["error"]
        return box["value"]

    def _head(self, name: str) -> Any:
        """The head_object answer (with the object's checksum), None if it is absent."""
        from botocore.exceptions import ClientError

        with self._calling("checking", name):
            try:
                return self._call(self._client.head_object, Bucket=self.remote_url.bucket,
                                  Key=self._key(name), ChecksumMode="ENABLED")
            except ClientError as exc:
                if _error_code(exc) in ("NoSuchKey", "404"):
                    return None
                raise

    def _blob_present(self, name: str, sha256: str, size: int) -> bool:
        # Present only with the SHA-256 checksum S3 verified on write (our uploads send
        # it): an object of the right size without one may be anyone's bytes.
        head = self._head(name)
        return bool(head is not None and head.get("ContentLength") == size
                    and head.get("ChecksumSHA256") == _b64_sha256(sha256))

    def _stat(self, name: str) -> StoredObject | None:
        head = self._head(name)
        if head is None:
            return None
        return StoredObject(name, int(head.get("ContentLength") or 0),
                            head["LastModified"].timestamp())

    def _touch(self, name: str) -> None:
        # A copy onto itself, new metadata: S3 gives it a new LastModified (and computes
        # its SHA-256 checksum again from the stored bytes). Absent: nothing to touch.
        from botocore.exceptions import ClientError

        with self._calling("touching", name):
            try:
                self._call(self._client.copy_object, Bucket=self.remote_url.bucket,
                           Key=self._key(name), MetadataDirective="REPLACE",
                           CopySource={"Bucket": self.remote_url.bucket,
                                       "Key": self._key(name)},
                           ChecksumAlgorithm="SHA256", ContentType="application/octet-stream")
            except ClientError as exc:
                if _error_code(exc) not in ("NoSuchKey", "404"):
                    raise

    def _put_blob(self, name: str, library: Path, sha256: str, size: int) -> None:
        # S3 checks the bytes it receives against ChecksumSHA256 (BadDigest otherwise) and
        # keeps it: what _blob_present asks for.
        with open(library, "rb") as f, self._calling("uploading", name):
            self._call(self._client.put_object, Bucket=self.remote_url.bucket,
                       Key=self._key(name), Body=f, ContentLength=size,
                       ChecksumAlgorithm="SHA256", ChecksumSHA256=_b64_sha256(sha256),
                       ContentType="application/octet-stream")

    def _put_manifest(self, name: str, data: bytes, *, create_only: bool) -> bool:
        from botocore.exceptions import ClientError

        condition = {"IfNoneMatch": "*"} if create_only else {}
        with self._calling("publishing", name):
            try:
                self._call(self._client.put_object, Bucket=self.remote_url.bucket,
                           Key=self._key(name), Body=data, ContentType="application/json",
                           **condition)
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


def _hang_up(body: Any) -> None:
    """Shut the socket of a response body down (from another thread): a read blocked on
    it returns at once, and the reader sees the body end early."""
    raw = getattr(body, "_raw_stream", None)  # botocore's StreamingBody: urllib3's response
    sock = getattr(getattr(raw, "connection", None), "sock", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _b64_sha256(hex_digest: str) -> str:

    return base64.b64encode(bytes.fromhex(hex_digest)).decode("ascii")
