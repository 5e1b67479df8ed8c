"""``python -m cloud.engine run ...``: the engine without the ``sampleflow``
wrapper; also the file to hand spark-submit (see docs/engine.md)."""

from __future__ import annotations

import argparse
import sys

from cloud.engine.commands import register


def main(argv: list[str] | None = None) -> int:
    """Parse ``engine`` arguments (``run ...``) and run the command."""
    parser = argparse.ArgumentParser(prog="python -m cloud.engine")
    register(parser.add_subparsers(dest="command", metavar="COMMAND"))
    args = parser.parse_args(["engine", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
