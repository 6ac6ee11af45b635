"""`mesh-gateway check -c FILE`: validate a gateway or sidecar config file; prints `ok` or one line per error with
its key path. A file with a top-level `service` key is a sidecar.yaml."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from mesh_gateway import sidecar_config
from mesh_gateway.config import ConfigError, load


def register(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser("check", help="validate a gateway.yaml or sidecar.yaml")
    parser.add_argument("-c", "--config", type=Path, required=True, help="path to gateway.yaml or sidecar.yaml")
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    try:
        if sidecar_config.is_sidecar_document(sidecar_config.read_yaml(args.config)):
            sidecar_config.load(args.config)
            print("ok (sidecar)")
        else:
            load(args.config)
            print("ok")
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        return 2
    return 0
