"""Draw a trace written by ``--mlc-jit-trace`` as an SVG timeline (no dependencies).

    python benchmarks/trace_svg.py trace.json trace.svg [--title TEXT]

One row per track (an xdist worker's thread), the spans nested on a track stacked below
each other, coloured by kind. This is what the docs' picture of a run is drawn with (the
trace viewers, Perfetto and chrome://tracing, show the same file interactively).
"""

from __future__ import annotations

import argparse
import html
import json
from pathlib import Path
from typing import Any

#: Fill colour of each kind of span.
COLOURS = {"setup": "#d9d9d9", "call": "#8fd18f", "compile": "#f28e2b", "wait": "#e15759",
           "download": "#4e79a7", "upload": "#76b7b2", "gpu": "#b07aa1"}
LABELS = {"setup": "test setup", "call": "test call", "compile": "compile",
          "wait": "wait for another's compile", "download": "download", "upload": "upload",
          "gpu": "wait for the GPU lock"}
WIDTH, LEFT, RIGHT, TOP, BAR, GAP = 1400, 190, 20, 70, 18, 10


def _depths(spans: list[dict[str, Any]]) -> list[tuple[dict[str, Any], int]]:
    """Each span of one track with its nesting depth (0: outermost)."""
    placed: list[tuple[dict[str, Any], int]] = []
    open_ends: list[int] = []
    for span in sorted(spans, key=lambda s: (s["ts"], -s["dur"])):
        while open_ends and open_ends[-1] <= span["ts"]:
            open_ends.pop()
        placed.append((span, len(open_ends)))
        open_ends.append(span["ts"] + span["dur"])
    return placed


def _fit(text: str, width: float, char: float = 6.2) -> str:
    """``text`` cut (with an ellipsis) to about ``width`` pixels of 10px text."""
    most = int(width / char)
    if len(text) <= most:
        return text
    return text[:most - 1] + "\u2026" if most >= 4 else ""


def draw(events: list[dict[str, Any]], title: str) -> str:
    names = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
    procs = {e["pid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    order = {e["pid"]: e["args"]["sort_index"] for e in events
             if e.get("ph") == "M" and e.get("name") == "process_sort_index"}
    spans = [e for e in events if e.get("ph") == "X"]
    tracks: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for span in spans:
        tracks.setdefault((span["pid"], span["tid"]), []).append(span)
    end = max((s["ts"] + s["dur"] for s in spans), default=1)
    scale = (WIDTH - LEFT - RIGHT) / end
    out: list[str] = []
    y = TOP
    for key in sorted(tracks, key=lambda k: (order.get(k[0], 0), k[1])):
        placed = _depths(tracks[key])
        rows = 1 + max(depth for _, depth in placed)
        label = f"{procs.get(key[0], key[0]).split(' ')[0]} {names.get(key, key[1])}"
        out.append(f'<text x="{LEFT - 8}" y="{y + BAR - 4}" text-anchor="end" '
                   f'class="track">{html.escape(label)}</text>')
        for span, depth in placed:
            x, w = LEFT + span["ts"] * scale, max(span["dur"] * scale, 1.0)
            top = y + depth * (BAR + 2)
            colour = COLOURS.get(span["cat"], "#bab0ac")
            tip = f"{span['name']}: {span['dur'] / 1e6:.2f}s"
            out.append(f'<rect x="{x:.1f}" y="{top}" width="{w:.1f}" height="{BAR}" '
                       f'fill="{colour}" stroke="#555" stroke-width="0.5">'
                       f'<title>{html.escape(tip)}</title></rect>')
            text = _fit(span["name"].split(" ", 1)[-1], w - 6)
            if text:
                out.append(f'<text x="{x + 3:.1f}" y="{top + BAR - 5}" class="span">'
                           f'{html.escape(text)}</text>')
        y += rows * (BAR + 2) + GAP
        out.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y - GAP / 2}" '
                   f'y2="{y - GAP / 2}" stroke="#eee"/>')
    step = max(1, round(end / 1e6 / 10))
    for second in range(0, int(end / 1e6) + 1, step):
        x = LEFT + second * 1e6 * scale
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{TOP - 6}" y2="{y}" '
                   f'stroke="#ccc" stroke-dasharray="2,3"/>')
        out.append(f'<text x="{x:.1f}" y="{TOP - 10}" text-anchor="middle" '
                   f'class="axis">{second}s</text>')
    legend_x = LEFT
    for cat, label in LABELS.items():
        if not any(span["cat"] == cat for span in spans):
            continue
        out.append(f'<rect x="{legend_x}" y="{y + 6}" width="12" height="12" '
                   f'fill="{COLOURS[cat]}" stroke="#555" stroke-width="0.5"/>')
        out.append(f'<text x="{legend_x + 16}" y="{y + 16}" class="axis">{label}</text>')
        legend_x += 30 + 7 * len(label)
    height = y + 30
    style = ("text{font-family:DejaVu Sans,Arial,sans-serif}.track{font-size:13px}"
             ".span{font-size:10px}.axis{font-size:11px;fill:#444}"
             ".title{font-size:15px;font-weight:bold}")
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
            f'viewBox="0 0 {WIDTH} {height}"><style>{style}</style>'
            f'<rect width="100%" height="100%" fill="white"/>'
            f'<text x="{LEFT}" y="24" class="title">{html.escape(title)}</text>'
            + "".join(out) + "</svg>\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", type=Path)
    parser.add_argument("svg", type=Path)
    parser.add_argument("--title", default="pytest-mlcjit run")
    args = parser.parse_args()
    events = json.loads(args.trace.read_text(encoding="utf-8"))["traceEvents"]
    args.svg.write_text(draw(events, args.title), encoding="utf-8")


if __name__ == "__main__":
    main()
