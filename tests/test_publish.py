"""Replacing an entry never leaves a window in which a reader finds it missing or partial.

A publish renames over what is there, never removes first: the new manifest waits beside
the entry as the pending manifest, the new library is renamed over the old one, then the
pending manifest over the manifest. A lock-free reader that finds the old manifest with
the new library checks the library against the pending manifest (or the manifest read
again) and gets the new entry whole.

REDO republishes the tiny model again and again, each time in a new process, while two
other processes look it up under READONLY as fast as they can (a new engine per lookup:
the full lock-free read and checksum). The writer pauses at every step of its compile
and publish (``MLCJIT_TEST_PAUSE``), which holds open the moment between the library's
rename and the manifest's for 0.2 s each time.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import Engine, Project, wait_until

REPUBLISHES = 4
PAUSE_S = "0.2"
SAFETY_S = 300.0

#: Looks the tiny model up under READONLY until the stop file exists; prints its counts.
READER = '''
import json, os, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pathlib import Path
from pytest_mlcjit import JIT, MlcJitError, Policy, Settings, TVMModel

job = json.loads(sys.argv[1])
settings = Settings(cache_dir=Path(job["cache"]), policy=Policy.READONLY)
spec = TVMModel("tinymodel:build", config={"hidden": 4})
counts = {"hits": 0, "missing": 0, "corrupt": 0, "other": 0}
shas, errors = set(), []
Path(job["ready"]).touch()
while not os.path.exists(job["stop"]):
    try:
        model = JIT(settings).compile(spec, "cpu")
    except MlcJitError as exc:
        text = str(exc)
        kind = ("missing" if "no cached library" in text else
                "corrupt" if "corrupt" in text else "other")
        counts[kind] += 1
        errors.append(text[:400])
    else:
        counts["hits"] += 1
        shas.add(model.manifest["sha256"])
print(json.dumps({**counts, "shas": sorted(shas), "errors": errors[:3]}), flush=True)
'''


def test_readonly_lookups_never_miss_while_redo_republishes(
        engine: Engine, project: Project, warm_template: Path, tmp_path: Path) -> None:
    """Before, a publish removed the old manifest before renaming the new one into place,
    and concurrent READONLY lookups found "no cached library"."""
    engine.warm(warm_template)
    (manifest,) = (project.cache / "tvm").glob("*.manifest.json")
    published = {json.loads(manifest.read_text())["sha256"]}
    (project.pytester.path / "reader.py").write_text(READER)  # beside tinymodel.py
    stop, readers = tmp_path / "stop", []
    for n in range(2):
        ready = tmp_path / f"ready{n}"
        job = json.dumps({"cache": str(project.cache), "stop": str(stop), "ready": str(ready)})
        readers.append(subprocess.Popen(
            [sys.executable, str(project.pytester.path / "reader.py"), job],
            cwd=project.pytester.path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True))
        wait_until(lambda r=ready: r.exists(), "a reader to start")
    try:
        for _ in range(REPUBLISHES):  # each driver is a new run: REDO compiles again
            (result,) = engine.run([{"config": {"hidden": 4}, "policy": "REDO"}],
                                   env={"MLCJIT_TEST_PAUSE": PAUSE_S}, timeout=SAFETY_S)
            assert result["ok"], result
            assert not result["hit"], result
            published.add(result["manifest_sha256"])
    finally:
        stop.touch()
    counts = []
    for reader in readers:
        out, err = reader.communicate(timeout=SAFETY_S)
        assert reader.returncode == 0, err
        (line,) = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
        counts.append(line)
    print(f"\n{REPUBLISHES} republishes, lookups per reader: "
          f"{[c['hits'] + c['missing'] + c['corrupt'] + c['other'] for c in counts]}, "
          f"misses {[c['missing'] for c in counts]}, corrupt {[c['corrupt'] for c in counts]}")
    for count in counts:
        assert (count["missing"], count["corrupt"], count["other"]) == (0, 0, 0), count
        assert count["hits"] > 0, count
        assert set(count["shas"]) <= published, "a lookup returned a manifest never published"
    assert len(project.compiles()) == REPUBLISHES
