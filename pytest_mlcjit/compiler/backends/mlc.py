"""The MLC-LLM backend: model directories compiled by ``mlc_llm compile``, in the very
cache files MLC-LLM's own JIT uses (``$MLC_LLM_HOME/model_lib/<md5>.<suffix>``).

The key is MLC's, byte for byte (see ``shared/docs/mlc-jit-contract.md``): six fields,
``json.dumps(sort_keys=True, indent=2)``, MD5. What MLC lacks is added beside it without
changing its file names: a manifest with the toolchain and checksum (a library built by
another mlc_llm/TVM is *stale*), locking, staging on the cache's filesystem, atomic publish.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pytest_mlcjit._util.fs import WriteWarnings, write_json_atomic
from pytest_mlcjit.cache import layout
from pytest_mlcjit.cache.layout import EntryPaths
from pytest_mlcjit.cache.locks import flocked
from pytest_mlcjit.cache.manifest import Manifest
from pytest_mlcjit.compiler.backends.base import Backend, BuildContext, BuildRequest
from pytest_mlcjit.compiler.launch import child_env
from pytest_mlcjit.compiler.toolchain import (
    describe_changes,
    toolchain_changes,
    tvm_fingerprint,
)
from pytest_mlcjit.device import Device
from pytest_mlcjit.errors import CorruptEntryError, SpecError
from pytest_mlcjit.key import canonical_json, file_sha256, sha256_digest
from pytest_mlcjit.spec import deferrable

#: MLC's override fields, in the order its override string lists them.
OVERRIDE_FIELDS = ("context_window_size", "sliding_window_size", "prefill_chunk_size",
                   "attention_sink_size", "max_batch_size", "tensor_parallel_shards",
                   "pipeline_parallel_stages", "disaggregation")
#: Overrides whose value -1 means "not set" in the override string.
MINUS_ONE_SKIPPED = ("context_window_size", "sliding_window_size", "attention_sink_size")
#: Targets that MLC packages as a static ``.tar`` with a system-lib prefix.
PACKAGING_TARGETS = ("iphone", "macabi", "android")
OPT_PRESETS = ("O0", "O1", "O2", "O3")
OPT_FLAGS = ("flashinfer", "cublas_gemm", "faster_transformer", "cudagraph", "cutlass",
             "ipc_allreduce_strategy")
CONFIG_FILE = "mlc-chat-config.json"
#: Limit for computing one key with mlc_llm (it imports mlc_llm and TVM).
KEY_SCRIPT_TIMEOUT_S = 600


def dso_suffix(target: str) -> str:
    """``tar`` for packaging targets, else ``$MLC_DSO_SUFFIX``, else the OS's own."""
    if target in PACKAGING_TARGETS:
        return "tar"
    if suffix := os.environ.get("MLC_DSO_SUFFIX"):
        return suffix
    return {"darwin": "dylib", "win32": "dll"}.get(sys.platform, "so")


def mlc_llm_installed() -> bool:
    """Whether ``mlc_llm`` is importable here (checked without importing it)."""
    try:
        return importlib.util.find_spec("mlc_llm") is not None
    except (ImportError, ValueError):
        return False


def _override_value(name: str, value: Any) -> Any:
    if value is None:
        return None
    if name == "disaggregation":
        if isinstance(value, bool):
            return value
        raise SpecError(f"invalid override disaggregation={value!r}: expected True or False")
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)  # what `--overrides name=2048` on MLC's command line gives
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"invalid override {name}={value!r}: expected an int (or None)")
    return value


def override_string(overrides: Mapping[str, Any]) -> str:
    """MLC's ``;``-joined ``name=value`` string: None skipped, -1 skipped for three fields."""
    parts = []
    for name in OVERRIDE_FIELDS:
        value = overrides.get(name)
        if value is None or (name in MINUS_ONE_SKIPPED and value == -1):
            continue
        parts.append(f"{name}={value}")
    return ";".join(parts)


def mlc_md5(key: Mapping[str, Any]) -> str:
    """MD5 of ``json.dumps(key, sort_keys=True, indent=2)``, exactly as MLC hashes."""
    return hashlib.md5(json.dumps(key, sort_keys=True, indent=2).encode("utf-8")).hexdigest()  # noqa: S324 - MLC's file name, not security


def _validate_opt(opt: str) -> str:
    if opt in OPT_PRESETS:
        return opt
    items = [item for item in opt.split(";") if item]
    names = [item.partition("=")[0] for item in items]
    if not items or any("=" not in item for item in items) or not set(names) <= set(OPT_FLAGS):
        raise SpecError(
            f"invalid opt {opt!r}: expected one of {', '.join(OPT_PRESETS)} or flags such as "
            f"'flashinfer=1;cudagraph=0' (flags: {', '.join(OPT_FLAGS)})"
        )
    return opt


class MLCModel:
    """An MLC-LLM model directory (with ``mlc-chat-config.json``), compiled by ``mlc_llm``.

    ``overrides`` takes MLC's eight override fields; ``opt`` is ``O0``..``O3`` or a flag
    string (default ``O2``); ``target`` is a packaging target (``iphone``, ``macabi``,
    ``android``: compile-only, a ``.tar``), else the library is built for the test's
    device; ``system_lib_prefix`` names the system-lib prefix for packaging targets
    (default: MLC's own, derived from the key).
    """

    backend = "mlc"
    __slots__ = ("_error", "model_dir", "opt", "overrides", "system_lib_prefix", "target")

    @deferrable  # made while pytest collects, a bad spec fails its tests instead
    def __init__(self, model_dir: str | os.PathLike[str], *,
                 overrides: Mapping[str, Any] | None = None, opt: str | None = None,
                 system_lib_prefix: str | None = None, target: str | None = None) -> None:
        if not isinstance(model_dir, str | os.PathLike) or not str(model_dir):
            raise SpecError(f"invalid MLC model directory {model_dir!r}: expected a path")
        overrides = dict(overrides or {})
        unknown = sorted(set(overrides) - set(OVERRIDE_FIELDS))
        if unknown:
            raise SpecError(f"unknown MLC override(s) {', '.join(map(repr, unknown))}; "
                            f"valid: {', '.join(OVERRIDE_FIELDS)}")
        if opt is not None and not isinstance(opt, str):
            raise SpecError(f"invalid opt {opt!r}: expected a string such as 'O2'")
        if target is not None and target not in PACKAGING_TARGETS:
            raise SpecError(f"invalid MLC target {target!r}: expected one of "
                            f"{', '.join(PACKAGING_TARGETS)} (GPU devices come from "
                            "--mlc-device)")
        if system_lib_prefix is not None and (
                not isinstance(system_lib_prefix, str)
                or not system_lib_prefix.replace("_", "a").isalnum()):
            raise SpecError(f"invalid system_lib_prefix {system_lib_prefix!r}: expected "
                            "letters, digits and underscores")
        self.model_dir = Path(model_dir).expanduser().absolute()
        self.overrides = {k: _override_value(k, overrides[k]) for k in OVERRIDE_FIELDS
                          if k in overrides}
        self.opt = _validate_opt(opt.strip()) if opt is not None else "O2"
        self.system_lib_prefix = system_lib_prefix
        self.target = target
        self._error: str | None = None

    def _become_invalid(self, error: str, args: tuple[Any, ...]) -> None:
        """Made during collection with a bad field: every use raises ``error``."""
        path = args[0] if args and isinstance(args[0], str | os.PathLike) and str(args[0]) \
            else "?"
        self.model_dir = Path(path).expanduser().absolute()
        self.overrides, self.opt, self.system_lib_prefix, self.target = {}, "O2", None, None
        self._error = error

    @property
    def error(self) -> str | None:
        """Why this spec is invalid (made while pytest collected), else None."""
        return self._error

    @classmethod
    def coerce(cls, spec: Any, **options: Any) -> MLCModel:
        """An MLCModel from a spec or a path plus ``mlc_model`` marker options."""
        if isinstance(spec, MLCModel):
            if not options:
                return spec
            merged: dict[str, Any] = {"overrides": spec.overrides, "opt": spec.opt,
                      "system_lib_prefix": spec.system_lib_prefix, "target": spec.target}
            merged.update(options)
            return cls(spec.model_dir, **merged)
        allowed = {"overrides", "opt", "system_lib_prefix", "target"}
        if unknown := sorted(set(options) - allowed):
            raise SpecError(f"mlc_model({str(spec)!r}) got unknown options {unknown}; an MLC "
                            f"model directory takes {', '.join(sorted(allowed))}")
        return cls(spec, **options)

    def identity(self) -> dict[str, Any]:
        return {"model_dir": str(self.model_dir), "overrides": self.overrides, "opt": self.opt,
                "system_lib_prefix": self.system_lib_prefix, "target": self.target,
                **({"invalid": self._error} if self._error else {})}

    @property
    def id(self) -> str:
        if self._error:
            return f"{self.model_dir.name}-invalid"
        parts = [self.model_dir.name, *(f"{k}={v}" for k, v in self.overrides.items())]
        if self.opt != "O2":
            parts.append(self.opt)
        return "-".join(parts)

    def __repr__(self) -> str:
        return (f"MLCModel({str(self.model_dir)!r}, overrides={self.overrides!r}, "
                f"opt={self.opt!r})")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MLCModel) and self.identity() == other.identity()

    def __hash__(self) -> int:
        return hash(canonical_json(self.identity()))

    def read_config(self) -> dict[str, Any]:
        if self._error:
            raise SpecError(self._error)
        path = self.model_dir / CONFIG_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SpecError(f"{self.model_dir} is not an MLC model directory: it has no "
                            f"{CONFIG_FILE}") from None
        except (OSError, ValueError) as exc:
            raise SpecError(f"cannot read {path}: {exc}") from None
        missing = [f for f in ("model_type", "quantization", "model_config") if f not in data]
        if not isinstance(data, dict) or missing:
            raise SpecError(f"{path} lacks required field(s) {missing}")
        return data


def _normalize(job: dict[str, Any], memo_dir: Path | None, warnings: WriteWarnings
               ) -> dict[str, Any]:
    """Run :mod:`._mlc_key` for ``job``, memoized on disk (per run) under ``memo_dir``."""
    digest = sha256_digest(job)
    if memo_dir is None:
        return _run_key_script(job)
    memo = memo_dir / f"{digest}.json"
    if not memo_dir.is_dir():
        _forget_old_runs(memo_dir.parent, warnings)
        memo_dir.mkdir(parents=True, exist_ok=True)
    with flocked(memo_dir / f"{digest}.lock", timeout=KEY_SCRIPT_TIMEOUT_S + 60):
        with contextlib.suppress(OSError, ValueError):
            cached: dict[str, Any] = json.loads(memo.read_text(encoding="utf-8"))
            return cached
        result = _run_key_script(job)
        with warnings.best_effort(memo, "keep the MLC key memo"):
            write_json_atomic(memo, result)
    return result


def _forget_old_runs(memos: Path, warnings: WriteWarnings, max_age: float = 24 * 3600.0
                     ) -> None:
    """Remove the key memos of runs that ended long ago (each run has its own folder)."""
    with contextlib.suppress(OSError):
        for run in memos.iterdir():
            with contextlib.suppress(FileNotFoundError):
                if time.time() - run.stat().st_mtime > max_age:
                    warnings.remove_tree(run)


def _run_key_script(job: dict[str, Any]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="mlcjit-key-") as tmp:
        job_file = Path(tmp) / "job.json"
        job_file.write_text(json.dumps(job), encoding="utf-8")
        proc = subprocess.run([sys.executable, "-m", "pytest_mlcjit.compiler.backends._mlc_key",
                               str(job_file)], capture_output=True, text=True,
                              timeout=KEY_SCRIPT_TIMEOUT_S, check=False, env=child_env())
    if proc.returncode != 0:
        lines = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        raise SpecError(f"mlc_llm could not compute the cache key for {job['model_type']!r}: "
                        + (lines[-1] if lines else f"exit code {proc.returncode}"))
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


class MLCBackend(Backend):
    name = "mlc"

    def request(self, spec: Any, device: Device | None, ctx: BuildContext) -> BuildRequest:
        """The MLC-compatible request for ``spec`` on ``device`` (or its packaging target).

        The key computation is shared between the processes of a run through
        ``<root>/.mlcjit/mlckeys/<run>`` when the request's policy writes.
        """
        if not isinstance(spec, MLCModel):
            raise SpecError(f"expected an MLCModel, got {spec!r}")
        chat = spec.read_config()
        model_type, quantization = chat.pop("model_type"), chat.pop("quantization")
        model_config = dict(chat.pop("model_config"))
        model_config.update(chat)
        for name, value in spec.overrides.items():
            if value is not None:
                model_config[name] = value
        root = layout.backend_root("mlc", ctx.cache_dir)
        memo_dir = layout.mlc_key_memos(root, ctx.run_id) if ctx.writes else None
        norm = _normalize({"model_type": model_type, "model_config": model_config,
                           "opt": spec.opt}, memo_dir, ctx.warnings)
        if spec.target is not None:
            device_text, run_device = spec.target, Device("cpu")
        elif device is not None:
            device_text, run_device = device.full_name, device
        else:
            raise SpecError(f"{spec!r} has no target and no device to compile for")
        key: dict[str, Any] = {
            "model_config": norm["model_config"],
            "overrides": override_string(spec.overrides),
            "opt": norm["opt"],
            "device": device_text,
            "model_type": model_type,
            "quantization": quantization,
        }
        prefix = spec.system_lib_prefix
        if device_text in PACKAGING_TARGETS:
            if prefix is None:
                prefix = f"{model_type}_{quantization}_{mlc_md5(key)}".replace("-", "_")
            key["system_lib_prefix"] = prefix
        describe = (f"{spec.model_dir.name} (overrides {key['overrides'] or 'none'}, opt "
                    f"{spec.opt}, device {device_text})")
        return BuildRequest(
            backend="mlc", spec=spec, device=run_device, target=device_text, key=key,
            digest=mlc_md5(key), describe=describe,
            toolchain={"mlc_llm": norm["mlc_llm"], "tvm": tvm_fingerprint()},
            runnable=device_text not in PACKAGING_TARGETS,
            extra={"suffix": dso_suffix(device_text), "prefix": prefix},
        )

    def locate(self, req: BuildRequest, root: Path, entry: str | None = None) -> EntryPaths:
        return layout.mlc_entry(root, req.digest, req.extra["suffix"])

    def command(self, req: BuildRequest, staging: Path, root: Path) -> tuple[list[str], Path]:
        spec: MLCModel = req.spec
        output = staging / f"lib.{req.extra['suffix']}"
        argv = [sys.executable, "-m", "mlc_llm", "compile", str(spec.model_dir),
                "--opt", spec.opt, "--overrides", req.key["overrides"], "--device",
                str(req.target), "--output", str(output)]
        if req.extra["prefix"]:
            argv += ["--system-lib-prefix", f"{req.extra['prefix']}_"]
        return argv, output

    def collect(self, req: BuildRequest, staging: Path) -> dict[str, Any]:
        return {"target": req.target, "system_lib_prefix": req.extra["prefix"],
                "model_dir": str(req.spec.model_dir)}

    def stale(self, req: BuildRequest, manifest: Mapping[str, Any]) -> str | None:
        recorded = manifest.get("toolchain")
        if not recorded or not isinstance(recorded, Mapping) or manifest.get("adopted"):
            return None
        # MLC's own key (its file name) cannot name the toolchain: a change makes it stale.
        parts = ("mlc_llm", "tvm")
        changes = toolchain_changes({p: recorded.get(p) or {} for p in parts},
                                    {p: req.toolchain[p] or {} for p in parts})
        return describe_changes(changes) if changes else None

    def adopt(self, req: BuildRequest, paths: EntryPaths) -> Manifest:
        """A manifest for a library MLC itself put there, once it proves loadable."""
        check_loadable(paths.library)
        st = paths.library.stat()
        return {"digest": req.digest, "library": paths.library.name, "sha256":
                file_sha256(paths.library), "size": st.st_size, "key": req.key,
                "backend": "mlc", "adopted": True, "toolchain": dict(req.toolchain),
                "target": req.target, "system_lib_prefix": req.extra["prefix"],
                "model_dir": str(req.spec.model_dir), "compile_seconds": 0.0}

    def staging_parent(self, req: BuildRequest, root: Path) -> tuple[Path | None, str]:
        return _mlc_temp_dir(root)


def _mlc_temp_dir(cache_root: Path) -> tuple[Path | None, str]:
    """``$MLC_TEMP_DIR`` when it is on the cache's filesystem, else None and why not."""
    temp = os.environ.get("MLC_TEMP_DIR")
    if not temp:
        return None, ""
    try:
        same = os.stat(temp).st_dev == os.stat(cache_root).st_dev
    except OSError as exc:
        return None, f"MLC_TEMP_DIR={temp} not used: {exc.strerror}"
    if not same:
        return None, (f"MLC_TEMP_DIR={temp} not used: it is on another filesystem than the "
                      f"cache ({cache_root}), so publishing from it could not be atomic")
    return Path(temp), f"staging in MLC_TEMP_DIR={temp}"


def check_loadable(library: Path) -> None:
    """Raise CorruptEntryError unless ``library`` loads (a ``.tar`` must be a valid tar)."""
    if library.suffix == ".tar":
        if not tarfile.is_tarfile(library):
            raise CorruptEntryError(f"{library} is not a valid tar archive")
        return
    code = "import sys, tvm; tvm.runtime.load_module(sys.argv[1])"
    proc = subprocess.run([sys.executable, "-c", code, str(library)], capture_output=True,
                          text=True, timeout=300, check=False, env=child_env())
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise CorruptEntryError(f"{library} (no manifest) does not load: {tail}")

