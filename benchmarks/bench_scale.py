"""Benchmark 5, scale: lookups, prune and memory with many entries in the cache.

Caches of 10 and 10,000 entries are synthesized in the real layout (``tvm/<digest>.so``,
``.manifest.json`` and ``.log``, ``.mlcjit/usage/<digest>``): the keys are the ones
``JIT.request`` computes for ``TVMModel("scalemodel:build", config={"i": i})``, the
manifests carry the real fields, and each library is a small file of random bytes whose
SHA-256 and size the manifest records (so every lookup is a verified hit; the factory
raises if anything would compile).

* lookup time, 10 vs 10,000 entries, in a fresh process per repetition (sizes
  alternating): the first ``JIT.compile`` request of a key under READONLY (key, manifest,
  checksum) and under ON (the same plus rewriting the key's usage record), a repeated
  request (memoized), and ``LocalStore.read_manifest`` + ``LocalStore.verify`` on a fresh
  ``LocalStore``, each timed by the probe. Figure: 10,000 / 10, the median of the
  per-repetition ratios; target "flat": <= 1.1x.
* ``pytest-mlcjit prune`` over 10,000 entries (``python -m pytest_mlcjit prune``), evicting
  half (``--keep-last-used``) and evicting nothing (the scan alone), against a plain script
  that does the same job on a copy of the same cache with no locks and no manifest reads
  (read every usage record and stat every entry file; unlink the evicted entries' files),
  alternating. Figure: prune / plain script; no target (the old one, < 2 s, was an
  absolute time on one machine). Both must leave exactly the most recently used entries.
* memory of one process after 100 and after 1,000 hits: RSS (``/proc/self/status``) and
  Python's allocated blocks. Figure: blocks retained per hit; target < 1 (no object kept
  per hit).

No figure comes from the plugin: a lookup that missed would call the factory, which
raises, and the libraries on disk are counted before and after.

    python benchmarks/bench_scale.py            # full: 10 vs 10,000 entries, 5 reps
    python benchmarks/bench_scale.py --quick    # CI: 10 vs 300 entries, 2 reps
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _benchlib import (
    Checks,
    bench_env,
    common_args,
    libraries,
    parse_ints,
    print_header,
    ratio_of,
    rotate,
    run_timed,
    spread,
    table,
    work_dir,
)

FLAT_TARGET = 1.1
BLOCKS_PER_HIT_TARGET = 1.0
LOOKUP_FIELDS = {"first_ro_us": "first request of a key, READONLY",
                 "first_us": "first request of a key, ON (+ usage record)",
                 "repeat_us": "repeated request", "read_verify_us": "read_manifest + verify"}

#: The plain prune: ``python plain_prune.py ROOT KEEP`` keeps the KEEP most recently used
#: entries (by their usage records) and unlinks the others' files; ``KEEP`` = ``all``
#: only scans (reads every usage record, stats every entry file). No locks, no manifests.
PLAIN_PRUNE_PY = '''\
import os
import sys

root, keep = sys.argv[1], sys.argv[2]
usage = os.path.join(root, ".mlcjit", "usage")
stamps = {}
for item in os.scandir(usage):
    with open(item.path) as f:
        stamps[item.name] = float(f.read())
entries = os.path.join(root, "tvm")
size = sum(item.stat().st_size for item in os.scandir(entries) if item.is_file())
if keep != "all":
    for digest in sorted(stamps, key=stamps.get, reverse=True)[int(keep):]:
        for path in (os.path.join(entries, digest + suffix)
                     for suffix in (".so", ".manifest.json", ".log")):
            os.unlink(path)
        os.unlink(os.path.join(usage, digest))
        os.unlink(os.path.join(root, ".mlcjit", "locks", digest + ".lock"))
print(size)
'''
FACTORY_PY = '''\
"""bench_scale's factory: every entry is synthesized, so a call means a lookup missed."""


def build(**config):
    raise RuntimeError(f"bench_scale: {config} should have been a cache hit")
'''


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common_args(parser)
    parser.add_argument("--sizes", type=parse_ints, default=[10, 10_000],
                        help="cache sizes to compare (default 10,10000); the largest is "
                        "used for prune and memory")
    parser.add_argument("--reps", type=int, default=5, help="repetitions (default 5)")
    parser.add_argument("--sample", type=int, default=50,
                        help="keys looked up per process (default 50, at most the smallest "
                        "size - 1)")
    parser.add_argument("--lib-bytes", type=int, default=16 * 1024,
                        help="size of each fake library (default 16 KiB)")
    parser.add_argument("--hits", type=int, default=1000,
                        help="hits for the memory measurement (default 1000)")
    parser.add_argument("--_lookup", nargs=3, metavar=("ROOT", "N", "SEED"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--_memory", nargs=2, metavar=("ROOT", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.reps, args.sample, args.hits = [10, 300], 2, 20, 200
    return args


def spec_for(i: int) -> Any:
    from pytest_mlcjit import TVMModel

    return TVMModel("scalemodel:build", config={"i": i})


# -- synthesis ------------------------------------------------------------------------------
def synthesize(root: Path, n: int, lib_bytes: int, factory_dir: Path) -> float:
    """Write ``n`` verified entries under ``root``; returns the seconds it took."""
    import hashlib

    from pytest_mlcjit import JIT, Settings
    from pytest_mlcjit.cache.store.local import LocalStore

    if str(factory_dir) not in sys.path:
        sys.path.insert(0, str(factory_dir))
    t0 = time.perf_counter()
    store = LocalStore(root).open_for_writing()  # the root and .mlcjit/ as the plugin makes them
    engine = JIT(Settings(cache_dir=root))
    now = time.time()
    params = [{"dtype": "float32", "name": f"blocks.{j}.weight", "shape": [32, 32]}
              for j in range(12)]
    rng = random.Random(n)
    for i in range(n):
        req = engine.request(spec_for(i), "cpu")
        paths = engine.paths(req)
        paths.library.parent.mkdir(exist_ok=True)
        data = rng.randbytes(lib_bytes)
        paths.library.write_bytes(data)
        paths.log.write_text(f"[bench_scale] synthesized entry {i}\n", encoding="utf-8")
        manifest = {
            "backend": "tvm", "compile_seconds": 1.0 + i % 7, "created": now - 86400 - i,
            "digest": req.digest, "format": req.key.get("format"), "functions": ["forward"],
            "host": "bench", "key": req.key, "library": paths.library.name,
            "log": paths.log.name, "params": params, "plugin_version": "bench",
            "run_id": "bench-scale", "sha256": hashlib.sha256(data).hexdigest(),
            "size": len(data), "target_str": '{"kind":"llvm"}',
            "toolchain": req.key.get("toolchain"), "tvm_version": "bench",
        }
        paths.manifest.write_text(json.dumps(manifest, indent=1, sort_keys=True),
                                  encoding="utf-8")
        # The key's one input state, as a compile lists it (an entry no variant names is
        # never selected): a synthesized factory reads nothing.
        store.records.add_variant(paths.library.parent, req.digest, {
            "entry": req.digest, "created": manifest["created"],
            "inputs": {"roots": [], "modules": [], "files": [], "dists": {}}})
        # Entry i was last used i seconds before entry 0: prune keeps the lowest i.
        (root / ".mlcjit" / "usage" / req.digest).write_text(f"{now - 3600 - i:.3f}\n",
                                                             encoding="ascii")
        # A compiled entry leaves its (empty, unlocked) lock file behind, as here.
        (root / ".mlcjit" / "locks" / f"{req.digest}.lock").touch(mode=0o644)
    return time.perf_counter() - t0


# -- probes (each in a fresh interpreter) ---------------------------------------------------
def lookup_probe(root: Path, n: int, seed: int, sample: int) -> dict[str, Any]:
    from pytest_mlcjit import JIT, Policy, Settings
    from pytest_mlcjit.cache.store.local import LocalStore

    sys.path.insert(0, str(root.parent))
    keys = random.Random(seed).sample(range(n), min(n, sample + 1))
    specs = [spec_for(i) for i in keys[1:]]
    # READONLY first: key, manifest and checksum only (no usage record is written).
    reader = JIT(Settings(cache_dir=root, policy=Policy.READONLY))
    reader.compile(spec_for(keys[0]), "cpu")  # one-time set-up, not timed
    first_ro = []
    for spec in specs:
        t0 = time.perf_counter()
        reader.compile(spec, "cpu")
        first_ro.append(time.perf_counter() - t0)
    # ON, what a test run does: the same, plus rewriting the key's usage record.
    engine = JIT(Settings(cache_dir=root))
    engine.compile(spec_for(keys[0]), "cpu")
    first, repeat, read_verify = [], [], []
    for spec in specs:
        t0 = time.perf_counter()
        engine.compile(spec, "cpu")
        first.append(time.perf_counter() - t0)
    for _ in range(20):
        for spec in specs:
            t0 = time.perf_counter()
            engine.compile(spec, "cpu")
            repeat.append(time.perf_counter() - t0)
    for spec in specs:
        paths = engine.paths(engine.request(spec, "cpu"))
        cache = LocalStore(root)
        t0 = time.perf_counter()
        manifest = cache.read_manifest(paths)
        assert manifest is not None
        cache.verify(paths, manifest)
        read_verify.append(time.perf_counter() - t0)
    return {"first_ro_us": statistics.median(first_ro) * 1e6,
            "first_us": statistics.median(first) * 1e6,
            "repeat_us": statistics.median(repeat) * 1e6,
            "read_verify_us": statistics.median(read_verify) * 1e6}


def rss_kib() -> int:
    try:
        for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def memory_probe(root: Path, n: int, hits: int) -> dict[str, Any]:
    from pytest_mlcjit import JIT, Settings

    sys.path.insert(0, str(root.parent))

    def snapshot() -> tuple[int, int]:
        gc.collect()
        return rss_kib(), sys.getallocatedblocks()

    engine = JIT(Settings(cache_dir=root))
    hot = [spec_for(i) for i in range(min(10, n))]
    for spec in hot:
        engine.compile(spec, "cpu")
    marks: dict[int, tuple[int, int]] = {}
    for h in range(1, hits + 1):
        engine.compile(hot[h % len(hot)], "cpu")
        if h in (hits // 10, hits):
            marks[h] = snapshot()
    (rss_a, blocks_a), (rss_b, blocks_b) = marks[hits // 10], marks[hits]
    out: dict[str, Any] = {"hit_rss_kib": [rss_a, rss_b], "hit_blocks": [blocks_a, blocks_b],
                           "hits": [hits // 10, hits]}
    distinct = min(hits, n - len(hot))  # first requests of new keys: memo grows per key
    if distinct >= 10:
        marks = {}
        for j in range(1, distinct + 1):
            engine.compile(spec_for(len(hot) + j - 1), "cpu")
            if j in (distinct // 10, distinct):
                marks[j] = snapshot()
        (rss_a, blocks_a), (rss_b, blocks_b) = marks[distinct // 10], marks[distinct]
        out.update(key_rss_kib=[rss_a, rss_b], key_blocks=[blocks_a, blocks_b],
                   keys=[distinct // 10, distinct])
    return out


# -- prune ----------------------------------------------------------------------------------
def prune_cli(env: dict[str, str]) -> list[str] | None:
    """The prune command line if the CLI exists here, else None."""
    for argv in ([sys.executable, "-m", "pytest_mlcjit", "prune"],
                 [shutil.which("pytest-mlcjit") or "pytest-mlcjit", "prune"]):
        try:
            proc = subprocess.run([*argv, "--help"], capture_output=True, text=True,
                                  env=env, check=False)
        except OSError:
            continue
        if proc.returncode == 0 and "--keep-last-used" in proc.stdout:
            return argv
    return None


def kept_by_recency(root: Path, keep: int) -> set[str]:
    usage = root / ".mlcjit" / "usage"
    stamps = {p.name: float(p.read_text(encoding="ascii")) for p in usage.iterdir()}
    return set(sorted(stamps, key=lambda d: stamps[d], reverse=True)[:keep])


def measure_lookups(args: argparse.Namespace, sizes: list[int], roots: dict[int, Path],
                    checks: Checks) -> None:
    """Lookups at each size, sizes alternating; prints the table, records the figures."""
    me, env = str(Path(__file__).resolve()), bench_env()
    per_rep: list[dict[int, dict[str, float]]] = []
    for rep in range(args.reps):
        this: dict[int, dict[str, float]] = {}
        for size in rotate([str(s) for s in sizes], rep):
            n = int(size)
            before = libraries(roots[n])
            proc = subprocess.run([sys.executable, me, "--_lookup", str(roots[n]), size,
                                   str(rep), "--sample", str(args.sample)],
                                  capture_output=True, text=True, env=env, check=False)
            # A miss would call the factory, which raises: the probe would fail.
            checks.expect(libraries(roots[n]) == before, f"n={n}: a lookup added a library")
            if proc.returncode != 0:
                checks.expect(False, f"lookup probe n={n} failed (a miss raises):\n"
                                     f"{proc.stderr[-3000:]}")
                continue
            this[n] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"rep {rep} n={n}: first READONLY {this[n]['first_ro_us']:.0f}us  first ON "
                  f"{this[n]['first_us']:.0f}us  repeat {this[n]['repeat_us']:.1f}us  "
                  f"read+verify {this[n]['read_verify_us']:.0f}us", flush=True)
        if len(this) == len(sizes):
            per_rep.append(this)
    small, big = sizes[0], sizes[-1]
    print("\nLookup time by cache size (fresh process per rep; median over keys, then over "
          "reps):\n")
    rows: list[list[object]] = [
        [n, *[spread([r[n][f] for r in per_rep], "{:.1f}") for f in LOOKUP_FIELDS]]
        for n in sizes]
    ratios: list[object] = [f"{big} / {small}"]
    for field, what in LOOKUP_FIELDS.items():
        fig = checks.figure(f"lookup at {big} / at {small} entries: {what}",
                            ratio_of([r[big][field] for r in per_rep],
                                     [r[small][field] for r in per_rep]), FLAT_TARGET)
        ratios.append(f"{fig.ratio:.2f}x ({fig.verdict()})")
    rows.append(ratios)
    print(table(["entries", *(f"{w} us" for w in LOOKUP_FIELDS.values())], rows))
    print("\n(READONLY: key, manifest read, SHA-256 of the library. ON adds rewriting "
          "the key's usage record, whose cost depends on how recently that file was last "
          f"written: the {small}-entry cache's keys are all used again in every rep, the "
          f"larger cache's are mostly fresh. Target for each ratio: <= {FLAT_TARGET}x.)")


def measure_prune(args: argparse.Namespace, work: Path, pristine: Path, big: int,
                  checks: Checks) -> None:
    """The prune CLI against the plain script, alternating, on copies of ``pristine``."""
    env = bench_env()
    cli = prune_cli(env)
    if cli is None:
        checks.expect(False, "no 'python -m pytest_mlcjit prune' with --keep-last-used")
        return
    plain = work / "plain_prune.py"
    plain.write_text(PLAIN_PRUNE_PY, encoding="utf-8")
    keep = big // 2
    scenarios = {f"evict {big - keep} (--keep-last-used {keep})":
                 (["--keep-last-used", str(keep)], str(keep)),
                 "evict none (--older-than 3650d: scan only)":
                 (["--older-than", "3650d"], "all")}
    rows = []
    for label, (opts, plain_keep) in scenarios.items():
        times: dict[str, list[float]] = {"prune": [], "plain": []}
        for rep in range(args.reps):
            this: dict[str, float] = {}
            for variant in rotate(["prune", "plain"], rep):
                copy = work / f"prune-{rep}-{variant}"
                shutil.copytree(pristine, copy)
                root = copy / "cache"
                want = kept_by_recency(root, keep if plain_keep != "all" else big)
                argv = ([*cli, "--cache-dir", str(root), "--json", *opts] if variant == "prune"
                        else [sys.executable, str(plain), str(root), plain_keep])
                run = run_timed(argv, cwd=work, env=env)
                if checks.run_ok(run, f"{variant} {label} rep {rep}"):
                    this[variant] = run.seconds
                    left = {p.name.split(".")[0] for p in (root / "tvm").glob("*.manifest.json")}
                    checks.expect(left == want,
                                  f"{variant} {label}: {len(left)} entries left, expected the "
                                  f"{len(want)} most recently used")
                shutil.rmtree(copy, ignore_errors=True)
            if len(this) == 2:
                for variant, seconds in this.items():
                    times[variant].append(seconds)
        fig = checks.figure(f"prune of {big} entries, {label} / plain script",
                            ratio_of(times["prune"], times["plain"]))
        rows.append([label, big, spread(times["prune"]), spread(times["plain"]),
                     f"{fig.ratio:.2f}x"])
    print(f"\nprune over {big} entries (wall time of the process), against a plain script "
          "doing the same job without locks or manifests:\n")
    print(table(["prune", "entries", "pytest-mlcjit prune s", "plain script s",
                 "prune / plain"], rows))


def measure_memory(args: argparse.Namespace, root: Path, big: int, checks: Checks) -> None:
    before = libraries(root)
    mem = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_memory",
                          str(root), str(big), "--hits", str(args.hits)],
                         capture_output=True, text=True, env=bench_env(), check=False)
    checks.expect(libraries(root) == before, "the memory probe added a library")
    if mem.returncode != 0:
        checks.expect(False, f"memory probe failed (a miss raises):\n{mem.stderr[-3000:]}")
        return
    memory = json.loads(mem.stdout.strip().splitlines()[-1])
    a, b = memory["hits"]
    rss, blocks = memory["hit_rss_kib"], memory["hit_blocks"]
    fig = checks.figure("Python blocks retained per hit", (blocks[1] - blocks[0]) / (b - a),
                        BLOCKS_PER_HIT_TARGET, strict=True)
    mrows: list[list[object]] = [[
        f"{a} -> {b} hits on 10 keys", f"{rss[0]} -> {rss[1]}", f"{rss[1] - rss[0]:+d}",
        f"{blocks[0]} -> {blocks[1]}", f"{fig.ratio:+.3f} ({fig.verdict()})"]]
    if "keys" in memory:
        a, b = memory["keys"]
        rss, blocks = memory["key_rss_kib"], memory["key_blocks"]
        mrows.append([f"{a} -> {b} distinct keys (first requests)",
                      f"{rss[0]} -> {rss[1]}", f"{rss[1] - rss[0]:+d}",
                      f"{blocks[0]} -> {blocks[1]}",
                      f"{(blocks[1] - blocks[0]) / (b - a):+.1f} (per key, no target)"])
    print(f"\nMemory of one process (JIT on the {big}-entry cache):\n")
    print(table(["phase", "RSS KiB", "RSS growth KiB", "Python allocated blocks",
                 f"blocks per hit/key (target per hit < {BLOCKS_PER_HIT_TARGET:g})"], mrows))


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args._lookup:
        root, n, seed = Path(args._lookup[0]), int(args._lookup[1]), int(args._lookup[2])
        print(json.dumps(lookup_probe(root, n, seed, args.sample)))
        return 0
    if args._memory:
        print(json.dumps(memory_probe(Path(args._memory[0]), int(args._memory[1]), args.hits)))
        return 0
    sizes = sorted(set(args.sizes))
    big = sizes[-1]
    if len(sizes) < 2 or sizes[0] < 2:
        print("--sizes: two sizes or more, each at least 2", file=sys.stderr)
        return 2
    # The same number of keys in every size, so that the medians are comparable (the first
    # few requests of a process are slower whatever the cache holds).
    args.sample = min(args.sample, sizes[0] - 1)
    print_header("bench_scale: lookups, prune and memory with many cache entries",
                 f"sizes {sizes}, {args.reps} rep(s), {args.sample} keys looked up per "
                 f"process, fake libraries of {args.lib_bytes} bytes, {args.hits} hits")
    checks = Checks(quick=args.quick)
    with work_dir(args, "scale") as work:
        roots: dict[int, Path] = {}
        for n in sizes:
            base = work / f"n{n}"
            base.mkdir()
            (base / "scalemodel.py").write_text(FACTORY_PY, encoding="utf-8")
            roots[n] = base / "cache"
            took = synthesize(roots[n], n, args.lib_bytes, base)
            print(f"synthesized {n} entries in {took:.1f}s", flush=True)
        pristine = work / "pristine"  # for prune: before any lookup touches usage records
        shutil.copytree(roots[big].parent, pristine)
        measure_lookups(args, sizes, roots, checks)
        measure_prune(args, work, pristine, big, checks)
        measure_memory(args, roots[big], big, checks)
    print("\nValues are median [min..max] over reps; ratios are medians of per-rep ratios.")
    return checks.exit_code()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
