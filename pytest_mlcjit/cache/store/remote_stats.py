"""What the remote did in a run: counts, and the warnings the summary shows (merged across
xdist workers on the controller)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from pytest_mlcjit.units import plural

#: Distinct warnings a run keeps besides the aggregated ones (more are counted only), so
#: that the summary and the run's line in ``runs.jsonl`` stay short whatever the remote holds.
MAX_NOTES = 10


@dataclasses.dataclass
class RemoteStats:
    """What the remote did in a run (merged across xdist workers on the controller).

    ``warnings`` is what the summary shows, one line each, built from the fields after it:
    the remote going down (once per run, whichever process found it), the unusable remote
    objects skipped (one line: how many, and the first), and other warnings (each once,
    at most :data:`MAX_NOTES`). The writes not made are apart (``uploads_failed``,
    ``upload_failures``): the summary shows them after the warnings.

    ``downloads`` and ``uploads`` count libraries (one per library transferred), not
    requests: a request served by a download is a ``remote_hit`` of :mod:`.engine.stats`."""

    #: Libraries downloaded (and used: digest verified, load check passed where needed).
    downloads: int = 0
    download_bytes: int = 0
    download_seconds: float = 0.0
    #: Libraries uploaded (entries this run published on the remote).
    uploads: int = 0
    upload_bytes: int = 0
    #: Writes not made: uploads that failed or were not attempted although the run writes
    #: (the remote failed, refused, was down or read-only by then; the library failed its
    #: load check), and the first reasons (each once, at most :data:`MAX_NOTES`).
    uploads_failed: int = 0
    upload_failures: list[str] = dataclasses.field(default_factory=list)
    #: Downloads refused after the transfer (a digest mismatch, a failed load check).
    downloads_refused: int = 0
    #: Refused remote entries this run set aside (``quarantine/`` on the remote).
    quarantined: int = 0
    #: Load checks run (before uploads; after downloads of entries recorded unchecked).
    load_checks: int = 0
    load_check_seconds: float = 0.0
    errors: int = 0
    warnings: list[str] = dataclasses.field(default_factory=list)
    #: Why the remote went down in this run (the first report wins).
    down: str | None = None
    #: Why an upload was refused for permission, so that the run only reads (the first
    #: report wins: every worker that meets the refusal says it once, the run once).
    upload_refused: str | None = None
    #: Remote objects skipped as unusable (junk, a bad signature), and the first's reason.
    skipped: int = 0
    skipped_first: str | None = None
    #: Other warnings (a refused download, a refused upload), each once.
    notes: list[str] = dataclasses.field(default_factory=list)
    notes_dropped: int = 0

    def note(self, message: str) -> None:
        """Add a warning (once; past :data:`MAX_NOTES`, counted only)."""
        if message in self.notes:
            return
        if len(self.notes) < MAX_NOTES:
            self.notes.append(message)
        else:
            self.notes_dropped += 1
        self._show()

    def skip(self, reason: str, count: int = 1) -> None:
        """Count ``count`` unusable remote objects skipped (``reason``: the first's)."""
        self.skipped += count
        self.skipped_first = self.skipped_first or reason
        self._show()

    def write_not_made(self, why: str, count: int = 1) -> None:
        """Count ``count`` uploads that could not be made (``why``: kept once, among the
        first :data:`MAX_NOTES` reasons)."""
        self.uploads_failed += count
        if why not in self.upload_failures and len(self.upload_failures) < MAX_NOTES:
            self.upload_failures.append(why)

    def went_down(self, message: str) -> None:
        self.down = self.down or message
        self._show()

    def refused_upload(self, message: str) -> None:
        self.upload_refused = self.upload_refused or message
        self._show()

    def _show(self) -> None:
        lines = [self.down] if self.down else []
        if self.upload_refused:
            lines.append(self.upload_refused)
        if self.skipped:
            what = plural(self.skipped, "unusable remote object")
            lines.append(f"{what} skipped: {self.skipped_first}" if self.skipped == 1
                         else f"{what} skipped, the first: {self.skipped_first}")
        lines += self.notes
        if self.notes_dropped:
            lines.append(f"{plural(self.notes_dropped, 'more remote warning')} not shown")
        self.warnings = lines

    def merge(self, other: Mapping[str, Any]) -> None:
        """Add another process's :meth:`to_json`."""
        for field in dataclasses.fields(self):
            value = other.get(field.name)
            if field.name == "notes":
                for note in value if isinstance(value, list) else ():
                    if isinstance(note, str):
                        self.note(note)
            elif field.name == "upload_failures":
                for why in value if isinstance(value, list) else ():
                    if isinstance(why, str):
                        self.write_not_made(why, count=0)
            elif field.name in ("down", "upload_refused", "skipped_first"):
                if isinstance(value, str) and getattr(self, field.name) is None:
                    setattr(self, field.name, value)
            elif (field.name != "warnings" and isinstance(value, int | float)
                  and not isinstance(value, bool)):
                setattr(self, field.name, getattr(self, field.name) + value)
        self._show()

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


__all__ = ["MAX_NOTES", "RemoteStats"]
