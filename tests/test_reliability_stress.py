"""Eight processes, fifty requests each, over five keys, in random order, on a cold cache: each
key is compiled exactly once (counted by the factory itself), and every library a request
returns is whole (its SHA-256 and size are checked by the process that got it)."""

from __future__ import annotations

import collections
import os
import random
import time
from pathlib import Path

from conftest import Engine, Project, outcomes

PROCESSES = 8
REQUESTS = 50
HIDDEN = (4, 5, 6, 7, 8)


def test_cold_cache_under_eight_processes(engine: Engine, project: Project,
                                          tmp_path: Path) -> None:
    seed = int(os.environ.get("MLCJIT_STRESS_SEED") or random.randrange(2**32))
    rng = random.Random(seed)
    tag = f"(seed {seed}; rerun with MLCJIT_STRESS_SEED={seed})"
    ready, go = tmp_path / "ready", tmp_path / "go"
    ready.mkdir()
    plans = []
    for _ in range(PROCESSES):
        plan = [{"hidden": h} for h in HIDDEN for _ in range(REQUESTS // len(HIDDEN))]
        rng.shuffle(plan)
        plans.append(plan)
    # A new engine per request: every request does the full lock-free lookup and checksum.
    procs = [engine.popen(plan, fresh=True, ready=str(ready), go=str(go)) for plan in plans]
    try:
        deadline = time.monotonic() + 120
        while len(list(ready.iterdir())) < PROCESSES:  # all imported: start them together
            assert time.monotonic() < deadline, "the drivers did not start"
            time.sleep(0.01)
        go.touch()
        results = []
        for proc in procs:
            out, err = proc.communicate(timeout=600)
            assert proc.returncode == 0, err
            results.append(outcomes(out))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    served = [r for rs in results for r in rs]
    assert len(served) == PROCESSES * REQUESTS
    failed = [r for r in served if not r["ok"]]
    assert failed == [], f"{tag}: {failed[:3]}"
    for r in served:
        assert r["sha256"] == r["manifest_sha256"], f"{tag}: a partial library was returned: {r}"
        assert r["size"] == r["manifest_size"], f"{tag}: {r}"
    per_key = collections.Counter(line.split()[1] for line in project.compiles())
    assert per_key == {f"hidden={h}": 1 for h in HIDDEN}, f"{tag}: compiled {per_key}"
    assert sum(not r["hit"] for r in served) == len(HIDDEN), tag
    for hidden in HIDDEN:
        shas = {r["sha256"] for r in served if r["config"]["hidden"] == hidden}
        assert len(shas) == 1, f"{tag}: every process got the same bytes"
    checked = engine.run([{"hidden": h} for h in HIDDEN], policy="READONLY", check=True)
    assert all(r["hit"] and r["checked"] for r in checked), checked
    assert list((project.cache / ".mlcjit" / "staging").iterdir()) == []
