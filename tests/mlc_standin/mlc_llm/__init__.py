"""Stand-in for ``mlc_llm``, used only by pytest-mlcjit's own test suite (see README.md).

Importing it is cheap: TVM is imported only by the compile command.
"""

from __future__ import annotations

import os

#: ``MLC_STANDIN_VERSION`` replaces it, to test detection of a changed toolchain.
__version__: str = os.environ.get("MLC_STANDIN_VERSION") or "0.0.0+standin"
