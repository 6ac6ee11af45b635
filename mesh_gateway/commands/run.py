"""`mesh-gateway run -c FILE`: start the gateway."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from mesh_gateway.config import ConfigError, load


def register(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser("run", help="run the gateway")
    parser.add_argument("-c", "--config", type=Path, required=True, help="path to gateway.yaml")
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    try:
        config = load(args.config)
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        return 2
    if config.workers != 1:
        from mesh_gateway.workers import serve_workers

        return serve_workers(config)
    from mesh_gateway.app import serve

    return serve(config)
