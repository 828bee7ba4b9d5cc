"""Remote URLs: the parsed form every adapter gives, and redaction for messages."""

from __future__ import annotations

import re
from typing import NamedTuple

from pytest_mlcjit.errors import BadURL

_USERINFO_RE = re.compile(r"(?<=//)[^/@\s\"']*@")

_SECRET_QUERY_RE = re.compile(
    r"((?:X-Amz-(?:Signature|Credential|Security-Token)|Signature|AWSAccessKeyId|sig)=)[^&\s\"']*",
    re.IGNORECASE,
)


# -- URLs -----------------------------------------------------------------------------------
def redact_url(text: str) -> str:
    """``text`` with any ``user:password@`` of a URL and signed query values replaced by
    ``***``, for messages and logs."""
    return _SECRET_QUERY_RE.sub(r"\1***", _USERINFO_RE.sub("***@", text))


class RemoteURL(NamedTuple):
    """A parsed remote location, as its adapter parsed it (see
    :func:`pytest_mlcjit.cache.store.remote.parse_remote_url`)."""

    scheme: str  #: the URL's scheme, which names the adapter (``s3``, ``file``)
    bucket: str  #: the bucket or container, "" where there is none
    prefix: str  #: the key prefix under it, "" or ending in "/"
    path: str  #: a local directory (``file``), "" elsewhere
    redacted: str  #: the URL in canonical form: safe to show, it never holds credentials


def object_path(prefix: str) -> tuple[str, list[str]]:
    """``prefix`` (a URL's path) as a key prefix ("" or ending in "/") and its segments;
    BadURL for empty, ``.`` or ``..`` segments."""
    segments = [s for s in prefix.split("/") if s]
    if "//" in prefix.strip("/") or any(s in (".", "..") for s in segments):
        raise BadURL("its prefix has empty, '.' or '..' segments")
    return "".join(f"{s}/" for s in segments), segments
