"""`mesh-gateway` command line. Each command group lives in mesh_gateway/commands/ and registers itself here."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from mesh_gateway.commands import ca, check, demo, demo_app, policy, run, sidecar

COMMAND_MODULES = (run, sidecar, check, ca, demo, demo_app, policy)

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mesh-gateway", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # regorus panics carry a 40-line Rust backtrace unless this is off.
    os.environ.setdefault("RUST_BACKTRACE", "0")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result: int = args.handler(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    sys.stdout.flush()
    return result
