"""Benchmark 7, remote tier: a run on a fresh local cache whose libraries all come from
the remote, against a warm local run of the same suite. Target: at most 1.15x.

The remote is moto's S3 server on 127.0.0.1 (an HTTP round trip per object, as with MinIO
or S3 in the same region); ``--latency-ms MS`` puts a proxy in front of it that holds each
request MS milliseconds before the server sees it, the round trip of a remote region. A
first run fills the remote; then, in an order that rotates every repetition, a warm run
(every library in the local cache), a fresh run (an empty local cache: every library
downloaded, checked and published locally; the remote hits fetched ahead of time, right
after collection, ``MLC_JIT_REMOTE_AHEAD`` at once) and, for comparison, a fresh run that
downloads each library only when a test first asks (``MLC_JIT_REMOTE_AHEAD=0``, as before
remote hits were fetched ahead; no target). Measured from the outside: the fresh runs must
compile nothing (the benchmark's model factory counts compiles) and leave the K libraries
in their local cache (counted on the filesystem).

Part ``down`` (``--parts fresh,down``): what an unusable remote costs a cold run, against
the same cold run with no remote configured, in rotating order: a remote whose server is
gone (connection refused) and one that accepts connections and never answers (connect and
read timeouts of 1 s): each run must compile every library locally and pass. These
figures have no target (the old tests' bounds, 60 s and 120 s, were safety limits); they
show the cost.

    python benchmarks/bench_remote.py            # full: layers=8, K=4, N=10, W=0 and 2, 5 reps
    python benchmarks/bench_remote.py --latency-ms 25 --parts fresh   # a remote region
    python benchmarks/bench_remote.py --quick    # CI: tiny model, W=0, K=2, 2 rounds (down:
                                                 # K=1, 1 round, refused only)
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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
    xdist_args,
)

TARGET = 1.15
PARTS = ("fresh", "down")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_args(parser)
    parser.add_argument("--parts", default="fresh,down",
                        help="fresh (remote hits vs warm local), down (an unusable remote vs "
                        "none, cold); default fresh,down")
    parser.add_argument("--configs", type=int, default=4, help="K distinct libraries")
    parser.add_argument("--tests", type=int, default=10, help="N tests per library")
    parser.add_argument("--layers", type=parse_ints, default=[8], help="transformer layers")
    parser.add_argument("--workers", type=parse_ints, default=[0, 2],
                        help="xdist worker counts (0: without xdist)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--latency-ms", type=float, default=0.0,
                        help="hold each request to the remote this long (part fresh): the "
                        "round trip of a remote region; default 0 (127.0.0.1)")
    parser.add_argument("--down-configs", type=int, default=None,
                        help="K for the part down (default: --configs)")
    parser.add_argument("--down-reps", type=int, default=None,
                        help="rounds of the part down (default: --reps)")
    args = parser.parse_args(argv)
    args.parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if not args.parts <= set(PARTS):
        parser.error(f"--parts takes a comma-separated subset of {','.join(PARTS)}")
    if args.quick:
        args.configs, args.tests, args.layers, args.workers, args.reps = 2, 2, [1], [0], 2
        args.down_configs, args.down_reps = 1, 1
    args.down_configs = args.down_configs or args.configs
    args.down_reps = args.down_reps or args.reps
    return args


def start_server() -> tuple[Any, str]:
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


@contextmanager
def stalled_endpoint() -> Iterator[str]:
    """An endpoint that accepts connections and never answers."""
    sock = socket.create_server(("127.0.0.1", 0))
    sock.settimeout(0.1)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                held.append(sock.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        sock.close()


def refused_endpoint() -> str:
    """An endpoint where nothing listens (a port just closed)."""
    with socket.create_server(("127.0.0.1", 0)) as sock:
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


#: The fresh variants: remote hits fetched ahead of time (the default), or each when a
#: test first asks (``MLC_JIT_REMOTE_AHEAD=0``).
FRESH = {"fresh": {}, "asked": {"MLC_JIT_REMOTE_AHEAD": "0"}}


def part_fresh(args: argparse.Namespace, root: Path, suite: Path, aws: dict[str, str],
               checks: Checks) -> list[list[object]]:
    k = args.configs
    counter = root / "compiles.txt"
    env = bench_env(MLCJIT_BENCH_COUNT=str(counter), **aws)
    warm_cache = root / "warm"
    fill = run_timed(pytest_argv("--mlc-device=cpu", f"--mlc-jit-cache-dir={warm_cache}",
                                 *xdist_args(max(args.workers))), cwd=suite, env=env)
    checks.run_ok(fill, "filling the remote")
    checks.expect(count_lines(counter) == k,
                  f"the fill compiled {count_lines(counter)} times, expected K={k}")
    rows: list[list[object]] = []
    for workers in args.workers:
        times: dict[str, list[float]] = {"warm": [], **{v: [] for v in FRESH}}
        for rep in range(args.reps):
            this: dict[str, float] = {}
            for variant in rotate(list(times), rep):
                cache = warm_cache if variant == "warm" else root / f"{variant}-w{workers}-{rep}"
                before = count_lines(counter)
                run = run_timed(pytest_argv("--mlc-device=cpu", f"--mlc-jit-cache-dir={cache}",
                                            *xdist_args(workers)), cwd=suite,
                                env={**env, **FRESH.get(variant, {})})
                if checks.run_ok(run, f"{variant} run, W={workers}, rep {rep}"):
                    this[variant] = run.seconds
                checks.expect(count_lines(counter) == before,
                              f"the {variant} run (W={workers}, rep {rep}) compiled")
                checks.expect(libraries(cache) == k,
                              f"the {variant} run (W={workers}, rep {rep}) left "
                              f"{libraries(cache)} libraries in its local cache, expected K={k}")
            if len(this) == len(times):
                for variant, seconds in this.items():
                    times[variant].append(seconds)
                print(f"W={workers} rep {rep}: warm {this['warm']:.2f}s, fresh (all remote "
                      f"hits, fetched ahead) {this['fresh']:.2f}s, ratio "
                      f"{this['fresh'] / this['warm']:.3f}; fetched when asked "
                      f"{this['asked']:.2f}s, ratio {this['asked'] / this['warm']:.3f}",
                      flush=True)
        fig = checks.figure(f"W={workers}: fresh local cache, all remote hits / warm local",
                            ratio_of(times["fresh"], times["warm"]), TARGET)
        asked = checks.figure(f"W={workers}: the same, each fetched when a test asks "
                              "(MLC_JIT_REMOTE_AHEAD=0) / warm local",
                              ratio_of(times["asked"], times["warm"]))
        rows.append([f"W={workers}", spread(times["warm"]), spread(times["fresh"]),
                     f"{fig.ratio:.3f}x", fig.verdict(), spread(times["asked"]),
                     f"{asked.ratio:.3f}x"])
    return rows


@contextmanager
def delayed(endpoint: str, seconds: float) -> Iterator[str]:
    """A TCP proxy in front of ``endpoint`` (``http://host:port``) that holds what a client
    sends for ``seconds`` before passing it on (the answers pass at once): each request
    takes a round trip of about ``seconds`` more, as it does to a remote region."""
    host, port = endpoint.rsplit("/", 1)[-1].rsplit(":", 1)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    stop = threading.Event()
    conns: list[socket.socket] = []

    def pump(src: socket.socket, dst: socket.socket, delay: float) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if delay:
                    time.sleep(delay)
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def accept() -> None:
        while not stop.is_set():
            try:
                client = listener.accept()[0]
            except OSError:
                continue
            server = socket.create_connection((host, int(port)))
            conns.extend((client, server))
            for src, dst, delay in ((client, server, seconds), (server, client, 0.0)):
                threading.Thread(target=pump, args=(src, dst, delay), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        for conn in conns:
            conn.close()
        listener.close()


def part_down(args: argparse.Namespace, root: Path, aws: dict[str, str],
              checks: Checks) -> list[list[object]]:
    k = args.down_configs
    suite = write_suite(root / "down-suite", "plugin", make_configs(k, args.layers), args.tests)
    rows: list[list[object]] = []
    with stalled_endpoint() as stalled:
        endpoints = {"refused": refused_endpoint(), "stalled": stalled}
        for workers in args.workers:
            # --quick: the refused remote only (the stalled one waits for its timeouts).
            times: dict[str, list[float]] = {"no remote": [], "refused": []}
            if not args.quick:
                times["stalled"] = []
            for rep in range(args.down_reps):
                this: dict[str, float] = {}
                for variant in rotate(list(times), rep):
                    rep_dir = root / f"down-w{workers}-{rep}-{variant.replace(' ', '-')}"
                    counter, cache = rep_dir / "compiles.txt", rep_dir / "cache"
                    extra = {} if variant == "no remote" else {
                        **aws, "AWS_ENDPOINT_URL": endpoints[variant],
                        "MLC_JIT_REMOTE": f"s3://down-{variant}/bench",
                        "MLC_JIT_REMOTE_CONNECT_TIMEOUT": "1",
                        "MLC_JIT_REMOTE_READ_TIMEOUT": "1"}
                    run = run_timed(pytest_argv("--mlc-device=cpu",
                                                f"--mlc-jit-cache-dir={cache}",
                                                f"--basetemp={rep_dir / 'bt'}",
                                                *xdist_args(workers)), cwd=suite,
                                    env=bench_env(MLCJIT_BENCH_COUNT=str(counter), **extra))
                    if checks.run_ok(run, f"down: {variant} W={workers} rep {rep}"):
                        this[variant] = run.seconds
                    checks.expect(count_lines(counter) == k and libraries(cache) == k,
                                  f"down: {variant} W={workers} rep {rep}: "
                                  f"{count_lines(counter)} compiles and {libraries(cache)} "
                                  f"libraries, expected K={k} of each")
                if len(this) == len(times):
                    for variant, seconds in this.items():
                        times[variant].append(seconds)
                    print(f"down W={workers} rep {rep}: " + ", ".join(
                        f"{v} {s:.2f}s" for v, s in this.items()), flush=True)
            row: list[object] = [f"W={workers}", spread(times["no remote"])]
            for variant in ("refused", "stalled"):
                if variant not in times:
                    row += ["-", "-"]
                    continue
                fig = checks.figure(f"W={workers}: cold, remote {variant} / no remote",
                                    ratio_of(times[variant], times["no remote"]))
                row += [spread(times[variant]), f"{fig.ratio:.3f}x"]
            rows.append(row)
    return rows


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    k = args.configs
    print_header("bench_remote: fresh local cache, every library a remote hit, vs warm local; "
                 "an unusable remote vs none",
                 f"parts {','.join(p for p in PARTS if p in args.parts)}; K={k} libraries "
                 f"(layers {args.layers}), N={args.tests} tests each, workers {args.workers}, "
                 f"{args.reps} rep(s); remote: moto S3 on 127.0.0.1"
                 + (f" behind {args.latency_ms:g} ms of latency per request"
                    if args.latency_ms else ""))
    checks = Checks(quick=args.quick)
    aws = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_DEFAULT_REGION": "us-east-1"}
    fresh_rows: list[list[object]] = []
    down_rows: list[list[object]] = []
    with work_dir(args, "remote") as root:
        suite = write_suite(root / "suite", "plugin", make_configs(k, args.layers), args.tests)
        if "fresh" in args.parts:
            server, endpoint = start_server()
            try:
                bucket = f"bench-{uuid.uuid4().hex[:8]}"
                import boto3  # type: ignore[import-untyped]

                boto3.session.Session().client(
                    "s3", endpoint_url=endpoint, aws_access_key_id="bench",
                    aws_secret_access_key="bench", region_name="us-east-1",
                ).create_bucket(Bucket=bucket)
                with (delayed(endpoint, args.latency_ms / 1000) if args.latency_ms
                      else contextlib.nullcontext(endpoint)) as url:
                    fresh_rows = part_fresh(args, root, suite, {
                        **aws, "AWS_ENDPOINT_URL": url,
                        "MLC_JIT_REMOTE": f"s3://{bucket}/bench"}, checks)
            finally:
                server.stop()
        if "down" in args.parts:
            down_rows = part_down(args, root, aws, checks)
    if fresh_rows:
        print("\n" + table(["workers", "warm local s", "fresh, all remote hits s", "ratio",
                            f"target <= {TARGET}x", "fetched when asked s", "ratio"],
                           fresh_rows))
    if down_rows:
        print("\nA cold run with an unusable remote against the same run with none:\n")
        print(table(["workers", "no remote s", "refused s", "refused / none", "stalled s",
                     "stalled / none"], down_rows))
    print("\nValues are median [min..max] over reps; ratios are medians of per-rep ratios.")
    return checks.exit_code()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
