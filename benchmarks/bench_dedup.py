"""Benchmark 1, dedup: compilations and wall time of a cold ``pytest -n W`` run.

A generated suite has K model configs and N tests per config. Three ways to get the
libraries, each on a fresh cache in every repetition, in alternating order:

* ``pytest-mlcjit``: the ``compiled_model`` fixture (flock per key, persistent cache);
* ``xdist recipe``: the pytest-xdist docs recipe, a session fixture compiling under a
  ``filelock.FileLock`` in the run's shared basetemp dir (once per key per run, nothing
  persists to the next run);
* ``no lock``: MLC-style JIT, each worker compiles on a miss into a temp dir and moves
  the result into a persistent cache dir (up to W compiles of a key).

Compilations are counted by the benchmark's model factory (a line per call in a counter
file, written by whichever process compiles), and for pytest-mlcjit also by the libraries
in its cache directory. Each variant then runs again on what it left behind ("rerun"):
pytest-mlcjit compiles nothing, the recipe compiles everything again.

Figures, each the median of per-repetition ratios of runs measured by this script in the
same repetition (the variants' order rotating every repetition): pytest-mlcjit's compiles /
K (target: exactly 1, also a correctness check), and each baseline's wall time / ours,
cold and rerun (no target).

    python benchmarks/bench_dedup.py            # full: layers=64, K=4, N=4, W=2, 5 reps
    python benchmarks/bench_dedup.py --quick    # CI: tiny model, 1 rep, baselines compile
                                                # in the worker and do not rerun
"""

from __future__ import annotations

import argparse
import sys

from _benchlib import (
    Checks,
    bench_env,
    common_args,
    count_lines,
    libraries,
    make_configs,
    parse_ints,
    print_header,
    pytest_argv,
    ratio_of,
    rotate,
    run_timed,
    spread,
    table,
    work_dir,
    write_suite,
)

VARIANTS = ("pytest-mlcjit", "xdist recipe", "no lock")
SUITE_OF = {"pytest-mlcjit": "plugin", "xdist recipe": "recipe", "no lock": "nolock"}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common_args(parser)
    parser.add_argument("--workers", type=int, default=2, help="xdist workers W (default 2)")
    parser.add_argument("--configs", type=int, default=4, help="distinct configs K (default 4)")
    parser.add_argument("--tests", type=int, default=4, help="tests per config N (default 4)")
    parser.add_argument("--layers", type=parse_ints, default=[64],
                        help="transformer layers, cycled over the configs (default 64)")
    parser.add_argument("--reps", type=int, default=5, help="repetitions (default 5)")
    parser.add_argument("--baseline-compile", choices=("subprocess", "inprocess"),
                        default="subprocess",
                        help="how the baselines compile: a fresh python per compile like the "
                        "plugin (default), or inside the test worker")
    parser.add_argument("--no-rerun", action="store_true",
                        help="skip the second run of each variant on what the first left")
    args = parser.parse_args(argv)
    if args.quick:
        args.configs, args.tests, args.layers, args.reps = 2, 2, [1], 1
        args.baseline_compile = "inprocess"  # saves an `import tvm` per baseline compile
    if args.workers < 1:
        parser.error("--workers must be at least 1 (the recipe needs xdist)")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    k, w = args.configs, args.workers
    print_header(
        "bench_dedup: compilations and wall time, cold cache, pytest -n W",
        f"K={k} configs (layers {args.layers}), N={args.tests} tests per config, W={w} "
        f"workers, {args.reps} rep(s), baselines compile in a {args.baseline_compile}")
    configs = make_configs(k, args.layers)
    checks = Checks(quick=args.quick)
    results: dict[str, dict[str, list[float]]] = {
        v: {"compiles": [], "wall": [], "re_compiles": [], "re_wall": [], "libraries": [],
            "cpu": []} for v in VARIANTS}

    with work_dir(args, "dedup") as root:
        suites = {v: write_suite(root / SUITE_OF[v], SUITE_OF[v], configs, args.tests)
                  for v in VARIANTS}
        for rep in range(args.reps):
            for variant in rotate(VARIANTS, rep):
                rep_dir = root / f"rep{rep}" / SUITE_OF[variant]
                rep_dir.mkdir(parents=True)
                counter = rep_dir / "compiles.txt"
                cache = rep_dir / "cache"
                env = bench_env(MLCJIT_BENCH_COUNT=str(counter),
                                BENCH_NOLOCK_CACHE=str(cache),
                                BENCH_COMPILE_MODE=args.baseline_compile)
                extra = (["-p", "no:mlcjit"] if variant != "pytest-mlcjit" else
                         ["--mlc-device=cpu", f"--mlc-jit-cache-dir={cache}"])
                argv_ = pytest_argv("-n", str(w), f"--basetemp={rep_dir / 'basetemp'}", *extra)
                cold = run_timed(argv_, cwd=suites[variant], env=env)
                checks.run_ok(cold, f"rep {rep} {variant} cold")
                compiles = count_lines(counter)
                res = results[variant]
                res["compiles"].append(compiles)
                res["wall"].append(cold.seconds)
                res["cpu"].append(cold.cpu_seconds)
                rerun_s = float("nan")
                if variant == "pytest-mlcjit":
                    libs = libraries(cache)
                    res["libraries"].append(libs)
                    checks.expect(compiles == k, f"rep {rep}: pytest-mlcjit compiled {compiles} "
                                                 f"times, expected exactly K={k}")
                    checks.expect(libs == k, f"rep {rep}: {libs} libraries in the "
                                                  f"cache, expected K={k}")
                elif variant == "xdist recipe":
                    checks.expect(compiles == k, f"rep {rep}: the recipe compiled {compiles} "
                                                 f"times, expected K={k} (once per key per run)")
                else:
                    checks.expect(k <= compiles <= k * w,
                                  f"rep {rep}: no-lock JIT compiled {compiles} times, expected "
                                  f"between K={k} and K*W={k * w}")
                # --quick reruns only ours (it must compile nothing); a baseline's rerun
                # shows nothing new about the plugin.
                if not args.no_rerun and (variant == "pytest-mlcjit" or not args.quick):
                    again = run_timed(argv_, cwd=suites[variant], env=env)
                    checks.run_ok(again, f"rep {rep} {variant} rerun")
                    re_compiles = count_lines(counter) - compiles
                    res["re_compiles"].append(re_compiles)
                    res["re_wall"].append(again.seconds)
                    rerun_s = again.seconds
                    expected = k if variant == "xdist recipe" else 0
                    checks.expect(re_compiles == expected,
                                  f"rep {rep}: {variant} rerun compiled {re_compiles} times, "
                                  f"expected {expected}")
                print(f"rep {rep} {variant:14} cold {cold.seconds:6.2f}s ({compiles} compiles)"
                      f"  rerun {rerun_s:6.2f}s", flush=True)

    print()
    ours = results["pytest-mlcjit"]
    checks.figure("pytest-mlcjit compiles / K (cold)",
                  ratio_of(ours["compiles"], [k] * len(ours["compiles"])), 1.0)
    for variant in VARIANTS[1:]:
        res = results[variant]
        if len(res["wall"]) == len(ours["wall"]):
            checks.figure(f"{variant} / pytest-mlcjit: cold wall", ratio_of(res["wall"],
                                                                            ours["wall"]))
        if not args.no_rerun and len(res["re_wall"]) == len(ours["re_wall"]):
            checks.figure(f"{variant} / pytest-mlcjit: rerun wall",
                          ratio_of(res["re_wall"], ours["re_wall"]))

    headers = ["variant", "compiles (cold)", "cold wall s", "cold / ours", "cold CPU s"]
    if not args.no_rerun:
        headers += ["compiles (rerun)", "rerun wall s", "rerun / ours"]
    rows = []
    for variant in VARIANTS:
        res = results[variant]
        row: list[object] = [variant, spread(res["compiles"], "{:.0f}"), spread(res["wall"]),
                             f"{ratio_of(res['wall'], ours['wall']):.2f}x",
                             spread(res["cpu"], "{:.1f}")]
        if not args.no_rerun:
            row += [spread(res["re_compiles"], "{:.0f}"), spread(res["re_wall"]),
                    f"{ratio_of(res['re_wall'], ours['re_wall']):.2f}x"]
        rows.append(row)
    print(table(headers, rows))
    print(f"\nK={k}: pytest-mlcjit performed exactly K compilations in "
          f"{sum(c == k for c in ours['compiles'])}/{args.reps} reps (libraries in its "
          f"cache {spread(ours['libraries'], '{:.0f}')}).")
    print("Values are median [min..max] over reps; ratios are medians of per-rep ratios; "
          "CPU s is user+system time of the whole process tree (workers and compilers).")
    return checks.exit_code()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
