"""`mesh-gateway check -c FILE`: validate a config file; prints `ok` or one line per error with its key path."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from mesh_gateway.config import ConfigError, load


def register(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser("check", help="validate a gateway config file")
    parser.add_argument("-c", "--config", type=Path, required=True, help="path to gateway.yaml")
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    try:
        load(args.config)
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        return 2
    print("ok")
    return 0
