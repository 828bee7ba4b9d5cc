"""Cache management, one module per job: :mod:`.entries` (find them), :mod:`.verify`,
:mod:`.prune` (prune, clear, the size cap), :mod:`.info`, :mod:`.explain` (misses
explained), :mod:`.remote` (the remote's entries). Used by the ``pytest-mlcjit`` command
and after a run.

Importing it is cheap: no TVM, no numpy, no pytest.
"""

from __future__ import annotations

from pytest_mlcjit.cache.manage.entries import Entry, scan
from pytest_mlcjit.cache.manage.explain import entry_status, flatten, key_diff, nearest
from pytest_mlcjit.cache.manage.info import info
from pytest_mlcjit.cache.manage.prune import ClearResult, PruneResult, clear, prune, read_failures
from pytest_mlcjit.cache.manage.verify import VerifyResult, verify

__all__ = [
    "ClearResult", "Entry", "PruneResult", "VerifyResult", "clear",
    "entry_status", "flatten", "info", "key_diff", "nearest", "prune", "read_failures",
    "scan", "verify",
]
