"""``python -m mlc_llm compile``: the real command line, a tiny real TVM library.

Exit status: 0 when the library was written (or ``MLC_STANDIN_FAIL=nooutput``), 2 for a
command line argparse rejects (unknown flag, bad ``--opt`` / ``--overrides``, missing
config file, bad output path), 1 for everything that fails later (unreadable config,
unknown model type or quantization, invalid config values, a target TVM cannot build).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import mlc_llm
from mlc_llm import standin
from mlc_llm.interface.compiler_flags import ModelConfigOverride, OptimizationFlags
from mlc_llm.model import MODELS
from mlc_llm.quantization import QUANTIZATION
from mlc_llm.support.auto_config import (
    detect_mlc_chat_config,
    detect_model_type,
    detect_quantization,
    load_config,
)
from mlc_llm.support.auto_target import PACKAGING_DEVICES, detect_system_lib_prefix

_SYSTEM_LIB_SUFFIXES = (".tar", ".lib")
_SHARED_LIB_SUFFIXES = (".so", ".dylib", ".dll")


class CompileError(Exception):
    """A failure after the command line was accepted (exit status 1)."""


def _output_path(value: str) -> Path:
    path = Path(value)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"Output cannot be a directory: {path}")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"Directory does not exist: {path.parent}")
    return path


def _config_path(value: str) -> Path:
    try:
        return detect_mlc_chat_config(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _system_lib_prefix(value: str) -> str:
    if value in ("", "auto") or re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
        return value
    raise argparse.ArgumentTypeError(
        "Invalid prefix. It should only consist of numbers (0-9), alphabets (A-Z, a-z) "
        "and underscore (_)."
    )


def _debug_dir(value: str) -> Path:
    path = Path(value)
    path.mkdir(parents=True, exist_ok=True)
    return path


def make_parser() -> argparse.ArgumentParser:
    """The argument parser, with the real ``mlc_llm compile`` flags."""
    parser = argparse.ArgumentParser(
        prog="mlc_llm compile",
        description="Stand-in for `mlc_llm compile`: builds a tiny real TVM library.",
    )
    parser.add_argument(
        "model",
        type=_config_path,
        help="mlc-chat-config.json, or the directory that holds it (required)",
    )
    parser.add_argument(
        "--quantization",
        choices=list(QUANTIZATION),
        help="quantization (default: the config's `quantization`)",
    )
    parser.add_argument(
        "--model-type",
        default="auto",
        choices=["auto", *MODELS],
        help='model type (default: "%(default)s", the config\'s `model_type`)',
    )
    parser.add_argument(
        "--device",
        default="auto",
        help="cpu, cuda[:N], rocm[:N], metal, vulkan, opencl, webgpu, iphone, macabi, android,"
        ' auto, or a TVM target as JSON (default: "%(default)s")',
    )
    parser.add_argument(
        "--host", default="auto", help='LLVM triple of the host (default: "%(default)s")'
    )
    parser.add_argument("--enable-subgroups", action="store_true", help="accepted and ignored")
    parser.add_argument(
        "--opt",
        default="O2",
        help='O0..O3 or "flashinfer=1;cublas_gemm=0;..." (default: "%(default)s")',
    )
    parser.add_argument(
        "--system-lib-prefix",
        type=_system_lib_prefix,
        default="auto",
        help='symbol prefix of a system library (default: "%(default)s")',
    )
    parser.add_argument(
        "--output",
        "-o",
        type=_output_path,
        required=True,
        help="the library to write (required)",
    )
    parser.add_argument(
        "--overrides",
        default="",
        help='"context_window_size=2048;prefill_chunk_size=512;..." (default: "%(default)s")',
    )
    parser.add_argument(
        "--debug-dump",
        type=_debug_dir,
        default=None,
        help="directory to write the Relax module script into (default: %(default)s)",
    )
    return parser


def _model_config(config: dict[str, Any]) -> dict[str, Any]:
    """The real compiler's merge: ``model_config`` updated with the other top-level fields
    (``model_type`` and ``quantization`` included; the config class drops them)."""
    rest = dict(config)
    inner = rest.pop("model_config", None)
    if inner is None:
        return rest
    if not isinstance(inner, dict):
        raise CompileError("`model_config` in the config file is not a JSON object")
    return {**inner, **rest}


def _library_kind(device: str, output: Path) -> bool:
    """Whether ``output`` is a system library (the real build functions' rules)."""
    if device in PACKAGING_DEVICES:
        if output.suffix != ".tar":
            raise CompileError(
                f"--device {device} builds a static library: --output must end "
                f"in .tar, not {output.name}"
            )
        return True
    if output.suffix in _SYSTEM_LIB_SUFFIXES:
        return True
    if output.suffix not in _SHARED_LIB_SUFFIXES:
        print(
            f"Warning: Unknown output suffix: {output.suffix}. Assuming shared library.",
            file=sys.stderr,
        )
    return False


def _metadata(model_type: str, quantization: str, config: dict[str, Any]) -> dict[str, Any]:
    """The fields real MLC libraries report from their ``_metadata`` function."""
    return {
        "model_type": model_type,
        "quantization": quantization,
        "context_window_size": config.get("context_window_size", -1),
        "sliding_window_size": config.get("sliding_window_size", -1),
        "attention_sink_size": config.get("attention_sink_size", -1),
        "prefill_chunk_size": config.get("prefill_chunk_size", -1),
        "tensor_parallel_shards": config.get("tensor_parallel_shards", 1),
        "pipeline_parallel_stages": config.get("pipeline_parallel_stages", 1),
        "disaggregation": config.get("disaggregation", False),
        "max_batch_size": config.get("max_batch_size", 1),
        "kv_state_kind": "none",
        "params": [],
    }


def _display(rows: dict[str, Any]) -> None:
    print("Compiling with arguments:")
    for name, value in rows.items():
        print(f"  {name:<25} {value}")


def _compile(
    parsed: argparse.Namespace,
    argv: list[str],
    opt: OptimizationFlags,
    overrides: ModelConfigOverride,
) -> None:
    started = time.monotonic()
    config_file: Path = parsed.model
    output: Path = parsed.output
    standin.record_invocation(
        {
            "argv": argv,
            "device": parsed.device,
            "output": str(output),
            "overrides": parsed.overrides,
            "opt": parsed.opt,
            "system_lib_prefix": parsed.system_lib_prefix,
            "model": str(config_file),
            "version": mlc_llm.__version__,
        }
    )
    try:
        failure = standin.fail_mode()
        delay = standin.sleep_seconds()
        config = load_config(config_file)
        model = detect_model_type(parsed.model_type, config, config_file)
        quantization = detect_quantization(parsed.quantization, config, config_file)
    except ValueError as err:
        raise CompileError(str(err)) from err
    prefix = detect_system_lib_prefix(
        parsed.device, parsed.system_lib_prefix, model.name, quantization.name
    )
    system_lib = _library_kind(parsed.device, output)
    _display(
        {
            "--config": config_file,
            "--quantization": quantization.name,
            "--model-type": model.name,
            "--device": parsed.device,
            "--host": parsed.host,
            "--opt": repr(opt),
            "--system-lib-prefix": f'"{prefix}"',
            "--output": output,
            "--overrides": repr(overrides),
        }
    )
    try:
        model_config = overrides.apply(model.config.from_dict(_model_config(config)))
    except ValueError as err:
        raise CompileError(str(err)) from err
    print(f"Model config: {model_config.asdict()}", flush=True)
    if failure == "exit":
        standin.pause(delay)
        raise CompileError(f"compilation failed on purpose ({standin.FAIL_ENV}=exit)")

    print("[standin] importing TVM", flush=True)
    from mlc_llm.interface import compile as backend
    from mlc_llm.support.auto_target import detect_target_and_host

    try:
        target = detect_target_and_host(parsed.device, parsed.host)
        backend.check_config(model, model_config)
    except ValueError as err:
        raise CompileError(str(err)) from err
    effective = dataclasses.replace(opt)
    effective.update(target, quantization.name)
    print(f"Target: {target.export()}")
    print(f"Effective optimization flags for this target: {effective!r}", flush=True)
    metadata = _metadata(model.name, quantization.name, model_config.asdict())
    metadata["standin"] = {
        "mlc_llm_version": mlc_llm.__version__,
        "model_config": model_config.asdict(),
        "opt": repr(opt),
        "effective_opt": repr(effective),
        "target": str(target.export()),
        "system_lib": system_lib,
        "system_lib_prefix": prefix,
    }
    print("Creating model and exporting it to TVM", flush=True)
    mod = backend.build_module(model, model_config, metadata)
    if parsed.debug_dump is not None:
        (parsed.debug_dump / "standin_module.py").write_text(mod.script(), encoding="utf-8")
    print("Running optimizations and code generation using TVM", flush=True)
    try:
        executable = backend.build(mod, target, system_lib=system_lib, system_lib_prefix=prefix)
    except Exception as err:
        raise CompileError(f"TVM could not build for {parsed.device}: {err}") from err
    standin.pause(delay)
    if failure == "nooutput":
        print(f"[standin] not writing {output} ({standin.FAIL_ENV}=nooutput)", flush=True)
        return
    try:
        executable.export_library(str(output))
    except Exception as err:
        raise CompileError(f"Cannot export the library to {output}: {err}") from err
    if failure in ("partial", "kill"):
        os.truncate(output, output.stat().st_size // 2)
        print(f"[standin] left half of {output} ({standin.FAIL_ENV}={failure})", flush=True)
        if failure == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise CompileError(
            f"compilation failed on purpose after a partial write ({standin.FAIL_ENV}=partial)"
        )
    print(
        f"Generated: {output} ({output.stat().st_size} bytes, {time.monotonic() - started:.2f}s)",
        flush=True,
    )


def main(argv: list[str]) -> int:
    """Run the compile command on ``argv`` (the arguments after ``compile``); returns the
    exit status (argparse exits 2 itself on a rejected command line)."""
    parsed = make_parser().parse_args(argv)
    # Parsed here rather than as argparse types, so the raw strings stay available; a bad
    # string exits 2 with the parser's message, as the real CLI does.
    opt = OptimizationFlags.from_str(parsed.opt)
    overrides = ModelConfigOverride.from_str(parsed.overrides)
    try:
        _compile(parsed, argv, opt, overrides)
    except CompileError as err:
        cause = err.__cause__
        if cause is not None and not isinstance(cause, ValueError):
            traceback.print_exception(cause, file=sys.stderr)
        print(f"mlc_llm compile: error: {err}", file=sys.stderr)
        return 1
    return 0
