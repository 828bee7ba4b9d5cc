"""The manifest: the JSON record written last beside each library (full key, SHA-256,
size, toolchain, timings…). One reader validates it for the engine and for the tools.

Every field the cache writes or reads is checked here, its type and its range
(:data:`FIELDS`): a manifest that fails is corrupt everywhere (quarantined and rebuilt
under ON, an error under READONLY, flagged by ``verify``, listed as ``bad-manifest``), so
nothing downstream meets a ``"created": 1e300`` or a ``"params": "junk"``. Fields this
version does not know are left alone (a newer version may write more).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypedDict, cast

from pytest_mlcjit._util.jsonsafe import loads_bounded
from pytest_mlcjit.cache.layout import DIGEST_RE, LOG_SUFFIX, SIMPLE_NAME_RE
from pytest_mlcjit.errors import CorruptEntryError
from pytest_mlcjit.inputs.check import inputs_digest
from pytest_mlcjit.inputs.paths import RecordedInputs


class ParamSpec(TypedDict):
    """A model parameter: its name, shape and dtype."""

    name: str
    shape: list[int | str]
    dtype: str


class _Required(TypedDict):
    digest: str
    sha256: str
    size: int


class Manifest(_Required, total=False):
    """The manifest of one entry, as :func:`parse_manifest` returns it (every field present
    is of its type and range: :data:`FIELDS`). Fields a newer version writes and this one
    does not know stay in the dict, unchecked and unseen by the type checker."""

    library: str
    log: str
    format: int | None
    backend: str
    key: dict[str, Any]
    key_digest: str
    toolchain: dict[str, Any]
    compile_seconds: float
    created: float
    run_id: str
    host: str
    plugin_version: str
    params: list[ParamSpec]
    functions: list[str]
    target_str: str
    tvm_version: str
    target: str | dict[str, Any]
    system_lib_prefix: str | None
    model_dir: str
    adopted: bool
    signatures: dict[str, Any]
    name: str
    inputs: RecordedInputs
    #: Where a downloaded entry came from (the remote manifest's URL).
    remote: str

SHA256_RE = re.compile(r"[0-9a-f]{64}")
#: The latest time a manifest may record: the end of the year 9999 (tools print it).
MAX_TIME = 253402300799.0
#: The longest compile a manifest may record: ten years.
MAX_SECONDS = 10 * 365 * 86400.0
#: Largest size and shape dimension: what a file offset can hold.
MAX_INT = 2**63 - 1
#: TVM dtypes: bool, handle, (u)int and (b)float of any width, float8/6/4 variants
#: (``float8_e4m3fn``), custom types (``custom[posit]32``), optionally with lanes
#: (``float16x4``).
DTYPE_RE = re.compile(r"(bool|handle|u?int\d{1,3}|b?float\d{1,3}(_e\d+m\d+[a-z]*)?"
                      r"|custom\[\w+\]\d{1,3})(x\d{1,4})?")


def _is_int(value: Any, low: int = 0, high: int = MAX_INT) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _is_number(value: Any, high: float) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value) and 0 <= value <= high)


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


def _is_name(value: Any) -> bool:
    return isinstance(value, str) and bool(value)


def _is_dim(value: Any) -> bool:
    """A shape dimension: a non-negative int, or a symbolic one by its name (``"n"``)."""
    return _is_int(value) or _is_name(value)


def _is_dtype(value: Any) -> bool:
    return isinstance(value, str) and bool(DTYPE_RE.fullmatch(value))


def _is_param(value: Any) -> bool:
    return (isinstance(value, dict) and set(value) == {"name", "shape", "dtype"}
            and _is_name(value["name"]) and isinstance(value["shape"], list)
            and all(_is_dim(d) for d in value["shape"]) and _is_dtype(value["dtype"]))


def _is_arg(value: Any) -> bool:
    """One argument (or output) of a compiled function, as ``_tvm_compile`` records it:
    ``{"kind", "name"?, "shape"?: null or dims, "ndim"?, "dtype"?: null or a dtype,
    "fields"?: [arguments]}``."""
    if not isinstance(value, dict) or not isinstance(value.get("kind"), str):
        return False
    shape, dtype, fields = value.get("shape"), value.get("dtype"), value.get("fields", [])
    return ((shape is None or (isinstance(shape, list) and all(_is_dim(d) for d in shape)))
            and (dtype is None or _is_dtype(dtype))
            and _is_str(value.get("name", ""))
            and _is_int(value.get("ndim", 0), low=-1)
            and isinstance(fields, list) and all(_is_arg(f) for f in fields))


def _is_signature(value: Any) -> bool:
    output = value.get("output") if isinstance(value, dict) else None
    return (isinstance(value, dict)
            and all(isinstance(value.get(part, []), list) and all(_is_arg(a) for a in
                                                                  value.get(part, []))
                    for part in ("inputs", "params"))
            and (output is None or _is_arg(output)))


def _is_inputs(value: Any) -> bool:
    """Recorded inputs (:meth:`.inputs.InputRecorder.result`), as their own reader checks."""
    try:
        inputs_digest(value)
    except (ValueError, TypeError, AttributeError):
        return False
    return True


#: field → (whether its value is valid, what is expected: for the message).
FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "format": (lambda v: v is None or _is_int(v), "null or a non-negative integer"),
    "backend": (lambda v: isinstance(v, str) and bool(SIMPLE_NAME_RE.fullmatch(v)),
                "a backend name"),
    "key": (lambda v: isinstance(v, dict), "an object (the full key)"),
    "toolchain": (lambda v: isinstance(v, dict), "an object"),
    "compile_seconds": (lambda v: _is_number(v, MAX_SECONDS),
                        f"a number of seconds from 0 to {MAX_SECONDS:.0f}"),
    "created": (lambda v: _is_number(v, MAX_TIME),
                f"a time in seconds since 1970, from 0 to {MAX_TIME:.0f} (the year 9999)"),
    "run_id": (_is_str, "a string"),
    "host": (_is_str, "a string"),
    "plugin_version": (_is_str, "a string"),
    "params": (lambda v: isinstance(v, list) and all(_is_param(p) for p in v),
               "a list of {name, shape: [non-negative ints], dtype} objects"),
    "functions": (lambda v: isinstance(v, list) and all(_is_name(f) for f in v),
                  "a list of function names"),
    "target_str": (_is_str, "a string"),
    "tvm_version": (_is_str, "a string"),
    "target": (lambda v: isinstance(v, str | dict), "a target string or object"),
    "system_lib_prefix": (lambda v: v is None or _is_str(v), "null or a string"),
    "model_dir": (_is_str, "a string"),
    "adopted": (lambda v: isinstance(v, bool), "true or false"),
    "key_digest": (lambda v: isinstance(v, str) and bool(DIGEST_RE.fullmatch(v)),
                   "the key's hex digest"),
    "signatures": (lambda v: isinstance(v, dict) and all(_is_signature(s) for s in v.values()),
                   "an object of function signatures"),
    "name": (_is_str, "a string (the spec's short name)"),
    "inputs": (_is_inputs, "recorded inputs ({modules, files, dists})"),
}


def _no_constant(name: str) -> Any:
    """NaN and the infinities are not JSON (the cache never writes them): refused."""
    raise ValueError(f"{name} is not JSON")


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


def parse_manifest(raw: bytes, path: Path, digest: str) -> Manifest:
    """A manifest's bytes as a dict; CorruptEntryError unless they are UTF-8 JSON with a
    64-hex ``sha256``, a non-negative integer ``size``, ``digest`` equal to ``digest``,
    ``library`` and ``log`` naming this entry's files, and every field of :data:`FIELDS`
    that is present of its type and range."""
    try:
        data = loads_bounded(raw, parse_constant=_no_constant)
    except ValueError as exc:  # junk: too large, too deep, not UTF-8 JSON
        raise CorruptEntryError(f"manifest {path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict) or not {"sha256", "size", "digest"} <= data.keys():
        raise CorruptEntryError(f"manifest {path} lacks sha256/size/digest")
    size, sha = data["size"], data["sha256"]
    if not isinstance(sha, str) or not SHA256_RE.fullmatch(sha) or not _is_int(size):
        raise CorruptEntryError(f"manifest {path} has an invalid sha256 {_shown(sha)} or size "
                                f"{_shown(size)}")
    if data["digest"] != digest:
        other = data["digest"]
        shown = other if isinstance(other, str) and DIGEST_RE.fullmatch(other) else _shown(other)
        raise CorruptEntryError(f"manifest {path} is for key {shown}, not {digest}")
    library = data.get("library")
    if library is not None and not (
            isinstance(library, str) and library.startswith(digest + ".")
            and SIMPLE_NAME_RE.fullmatch(library[len(digest) + 1:]) and ".." not in library
            and library != digest + LOG_SUFFIX):
        raise CorruptEntryError(f"manifest {path} has an invalid library {_shown(library)}: "
                                f"expected {digest}.<suffix>")
    log = data.get("log")
    if log is not None and log != digest + LOG_SUFFIX:
        raise CorruptEntryError(f"manifest {path} has an invalid log {_shown(log)}: expected "
                                f"{digest}{LOG_SUFFIX}")
    for field, (valid, expected) in FIELDS.items():
        if field in data and not valid(data[field]):
            raise CorruptEntryError(f"manifest {path} has an invalid {field} "
                                    f"{_shown(data[field])}: expected {expected}")
    return cast(Manifest, data)


def read_manifest_file(path: Path, digest: str) -> tuple[Manifest | None, str | None]:
    """``(manifest, None)``, ``(None, why it is unusable)``, or ``(None, None)`` if absent."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return None, f"manifest {path} cannot be read ({exc.strerror})"
    try:
        return parse_manifest(raw, path, digest), None
    except CorruptEntryError as exc:
        return None, str(exc)
