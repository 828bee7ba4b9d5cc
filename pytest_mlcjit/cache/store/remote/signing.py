"""Signed manifests: HMAC-SHA256 over the canonical JSON of a manifest without its
signature, with a secret only trusted writers and readers hold."""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping
from typing import Any

from pytest_mlcjit.key import canonical_json

#: The environment variable holding the secret that signs (and checks) remote manifests.
ENV_SIGNING_KEY = "MLC_JIT_REMOTE_SIGNING_KEY"


def signing_key_from_env() -> bytes | None:
    """The signing key of ``$MLC_JIT_REMOTE_SIGNING_KEY``, None when it is unset or empty."""
    value = os.environ.get(ENV_SIGNING_KEY)
    return value.encode("utf-8") if value else None

SIGNATURE_FIELD = "signature"


SIGNATURE_SCHEME = "hmac-sha256:"


# -- manifests and signatures ---------------------------------------------------------------
def manifest_signature(manifest: Mapping[str, Any], key: bytes) -> str:
    """``hmac-sha256:<hex>`` over the canonical JSON of ``manifest`` without its signature."""
    body = {k: v for k, v in manifest.items() if k != SIGNATURE_FIELD}
    mac = hmac.new(key, canonical_json(body).encode("utf-8"), hashlib.sha256)
    return SIGNATURE_SCHEME + mac.hexdigest()


def signature_problem(manifest: Mapping[str, Any], key: bytes) -> str | None:
    """Why ``manifest`` is not validly signed with ``key``, or None if it is."""
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
