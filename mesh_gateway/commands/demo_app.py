"""`mesh-gateway demo-app orders|inventory`: one of the demo mesh's plain-HTTP applications (run it behind a
sidecar). Prints `listening on HOST:PORT` once it accepts connections."""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
from typing import Any

from mesh_gateway.config import split_host_port


def register(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "demo-app", help="run a demo application (orders or inventory) for the demo mesh")
    parser.add_argument("app", choices=("orders", "inventory"))
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--listen", default="127.0.0.1:8080", help="host:port (port 0 picks a free one)")
    where.add_argument("--listen-fd", type=int, help="serve on this inherited, already listening socket")
    parser.add_argument("--inventory-url", default="http://127.0.0.1:15001/inventory",
                        help="orders only: inventory's base URL (the sidecar's outbound listener)")
    parser.set_defaults(handler=handle)


def _socket(args: argparse.Namespace) -> socket.socket:
    if args.listen_fd is not None:
        sock = socket.socket(fileno=args.listen_fd)
    else:
        host, port = split_host_port(args.listen)
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(256)
    sock.setblocking(False)
    return sock


def handle(args: argparse.Namespace) -> int:
    from mesh_gateway.demo.apps import inventory_app, orders_app, start_app

    try:
        sock = _socket(args)
    except OSError as exc:
        print(f"error: cannot listen: {exc.strerror}")
        return 1
    app = inventory_app() if args.app == "inventory" else orders_app(args.inventory_url)

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        running = await start_app(app, sock)
        print(f"{args.app} listening on {running.host}:{running.port}", flush=True)
        await stop.wait()
        await running.close()
        return 0

    return asyncio.run(main())
