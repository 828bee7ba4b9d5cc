"""Signed manifests, and the keys that sign and verify them.

Two schemes, both over the canonical JSON of a manifest without its ``signature`` field:

- **Ed25519** (recommended; the ``sign`` extra: ``cryptography``): a writer signs with its
  private key, every reader verifies with the public keys it trusts. The signature is
  ``ed25519:<key id>:<base64>``; the key id is the first 16 hex digits of the SHA-256 of
  the raw 32-byte public key (:func:`key_id`). A job that holds only public keys verifies
  everything it loads and cannot sign; revoking a writer is removing its public key.
- **HMAC-SHA256** (``hmac-sha256:<hex>``): one shared secret signs and verifies, as before.

Where the keys come from (:func:`keys_from_env`):

``MLC_JIT_REMOTE_SIGNING_KEY``
    PEM text (starting with ``-----BEGIN``) of an Ed25519 private key, or the path of a
    file holding one (a value ending in ``.pem``, or naming an existing file): uploads are
    signed with Ed25519, and the key's own public key is trusted. Any other value is an
    HMAC secret (uploads signed with it, and only manifests signed with it accepted),
    except one holding ``-----BEGIN`` elsewhere (PEM text with text around it: an error).
``MLC_JIT_REMOTE_TRUSTED_KEYS``
    Ed25519 public keys: PEM text holding one or more ``PUBLIC KEY`` blocks, and/or paths
    of PEM files holding them, separated by newlines or ``os.pathsep``.

A variable that is set but empty, a malformed PEM, a path that names no file, a public
key given as the signing key, a private key given as a trusted one: RemoteConfigError
naming the variable (never the secret itself) and what was expected.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pytest_mlcjit.errors import RemoteConfigError
from pytest_mlcjit.key import canonical_json

#: The environment variable holding the key that signs remote manifests (HMAC secret or
#: Ed25519 private key).
ENV_SIGNING_KEY = "MLC_JIT_REMOTE_SIGNING_KEY"
#: The environment variable holding the Ed25519 public keys readers trust.
ENV_TRUSTED_KEYS = "MLC_JIT_REMOTE_TRUSTED_KEYS"

SIGNATURE_FIELD = "signature"

SIGNATURE_SCHEME = "hmac-sha256:"
ED25519_SCHEME = "ed25519:"

#: How to install what Ed25519 signatures need.
SIGN_EXTRA_HINT = 'pip install "pytest-mlcjit[sign]"'

_KEY_ID_RE = re.compile(r"[0-9a-f]{16}")
_HMAC_RE = re.compile(r"hmac-sha256:[0-9a-f]{64}")
_PEM_RE = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----.*?-----END \1-----", re.DOTALL)
_ED25519_KEY_BYTES = 32
_ED25519_SIG_BYTES = 64
#: A PEM file larger than this is not a key.
_MAX_PEM_BYTES = 1 << 20

_SIGNING_EXPECTED = ("expected an Ed25519 private key (PEM text, or the path of a .pem file "
                     "holding one) or an HMAC secret; unset the variable to sign nothing")
_TRUSTED_EXPECTED = ("expected Ed25519 public keys: PEM text with one or more PUBLIC KEY "
                     f"blocks, or paths of PEM files, separated by newlines or {os.pathsep!r}")


def key_id(public_key: bytes) -> str:
    """The id of a raw 32-byte Ed25519 public key: the first 16 hex digits of its SHA-256."""
    return hashlib.sha256(public_key).hexdigest()[:16]


def _signed_text(manifest: Mapping[str, Any]) -> bytes:
    body = {k: v for k, v in manifest.items() if k != SIGNATURE_FIELD}
    return canonical_json(body).encode("utf-8")


# -- HMAC ------------------------------------------------------------------------------------
def manifest_signature(manifest: Mapping[str, Any], key: bytes) -> str:
    """``hmac-sha256:<hex>`` over the canonical JSON of ``manifest`` without its signature."""
    mac = hmac.new(key, _signed_text(manifest), hashlib.sha256)
    return SIGNATURE_SCHEME + mac.hexdigest()


def signature_problem(manifest: Mapping[str, Any], key: bytes) -> str | None:
    """Why ``manifest`` is not validly signed with the HMAC ``key``, or None if it is."""
    return ManifestKeys(key).problem(manifest)


def _hmac_problem(given: str, manifest: Mapping[str, Any], key: bytes) -> str | None:
    if not _HMAC_RE.fullmatch(given):  # junk (a lone surrogate has no bytes to compare)
        return f"has a malformed signature (expected {SIGNATURE_SCHEME}<64 hex digits>)"
    try:
        expected = manifest_signature(manifest, key)
    except ValueError:  # not JSON-able (NaN): it cannot have been signed
        return "cannot be signed (not canonical JSON)"
    if not hmac.compare_digest(given.encode(), expected.encode()):
        return "has a signature that does not match its content and the signing key"
    return None


# -- the keys of one remote ------------------------------------------------------------------
class ManifestKeys:
    """The keys a remote signs uploads with and verifies downloads with.

    ``hmac_key``: an HMAC secret (signs, and verifies HMAC signatures); ``ed25519_key``:
    a raw 32-byte Ed25519 private key (signs; its public key is trusted); ``trusted``:
    raw 32-byte Ed25519 public keys whose signatures are accepted. With none of them
    nothing is signed and nothing is verified."""

    def __init__(self, hmac_key: bytes | None = None, ed25519_key: bytes | None = None,
                 trusted: Iterable[bytes] = ()) -> None:
        self._hmac = hmac_key
        self._private: Any = None
        #: The key id this remote signs with (Ed25519), else None.
        self.signer_id: str | None = None
        #: key id -> public key object, the keys whose signatures are accepted.
        self.trusted: dict[str, Any] = {}
        publics = list(trusted)
        if ed25519_key is not None or publics:
            ed = _ed25519("signing with Ed25519 keys")
            if ed25519_key is not None:
                self._private = ed.Ed25519PrivateKey.from_private_bytes(ed25519_key)
                publics.append(_raw_public(self._private.public_key()))
            for raw in publics:
                self.trusted[key_id(raw)] = ed.Ed25519PublicKey.from_public_bytes(raw)
            if self._private is not None:
                self.signer_id = key_id(_raw_public(self._private.public_key()))

    @property
    def signs(self) -> bool:
        """Whether uploads are signed."""
        return self._hmac is not None or self._private is not None

    @property
    def verifies(self) -> bool:
        """Whether downloads require a valid signature."""
        return self._hmac is not None or bool(self.trusted)

    def sign(self, manifest: Mapping[str, Any]) -> str | None:
        """The signature of ``manifest`` (its ``signature`` field ignored), None if this
        remote does not sign. ValueError if it is not canonical JSON (NaN)."""
        if self._private is not None:
            signature = self._private.sign(_signed_text(manifest))
            return (f"{ED25519_SCHEME}{self.signer_id}:"
                    f"{base64.b64encode(signature).decode('ascii')}")
        if self._hmac is not None:
            return manifest_signature(manifest, self._hmac)
        return None

    def problem(self, manifest: Mapping[str, Any]) -> str | None:
        """Why ``manifest`` must not be used (its signature), None if it may be (always,
        when this remote does not verify)."""
        if not self.verifies:
            return None
        given = manifest.get(SIGNATURE_FIELD)
        if given is None:
            return self._unsigned()
        if isinstance(given, str) and given.startswith(ED25519_SCHEME):
            return self._ed25519_problem(given, manifest)
        if isinstance(given, str) and given.startswith(SIGNATURE_SCHEME):
            if self._hmac is None:
                return (f"is signed with an HMAC secret, and this job verifies Ed25519 "
                        f"signatures only (the keys of {ENV_TRUSTED_KEYS})")
            return _hmac_problem(given, manifest, self._hmac)
        return (f"has a malformed signature (expected {ED25519_SCHEME}<key id>:<base64> or "
                f"{SIGNATURE_SCHEME}<hex>)")

    def _unsigned(self) -> str:
        if not self.trusted:
            return "is unsigned, and a signing key is set: only signed manifests are trusted"
        by = f"trusted keys {', '.join(sorted(self.trusted))} ({ENV_TRUSTED_KEYS})"
        if self._hmac is not None:
            by += " and an HMAC signing key"
        return f"is unsigned, and signatures are required ({by}): only signed manifests are trusted"

    def _ed25519_problem(self, given: str, manifest: Mapping[str, Any]) -> str | None:
        kid, _, encoded = given[len(ED25519_SCHEME):].partition(":")
        try:
            signature = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            signature = b""
        if not _KEY_ID_RE.fullmatch(kid) or len(signature) != _ED25519_SIG_BYTES:
            return f"has a malformed signature (expected {ED25519_SCHEME}<key id>:<base64>)"
        public = self.trusted.get(kid)
        if public is None:
            trusted = ", ".join(sorted(self.trusted)) or "none"
            return (f"has a signature by unknown key id {kid}: not one of the trusted keys "
                    f"({trusted}; {ENV_TRUSTED_KEYS}), so it is unknown or revoked")
        from cryptography.exceptions import InvalidSignature

        try:
            public.verify(signature, _signed_text(manifest))
        except InvalidSignature:
            return (f"has a signature by key id {kid} that does not match its content "
                    "(forged, or edited after it was signed)")
        except ValueError:
            return "cannot be signed (not canonical JSON)"
        return None


def _ed25519(what: str) -> Any:
    """cryptography's Ed25519 module; RemoteConfigError naming the extra if missing."""
    try:
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise RemoteConfigError(f"{what} needs the cryptography package, which is not "
                                f"installed: {SIGN_EXTRA_HINT}") from None
    return ed25519


def _raw_public(public: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    raw: bytes = public.public_bytes(serialization.Encoding.Raw,
                                     serialization.PublicFormat.Raw)
    return raw


# -- keys from text: the environment variables ------------------------------------------------
def _bad(source: str, why: str, expected: str) -> RemoteConfigError:
    return RemoteConfigError(f"invalid {source}: {why}; {expected}")


def _read_pem_file(source: str, path: str, expected: str) -> str:
    file = Path(path).expanduser()
    try:
        with open(file, "rb") as f:
            data = f.read(_MAX_PEM_BYTES + 1)
    except FileNotFoundError:
        raise _bad(source, f"{path!r} names no file", expected) from None
    except OSError as exc:
        raise _bad(source, f"{path!r} cannot be read ({exc.strerror or exc})",
                   expected) from None
    if len(data) > _MAX_PEM_BYTES:
        raise _bad(source, f"{path!r} is larger than {_MAX_PEM_BYTES} bytes: not a PEM key",
                   expected)
    try:
        return data.decode("ascii")
    except UnicodeDecodeError:
        raise _bad(source, f"{path!r} is not a PEM file (not ASCII text)", expected) from None


def _is_path(text: str) -> bool:
    return text.lower().endswith(".pem") or os.path.isfile(os.path.expanduser(text))


def parse_signing_key(source: str, text: str) -> tuple[bytes | None, bytes | None]:
    """``MLC_JIT_REMOTE_SIGNING_KEY``'s value as ``(HMAC secret, raw Ed25519 private
    key)``, one of them None (see the module's docstring for the rule)."""
    if not text.strip():
        raise _bad(source, "it is set but empty (an empty key signs nothing)",
                   _SIGNING_EXPECTED)
    stripped = text.strip()
    if "-----BEGIN" in stripped:  # PEM text (with text around it: an error, not a secret)
        return None, _private_from_pem(source, stripped, "its PEM text")
    if "\n" not in stripped and _is_path(stripped):
        pem = _read_pem_file(source, stripped, _SIGNING_EXPECTED).strip()
        return None, _private_from_pem(source, pem, repr(stripped))
    return text.encode("utf-8"), None


def _private_from_pem(source: str, pem: str, where: str) -> bytes:
    blocks = list(_PEM_RE.finditer(pem))
    if len(blocks) != 1 or blocks[0].group(0) != pem:
        raise _bad(source, f"{where} is not one whole PEM block", _SIGNING_EXPECTED)
    kind = blocks[0].group(1)
    if "PUBLIC" in kind:
        raise _bad(source, f"{where} is a public key, which verifies but cannot sign: give "
                   f"public keys to {ENV_TRUSTED_KEYS}", _SIGNING_EXPECTED)
    _ed25519(f"{source} (an Ed25519 key)")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    try:
        key = serialization.load_pem_private_key(pem.encode("ascii"), password=None)
    except TypeError:
        raise _bad(source, f"{where} is an encrypted private key", _SIGNING_EXPECTED) from None
    except Exception:  # ValueError, UnsupportedAlgorithm: not a usable key
        raise _bad(source, f"{where} is a malformed or unsupported PEM {kind.lower()}",
                   _SIGNING_EXPECTED) from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise _bad(source, f"{where} is a {type(key).__name__.removeprefix('_')}, not an "
                   "Ed25519 key (make one with: openssl genpkey -algorithm ed25519)",
                   _SIGNING_EXPECTED)
    raw: bytes = key.private_bytes(serialization.Encoding.Raw,
                                   serialization.PrivateFormat.Raw,
                                   serialization.NoEncryption())
    return raw


def parse_trusted_keys(source: str, text: str) -> tuple[bytes, ...]:
    """``MLC_JIT_REMOTE_TRUSTED_KEYS``'s value as raw 32-byte Ed25519 public keys, in the
    order given, without repeats (see the module's docstring for the form)."""
    if not text.strip():
        raise _bad(source, "it is set but empty (it would trust no key)", _TRUSTED_EXPECTED)
    keys: list[bytes] = []
    for where, pem in _pem_sources(source, text):
        for raw in _publics_from_pem(source, pem, where):
            if raw not in keys:
                keys.append(raw)
    if not keys:  # separators only ("$A:$B" with both unset): it would verify nothing
        raise _bad(source, "it names no key", _TRUSTED_EXPECTED)
    return tuple(keys)


def _pem_sources(source: str, text: str) -> list[tuple[str, str]]:
    """(where, PEM text) for the blocks written in ``text`` and each file it names, in
    the order given."""
    found: list[tuple[str, str]] = []
    at = 0
    for block in [*_PEM_RE.finditer(text), None]:
        between = text[at:None if block is None else block.start()]
        for item in re.split(f"[\n{re.escape(os.pathsep)}]", between):
            path = item.strip()
            if "-----" in path:
                raise _bad(source, "it holds a malformed PEM block (no matching END line)",
                           _TRUSTED_EXPECTED)
            if path:
                found.append((repr(path), _read_pem_file(source, path, _TRUSTED_EXPECTED)))
        if block is not None:
            found.append(("its PEM text", block.group(0)))
            at = block.end()
    return found


def _publics_from_pem(source: str, pem: str, where: str) -> list[bytes]:
    blocks = list(_PEM_RE.finditer(pem))
    if not blocks or _PEM_RE.sub("", pem).strip():
        raise _bad(source, f"{where} is not PEM text (one or more PUBLIC KEY blocks)",
                   _TRUSTED_EXPECTED)
    _ed25519(f"{source} (Ed25519 keys)")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    keys = []
    for block in blocks:
        if block.group(1) != "PUBLIC KEY":
            raise _bad(source, f"{where} holds a {block.group(1)} block; trust public keys "
                       "only (openssl pkey -in key.pem -pubout)", _TRUSTED_EXPECTED)
        try:
            key = serialization.load_pem_public_key(block.group(0).encode("ascii"))
        except Exception:  # ValueError, UnsupportedAlgorithm
            raise _bad(source, f"{where} holds a malformed or unsupported PUBLIC KEY block",
                       _TRUSTED_EXPECTED) from None
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise _bad(source, f"{where} holds a {type(key).__name__.removeprefix('_')}, not "
                       "an Ed25519 public key", _TRUSTED_EXPECTED)
        keys.append(_raw_public(key))
    return keys


def keys_from_env(environ: Mapping[str, str] | None = None
                  ) -> tuple[bytes | None, bytes | None, tuple[bytes, ...]]:
    """``(HMAC secret, raw Ed25519 private key, raw trusted public keys)`` from
    ``MLC_JIT_REMOTE_SIGNING_KEY`` and ``MLC_JIT_REMOTE_TRUSTED_KEYS``; RemoteConfigError
    for a bad or set-but-empty value."""
    env = os.environ if environ is None else environ
    hmac_key = private = None
    if (text := env.get(ENV_SIGNING_KEY)) is not None:
        hmac_key, private = parse_signing_key(ENV_SIGNING_KEY, text)
    trusted: tuple[bytes, ...] = ()
    if (text := env.get(ENV_TRUSTED_KEYS)) is not None:
        trusted = parse_trusted_keys(ENV_TRUSTED_KEYS, text)
    return hmac_key, private, trusted


def signing_key_from_env() -> bytes | None:
    """The HMAC secret of ``$MLC_JIT_REMOTE_SIGNING_KEY``, None when it is unset or holds
    an Ed25519 key (RemoteConfigError when it is malformed or set but empty)."""
    return keys_from_env()[0]


# -- what the settings keep (never a secret) -------------------------------------------------
def describe_signing_key(source: str, text: str) -> str:
    """What ``MLC_JIT_REMOTE_SIGNING_KEY`` holds, without the secret: ``ed25519:<key id>``
    or ``hmac-sha256`` (RemoteConfigError for a bad value)."""
    _, private = parse_signing_key(source, text)
    if private is None:
        return SIGNATURE_SCHEME.rstrip(":")
    ed = _ed25519(source)
    return ED25519_SCHEME + key_id(_raw_public(
        ed.Ed25519PrivateKey.from_private_bytes(private).public_key()))


def trusted_key_ids(source: str, text: str) -> tuple[str, ...]:
    """The key ids of ``MLC_JIT_REMOTE_TRUSTED_KEYS``' keys (RemoteConfigError for a bad
    value)."""
    return tuple(key_id(raw) for raw in parse_trusted_keys(source, text))
