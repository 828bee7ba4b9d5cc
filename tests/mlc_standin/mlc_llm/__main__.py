"""``python -m mlc_llm <subcommand>``: only ``compile`` is implemented by the stand-in."""

from __future__ import annotations

import argparse
import sys

_REAL_SUBCOMMANDS = (
    "compile",
    "convert_weight",
    "gen_config",
    "chat",
    "serve",
    "package",
    "calibrate",
)


def main(argv: list[str] | None = None) -> int:
    """Dispatch on the subcommand, as the real entry point does; returns the exit status."""
    args = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="mlc_llm", description="MLC LLM stand-in CLI.")
    parser.add_argument("subcommand", choices=_REAL_SUBCOMMANDS, help="(choices: %(choices)s)")
    parsed = parser.parse_args(args[:1])
    if parsed.subcommand != "compile":
        print(
            f"mlc_llm: the stand-in implements only `compile`, not `{parsed.subcommand}`",
            file=sys.stderr,
        )
        return 2
    from mlc_llm.cli import compile as cli

    return cli.main(args[1:])


if __name__ == "__main__":
    sys.exit(main())
