"""Benchmark 6, remote tier: a run on a fresh local cache whose libraries all come from
the remote, against a warm local run of the same suite. Target: at most 1.5x.

The remote is moto's S3 server on 127.0.0.1 (an HTTP round trip per object, as with MinIO
or S3 in the same region; the network latency of a real region comes on top). A first run
fills the remote; then, alternating in each repetition, a warm run (every library in the
local cache) and a fresh run (an empty local cache: every library downloaded, checked and
published locally). Compiles are counted by the benchmark's model factory: the fresh runs
must compile nothing.

    python benchmarks/bench_remote.py            # full: layers=8, K=4, N=10, W=0 and 2, 5 reps
    python benchmarks/bench_remote.py --quick    # CI: tiny model, 1 rep, checks counts only
"""

from __future__ import annotations

import argparse
import re
import sys
import uuid
from typing import Any

from _benchlib import (
    Checks,
    bench_env,
    common_args,
    count_lines,
    make_configs,
    median,
    parse_ints,
    print_header,
    pytest_argv,
    rotate,
    run_timed,
    table,
    work_dir,
    write_suite,
    xdist_args,
)

_DOWNLOADS_RE = re.compile(r"remote \S+: (\d+) downloads?")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_args(parser)
    parser.add_argument("--configs", type=int, default=4, help="K distinct libraries")
    parser.add_argument("--tests", type=int, default=10, help="N tests per library")
    parser.add_argument("--layers", type=parse_ints, default=[8], help="transformer layers")
    parser.add_argument("--workers", type=parse_ints, default=[0, 2],
                        help="xdist worker counts (0: without xdist)")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)
    if args.quick:
        args.configs, args.tests, args.layers, args.workers, args.reps = 2, 2, [1], [2], 1
    return args


def start_server() -> tuple[Any, str]:
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    k = args.configs
    print_header("bench_remote: fresh local cache, every library a remote hit, vs warm local",
                 f"K={k} libraries (layers {args.layers}), N={args.tests} tests each, "
                 f"workers {args.workers}, {args.reps} rep(s); remote: moto S3 on 127.0.0.1")
    checks = Checks()
    server, endpoint = start_server()
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    aws = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint,
           "MLC_JIT_REMOTE": f"s3://{bucket}/bench"}
    import boto3  # type: ignore[import-untyped]

    boto3.session.Session().client(
        "s3", endpoint_url=endpoint, aws_access_key_id="bench", aws_secret_access_key="bench",
        region_name="us-east-1").create_bucket(Bucket=bucket)
    rows = []
    try:
        with work_dir(args, "remote") as root:
            suite = write_suite(root / "suite", "plugin", make_configs(k, args.layers),
                                args.tests)
            counter = root / "compiles.txt"
            env = bench_env(MLCJIT_BENCH_COUNT=str(counter), **aws)
            warm_cache = root / "warm"
            fill = run_timed(pytest_argv("--mlc-device=cpu", f"--mlc-jit-cache-dir={warm_cache}",
                                         "-n", "2"), cwd=suite, env=env)
            checks.run_ok(fill, "filling the remote")
            checks.expect(count_lines(counter) == k,
                          f"the fill compiled {count_lines(counter)} times, expected K={k}")
            for workers in args.workers:
                times: dict[str, list[float]] = {"warm": [], "fresh": []}
                for rep in range(args.reps):
                    for variant in rotate(["warm", "fresh"], rep):
                        cache = warm_cache if variant == "warm" else (
                            root / f"fresh-w{workers}-{rep}")
                        before = count_lines(counter)
                        run = run_timed(pytest_argv("--mlc-device=cpu",
                                                    f"--mlc-jit-cache-dir={cache}",
                                                    *xdist_args(workers)), cwd=suite, env=env)
                        checks.run_ok(run, f"{variant} run, W={workers}, rep {rep}")
                        checks.expect(count_lines(counter) == before,
                                      f"the {variant} run (W={workers}) compiled")
                        if variant == "fresh":
                            found = _DOWNLOADS_RE.search(run.output)
                            got = int(found.group(1)) if found else 0
                            checks.expect(got == k, f"fresh run (W={workers}) downloaded {got} "
                                                    f"libraries, expected K={k}")
                        times[variant].append(run.seconds)
                warm, fresh = median(times["warm"]), median(times["fresh"])
                rows.append((f"W={workers}", f"{warm:.2f}", f"{fresh:.2f}",
                             f"{fresh / warm:.3f}x", "<= 1.5x"))
    finally:
        server.stop()
    print(table(["workers", "warm local s", "fresh, all remote hits s", "ratio", "target"],
                rows))
    return checks.exit_code()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
