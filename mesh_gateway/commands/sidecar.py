"""`mesh-gateway sidecar -c FILE`: run the sidecar for one local service (see docs/sidecar.md).

With `identity.issuer: remote`, the one-time join token comes from `identity.remote.join_token_file` or, when set,
the environment variable MESH_JOIN_TOKEN (e.g. from a Kubernetes Secret); the variable wins."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from mesh_gateway.config import ConfigError
from mesh_gateway.sidecar_config import load

JOIN_TOKEN_ENV = "MESH_JOIN_TOKEN"  # noqa: S105 - the name of the variable, not a secret


def register(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "sidecar", help="run as the sidecar of one local service: mTLS inbound, loopback outbound")
    parser.add_argument("-c", "--config", type=Path, required=True, help="path to sidecar.yaml")
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    try:
        config = load(args.config)
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        return 2
    from mesh_gateway.sidecar import serve

    return serve(config, join_token=os.environ.get(JOIN_TOKEN_ENV) or None)
