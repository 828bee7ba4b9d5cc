"""Benchmark 2, makespan: a cold ``pytest -n W`` run against the ideal schedule.

Each repetition runs, in an order that rotates every repetition, each plugin mode (a cold
run on a fresh cache) and the "ideal" variant, all measured by this script:

ideal = (the best schedule over W workers of the K compile times, each measured one at a
         time in one process that imported TVM once, with the same build, export and
         ``tvm.compile`` as the plugin's compile)
        + (the pure test time: the same tests with ``-p no:mlcjit`` loading those
           libraries from known paths, ``pytest -n W``).

The figure is cold wall / ideal, the median of the per-repetition ratios; target <= 1.2
for the plugin with prefetching. Nothing is read from the plugin (no manifest times, no
summary line): compiles are counted by the benchmark's factory, times by this script.
The best schedule is computed exactly (branch and bound; LPT beyond 16 keys).

Before/after background prefetching: when ``pytest --help`` lists the plugin's
``--mlc-jit-prefetch={auto,on,off}`` (or a ``--mlc-jit-prefetch`` /
``--no-mlc-jit-prefetch`` pair), "before" runs with prefetching off and "after" with it
on, alternating within each repetition; ``--before-args`` / ``--after-args`` override
what each mode passes.

The mode "prototype prefetch (conftest)" runs the same tests with prefetching written as
a conftest in the benchmark suite, public API only: in each worker a thread compiles,
through the session's ``mlc_jit`` engine, the keys of a deterministic partition of all
the keys the collected tests need (the i-th distinct key in order of first use goes to
worker i mod W), with the "before" options. It runs by default only when the plugin has
no prefetch option (``--prototype`` forces it, ``--no-prototype`` skips it).

    python benchmarks/bench_makespan.py            # full: layers 96,64,48,32, N=8, 5 reps
    python benchmarks/bench_makespan.py --quick    # CI: tiny model, 1 rep, checks counts
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from pathlib import Path

from _benchlib import (
    Checks,
    bench_env,
    best_makespan,
    common_args,
    count_lines,
    libraries,
    make_configs,
    parse_ints,
    print_header,
    pytest_argv,
    pytest_help,
    ratio_of,
    rotate,
    run_timed,
    spread,
    table,
    work_dir,
    write_suite,
)

TARGET = 1.2
PROTOTYPE = "prototype prefetch (conftest)"
IDEAL = "ideal"

#: ``python solo.py OUT CONFIGS_JSON``: imports TVM once, then compiles each config one at a
#: time with the suite's own ``benchcompile`` (the plugin's build, export and tvm.compile),
#: timing each; writes ``OUT/paths.json`` (for the known-paths suite) and
#: ``OUT/times.json`` (seconds per config, in order).
SOLO_PY = '''\
import json
import sys
import time
from pathlib import Path

import tvm  # noqa: F401  (imported once, before any compile is timed)

from benchcompile import _compile_here, load_meta


def config_id(config):
    return "-".join(f"{k}{v}" for k, v in sorted(config.items()))


out, configs = Path(sys.argv[1]), json.loads(sys.argv[2])
paths, times = {}, []
for config in configs:
    lib = out / f"{config_id(config)}.so"
    t0 = time.perf_counter()
    _compile_here(config, lib)
    times.append(time.perf_counter() - t0)
    paths[config_id(config)] = {"path": str(lib), "params": load_meta(lib)}
(out / "paths.json").write_text(json.dumps(paths))
(out / "times.json").write_text(json.dumps(times))
'''


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common_args(parser)
    parser.add_argument("--workers", type=int, default=2, help="xdist workers W (default 2)")
    parser.add_argument("--configs", type=int, default=4, help="distinct configs K (default 4)")
    parser.add_argument("--tests", type=int, default=8, help="tests per config N (default 8)")
    parser.add_argument("--layers", type=parse_ints, default=[96, 64, 48, 32],
                        help="transformer layers, cycled over the configs (default 96,64,48,32)")
    parser.add_argument("--reps", type=int, default=5, help="repetitions (default 5)")
    parser.add_argument("--before-args", default=None,
                        help="pytest args of the 'before' (on-demand) mode; default: "
                        "--no-mlc-jit-prefetch if the plugin has it, else none")
    parser.add_argument("--prototype", action="store_true",
                        help="also run the prefetch prototype (a conftest in the benchmark "
                        "suite); the default when the plugin has no prefetch option")
    parser.add_argument("--no-prototype", action="store_true",
                        help="never run the prefetch prototype")
    parser.add_argument("--after-args", default=None,
                        help="pytest args of the 'after' (prefetch) mode; default: "
                        "--mlc-jit-prefetch if the plugin has it, else none; 'skip' skips it")
    args = parser.parse_args(argv)
    if args.quick:
        args.configs, args.tests, args.layers, args.reps = 2, 2, [1], 1
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    return args


def modes(args: argparse.Namespace, suite: Path) -> tuple[dict[str, list[str]], str]:
    """The modes to compare (name -> extra pytest args) and how they were chosen.

    Understands ``--mlc-jit-prefetch={...,on,off}``, a boolean pair ``--mlc-jit-prefetch``
    / ``--no-mlc-jit-prefetch``, or a bare ``--mlc-jit-prefetch`` flag.
    """
    help_text = pytest_help(suite)
    valued = re.search(r"--mlc-jit-prefetch[= ]\{([^}]*)\}", help_text)
    choices = {c.strip() for c in valued.group(1).split(",")} if valued else set()
    has_off = "--no-mlc-jit-prefetch" in help_text
    has_on = "--mlc-jit-prefetch" in help_text.replace("--no-mlc-jit-prefetch", "")
    if {"on", "off"} <= choices:
        before, after = ["--mlc-jit-prefetch=off"], ["--mlc-jit-prefetch=on"]
    elif has_off or has_on:
        before = ["--no-mlc-jit-prefetch"] if has_off else []
        after = ["--mlc-jit-prefetch"] if has_on and not valued else []
    else:
        before, after = [], None
    if args.before_args is not None:
        before = shlex.split(args.before_args)
    if args.after_args == "skip":
        return {"on-demand": before}, "prefetch mode skipped (--after-args skip)"
    if args.after_args is not None:
        after = shlex.split(args.after_args)
    if after is None:
        return ({"on-demand": before},
                "TODO(prefetch): the plugin has no --mlc-jit-prefetch option (pytest --help); "
                "only the on-demand mode is measured, beside the conftest prototype. Pass "
                "--before-args/--after-args to name the options.")
    return ({"before (no prefetch)": before, "after (prefetch)": after},
            f"prefetch modes: before {shlex.join(before) or '(no option)'}, after "
            f"{shlex.join(after) or '(no option)'}")


def target_mode(names: list[str]) -> str:
    """The mode the target applies to: the plugin with prefetching (or the only one)."""
    return "after (prefetch)" if "after (prefetch)" in names else names[0]


def run_ideal(root: Path, rep_dir: Path, configs: list[dict[str, int]], w: int,
              checks: Checks, *, rep: int) -> tuple[float, float, list[float]] | None:
    """The ideal variant of one repetition: (best schedule s, known-paths run s, the
    measured compile times)."""
    paths_suite = root / "paths"
    libs = rep_dir / "libs"
    libs.mkdir(parents=True)
    counter = rep_dir / "compiles.txt"
    solo = run_timed([sys.executable, "solo.py", str(libs), json.dumps(configs)],
                     cwd=paths_suite, env=bench_env(MLCJIT_BENCH_COUNT=str(counter)))
    if not checks.run_ok(solo, f"rep {rep} ideal: one-at-a-time compiles"):
        return None
    checks.expect(count_lines(counter) == len(configs),
                  f"rep {rep} ideal: {count_lines(counter)} compiles, expected {len(configs)}")
    times = [float(t) for t in json.loads((libs / "times.json").read_text())]
    off = run_timed(pytest_argv("-n", str(w), "-p", "no:mlcjit",
                                f"--basetemp={rep_dir / 'basetemp'}"),
                    cwd=paths_suite, env=bench_env(BENCH_LIB_PATHS=str(libs / "paths.json")))
    if not checks.run_ok(off, f"rep {rep} ideal: known-paths run"):
        return None
    return best_makespan(times, w), off.seconds, times


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    k, w = args.configs, args.workers
    print_header(
        "bench_makespan: cold wall time vs the ideal makespan",
        f"K={k} configs (layers {args.layers}), N={args.tests} tests per config, W={w} "
        f"workers, {args.reps} rep(s); ideal = best schedule over W workers of the K compile "
        "times measured one at a time + the same tests run on those libraries without the "
        "plugin; variants in rotating order")
    configs = make_configs(k, args.layers)
    checks = Checks(quick=args.quick)
    with work_dir(args, "makespan") as root:
        suite = write_suite(root / "suite", "plugin", configs, args.tests)
        (write_suite(root / "paths", "paths", configs, args.tests) / "solo.py").write_text(
            SOLO_PY, encoding="utf-8")
        mode_args, how = modes(args, suite)
        print(how, flush=True)
        suite_of = dict.fromkeys(mode_args, suite)
        if args.prototype or (not args.no_prototype and len(mode_args) == 1):
            proto = PROTOTYPE
            mode_args[proto] = next(iter(mode_args.values()))
            suite_of[proto] = write_suite(root / "prefetch", "plugin-prefetch", configs,
                                          args.tests)
        names = list(mode_args)
        cold: dict[str, list[float]] = {m: [] for m in names}
        ideal: dict[str, list[float]] = {"best": [], "off": [], "ideal": [], "sum": []}
        for rep in range(args.reps):
            this: dict[str, float] = {}
            for variant in rotate([*names, IDEAL], rep):
                if variant == IDEAL:
                    got = run_ideal(root, root / f"rep{rep}" / "ideal", configs, w, checks,
                                    rep=rep)
                    if got is None:
                        break
                    best, off_s, times = got
                    this[IDEAL] = best + off_s
                    for key, value in (("best", best), ("off", off_s), ("ideal", best + off_s),
                                       ("sum", sum(times))):
                        ideal[key].append(value)
                    print(f"rep {rep} {IDEAL:22} compiles one at a time "
                          f"{', '.join(f'{t:.2f}' for t in sorted(times))}s: best schedule on "
                          f"{w} {best:.2f}s + known-paths run {off_s:.2f}s = "
                          f"{best + off_s:.2f}s", flush=True)
                    continue
                rep_dir = root / f"rep{rep}" / f"mode{names.index(variant)}"
                rep_dir.mkdir(parents=True)
                counter, cache = rep_dir / "compiles.txt", rep_dir / "cache"
                run = run_timed(pytest_argv("-n", str(w), f"--basetemp={rep_dir / 'basetemp'}",
                                            "--mlc-device=cpu", f"--mlc-jit-cache-dir={cache}",
                                            *mode_args[variant]),
                                cwd=suite_of[variant],
                                env=bench_env(MLCJIT_BENCH_COUNT=str(counter)))
                checks.run_ok(run, f"rep {rep} {variant} cold")
                compiles = count_lines(counter)
                checks.expect(compiles == k, f"rep {rep} {variant}: {compiles} compiles, "
                                             f"expected K={k}")
                libs = libraries(cache)
                checks.expect(libs == k, f"rep {rep} {variant}: {libs} libraries "
                                              f"in the cache, expected K={k}")
                this[variant] = run.seconds
                print(f"rep {rep} {variant:22} cold {run.seconds:6.2f}s", flush=True)
            if len(this) != len(names) + 1:
                continue  # a variant failed (reported): no ratio for this rep
            for mode in names:
                cold[mode].append(this[mode])
            print(f"rep {rep}: cold / ideal " + ", ".join(
                f"{m} {this[m] / this[IDEAL]:.2f}" for m in names), flush=True)

    print()
    chosen = target_mode(names)
    rows = []
    for mode in names:
        fig = checks.figure(f"{mode}: cold / ideal", ratio_of(cold[mode], ideal["ideal"]),
                            TARGET if mode == chosen else None)
        rows.append([mode, spread(cold[mode]), f"{fig.ratio:.2f}x", fig.verdict()])
    if "before (no prefetch)" in names and "after (prefetch)" in names:
        checks.figure("after (prefetch) / before (no prefetch): cold wall",
                      ratio_of(cold["after (prefetch)"], cold["before (no prefetch)"]))
    print(table(["mode", "cold wall s", "cold / ideal", f"target <= {TARGET}x"], rows))
    print()
    print(table(["ideal: sum of compiles one at a time s", f"best schedule on {w} s",
                 "known-paths run s", "ideal s"],
                [[spread(ideal["sum"]), spread(ideal["best"]), spread(ideal["off"]),
                  spread(ideal["ideal"])]]))
    print("\nValues are median [min..max] over reps; ratios are medians of per-rep ratios, "
          "each rep running every variant in rotating order. Compile times are measured by "
          "this script one at a time (an idle core each), so the ideal is what W idle cores "
          f"could do; the target applies to {chosen}.")
    return checks.exit_code()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
