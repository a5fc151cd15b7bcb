"""The ``chimera`` command."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from ._version import __version__


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chimera",
        description=(
            "Distributed, real-time, multimodal data collection on Trio: "
            "a Manager, Workers, and Nodes in a Graph."
        ),
    )
    parser.add_argument("--version", action="version", version=f"chimera {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = _parser()
    parser.parse_args(argv)
    parser.print_help()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
