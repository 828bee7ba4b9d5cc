"""What the plugin prints: one header line with the effective settings, and a summary
section (the run's requests and outcomes, what the size cap pruned)."""

from __future__ import annotations

from typing import Any

from .session import RunState
from .units import format_size, plural


def header_line(state: RunState) -> str:
    """The policy, the devices as probed, and the cache (probes the devices)."""
    from .device import Presence
    from .layout import default_cache_dir, mlc_llm_home

    s = state.settings
    parts = []
    for name in s.devices:
        p = s.presence.get(name, Presence(True))
        parts.append(f"{name} (present)" if p.present else f"{name} (absent: {p.reason})")
    if s.cache_dir is not None:
        where = f"cache={s.cache_dir}"
    else:
        where = f"cache={default_cache_dir()} (MLC: {mlc_llm_home()})"
    return f"mlcjit: policy={s.policy.value}, devices={', '.join(parts)}, {where}"


def summary_lines(state: RunState) -> list[str]:
    s = state.stats()
    lines = []
    if s is not None and s.requests:
        lines.append(
            f"{plural(s.requests, 'request')}: {s.hits} hits, {s.compiles} "
            f"compiled ({f'{s.prefetched} ahead of time, ' if s.prefetched else ''}"
            f"{s.compile_seconds:.2f}s compiling), {s.failures} failed, "
            f"{s.corrupt} corrupt; {s.lock_wait_seconds:.2f}s waiting for locks"
        )
    return lines + _prune_lines(state)


def _prune_lines(state: RunState) -> list[str]:
    cap = state.options.max_size
    lines = []
    for result in state.pruned:
        if isinstance(result, str):
            lines.append(result)
            continue
        line = (f"--mlc-jit-max-size={format_size(cap or 0)}: {result.root} is "
                f"{format_size(result.total_after)}")
        if result.evicted or result.quarantine_removed:
            evicted = plural(len(result.evicted), "least recently used entry",
                             "least recently used entries")
            line += f" after evicting {evicted} ({format_size(result.freed)})"
        if result.over_cap:
            line += (f"; still over the cap: kept {len(result.kept_in_use)} used by this run "
                     f"and {len(result.kept_locked)} being compiled")
        lines.append(line)
    return lines


def write_summary(terminalreporter: Any, state: RunState) -> None:
    lines = summary_lines(state)
    if not lines:
        return
    terminalreporter.write_sep("-", "pytest-mlcjit")
    for line in lines:
        terminalreporter.write_line(line)
