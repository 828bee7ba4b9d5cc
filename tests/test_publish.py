"""Replacing an entry never leaves a window in which a reader finds it missing or partial.

A publish renames over what is there, never removes first: the new manifest waits beside
the entry as the pending manifest, the new library is renamed over the old one, then the
pending manifest over the manifest. A lock-free reader that finds the old manifest with
the new library checks the library against the pending manifest (or the manifest read
again) and gets the new entry whole.

The default tier holds a REDO republish at each step of its publish in turn and looks
the entry up there (deterministic: every window is visited once). The reliability tier
republishes again and again, each time in a new process, while two other processes look
it up under READONLY as fast as they can (a new engine per lookup: the full lock-free
read and checksum); the writer pauses at every step of its compile and publish
(``MLCJIT_TEST_PAUSE``), which holds open the moment between the library's rename and
the manifest's for 0.2 s each time.

Compiles are byte-for-byte reproducible, so a republish of the same model would write the
very bytes that are there, and a reader that mixed the old manifest with the new library
would still pass: each test first makes the old entry's library differ (zeros appended,
which an ELF file ignores; its manifest updated to match, a whole entry).
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from faultmodels import distinct_old_entry

from conftest import Engine, Project, wait_until
from pytest_mlcjit import JIT, Policy, Settings, TVMModel
from pytest_mlcjit.cache.store import local as local_store
from pytest_mlcjit.key import file_sha256

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


SPEC = TVMModel("tinymodel:build", config={"hidden": 4})

#: The fault points of a publish (pytest_mlcjit/cache/store/local.py), in order: before
#: any rename; the library renamed over the old one, the manifest not yet; all renamed.
PUBLISH_POINTS = ("publish:staged", "publish:library", "published")





def test_a_lookup_at_each_step_of_a_republish_gets_a_whole_entry(
        engine: Engine, project: Project, warm_template: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """REDO republishes the entry in a thread of this process, held at each fault point of
    its publish in turn (the store's test-only hook, replaced by one that waits for this
    test; the compile and the renames are real); at each, a new READONLY engine looks the
    entry up lock-free and gets a whole entry: the old one before any rename, the new one
    from the library's rename on, even while the manifest on disk still names the old."""
    project.warm(warm_template)
    monkeypatch.syspath_prepend(str(project.pytester.path))
    old = distinct_old_entry(project)
    (manifest,) = (project.cache / "tvm").glob("*.manifest.json")
    library = manifest.with_name(json.loads(manifest.read_text())["library"])
    pending = manifest.with_name(f".{manifest.name[:-len('.manifest.json')]}"
                                 ".manifest.pending.json")
    arrived: queue.Queue[str] = queue.Queue()
    go: queue.Queue[None] = queue.Queue()
    writer_done: list[object] = []

    def hold(name: str) -> None:
        if name in PUBLISH_POINTS and threading.current_thread() is writer:
            arrived.put(name)
            go.get(timeout=300)

    def republish() -> None:
        try:
            writer_done.append(JIT(Settings(cache_dir=project.cache, policy=Policy.REDO))
                               .compile(SPEC, "cpu"))
        except BaseException as exc:  # re-raised by the test
            writer_done.append(exc)
            arrived.put("failed")

    monkeypatch.setattr(local_store, "fault_point", hold)
    writer = threading.Thread(target=republish, daemon=True)
    writer.start()
    seen = {}
    try:
        for point in PUBLISH_POINTS:
            assert arrived.get(timeout=300) == point, writer_done
            on_disk = (json.loads(manifest.read_text())["sha256"], file_sha256(library),
                       pending.exists())
            model = JIT(Settings(cache_dir=project.cache, policy=Policy.READONLY)).compile(
                SPEC, "cpu")
            assert model.hit
            assert model.manifest["sha256"] == file_sha256(model.path), point
            seen[point] = (on_disk, model.manifest["sha256"])
            go.put(None)
    finally:
        for _ in PUBLISH_POINTS:  # never leave the writer waiting
            go.put(None)
        writer.join(timeout=300)
    (result,) = writer_done
    assert not isinstance(result, BaseException), result
    new = file_sha256(library)
    assert new != old
    assert seen == {
        "publish:staged": ((old, old, False), old),
        "publish:library": ((old, new, True), new),  # the window: old manifest, new library
        "published": ((new, new, False), new),
    }
    assert len(project.compiles()) == 1
    assert [m["sha256"] for m in engine.check_cache(staging=False).manifests] == [new]


@pytest.mark.reliability
def test_readonly_lookups_never_miss_while_redo_republishes(
        engine: Engine, project: Project, warm_template: Path, tmp_path: Path) -> None:
    """Before, a publish removed the old manifest before renaming the new one into place,
    and concurrent READONLY lookups found "no cached library"."""
    engine.warm(warm_template)
    published = {distinct_old_entry(project)}
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
