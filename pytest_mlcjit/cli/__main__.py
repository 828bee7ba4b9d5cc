"""``python -m pytest_mlcjit.cli``: the ``pytest-mlcjit`` command."""

from __future__ import annotations

import sys

from pytest_mlcjit.cli import main

if __name__ == "__main__":
    sys.exit(main())
