"""`mesh-gateway ca init|issue|serve|token|rotate|maintain|bundle`: the internal CA from the command line."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

from mesh_gateway.config import parse_duration
from mesh_gateway.identity.ca import CAError, cert_pem, init_ca, key_pem, load_ca, new_key
from mesh_gateway.identity.files import write_atomic
from mesh_gateway.model import SpiffeId


def register(sub: Any) -> None:
    ca: argparse.ArgumentParser = sub.add_parser("ca", help="manage the internal certificate authority")
    ca_sub = ca.add_subparsers(dest="ca_command", required=True, metavar="CA_COMMAND")

    init = ca_sub.add_parser("init", help="create a root and an intermediate CA")
    init.add_argument("--dir", type=Path, default=Path("certs"))
    init.add_argument("--trust-domain", required=True)
    init.add_argument("--force", action="store_true", help="replace an existing CA")
    init.add_argument("--exist-ok", action="store_true",
                      help="succeed without change when --dir already holds a CA of this trust domain")
    init.set_defaults(handler=handle_init)

    issue = ca_sub.add_parser("issue", help="issue an X.509 SVID (key generated locally)")
    issue.add_argument("--dir", type=Path, default=Path("certs"))
    issue.add_argument("--spiffe-id", required=True)
    issue.add_argument("--dns", action="append", default=[], help="DNS or IP SAN (repeatable)")
    issue.add_argument("--ttl", default="1h", help="lifetime, e.g. 15m, 1h, 24h")
    issue.add_argument("--out", type=Path, required=True, help="writes OUT.pem (leaf + intermediate) and OUT.key")
    issue.set_defaults(handler=handle_issue)

    serve = ca_sub.add_parser("serve", help="run the gRPC CSR issuance API (docs/identity.md)")
    serve.add_argument("--dir", type=Path, default=Path("certs"))
    serve.add_argument("--listen", default="127.0.0.1:8501", help="mTLS listener (renewals, bundle)")
    serve.add_argument("--bootstrap-listen", default="127.0.0.1:8502",
                       help="TLS listener for join-token bootstrap; 'off' disables it")
    serve.add_argument("--dns", action="append", default=None,
                       help="DNS SAN of the server's own certificate (repeatable; default localhost)")
    serve.add_argument("--max-ttl", default="24h", help="longest leaf TTL a caller may request")
    serve.add_argument("--default-ttl", default="1h", help="TTL when the caller asks for 0")
    serve.add_argument("--allow-dns", action="append", default=[],
                       help="DNS SAN pattern callers may include, e.g. '*.svc.example.org' (repeatable)")
    serve.add_argument("--sign-per-minute", type=float, default=10.0, help="signing rate per identity")
    serve.add_argument("--sign-burst", type=int, default=5)
    serve.set_defaults(handler=handle_serve)

    token = ca_sub.add_parser("token", help="one-time join tokens for bootstrapping workloads")
    token_sub = token.add_subparsers(dest="token_command", required=True, metavar="TOKEN_COMMAND")
    create = token_sub.add_parser("create", help="create a token bound to one SPIFFE ID; prints it once")
    create.add_argument("--dir", type=Path, default=Path("certs"))
    create.add_argument("--spiffe-id", required=True)
    create.add_argument("--ttl", default="15m", help="how long the token may be used, e.g. 15m")
    create.add_argument("--out", type=Path, default=None,
                        help="write the token to this file (0600) instead of printing it (bootstrap jobs)")
    create.set_defaults(handler=handle_token_create)

    rotate = ca_sub.add_parser("rotate", help="new intermediate (and with --root a new cross-signed root)")
    rotate.add_argument("--dir", type=Path, default=Path("certs"))
    rotate.add_argument("--root", action="store_true", help="also roll the root key (cross-signed by the old)")
    rotate.add_argument("--max-leaf-ttl", default="24h",
                        help="longest leaf TTL in use; the old root is pruned after twice this")
    rotate.set_defaults(handler=handle_rotate)

    maintain = ca_sub.add_parser("maintain", help="renew the intermediate when due and prune retired roots")
    maintain.add_argument("--dir", type=Path, default=Path("certs"))
    maintain.set_defaults(handler=handle_maintain)

    bundle = ca_sub.add_parser("bundle", help="print the trust bundle (PEM) and a summary of its roots")
    bundle.add_argument("--dir", type=Path, default=Path("certs"))
    bundle.add_argument("--out", type=Path, default=None,
                        help="write the bundle to this file instead of stdout (to hand workloads the roots only)")
    bundle.set_defaults(handler=handle_bundle)


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def handle_init(args: argparse.Namespace) -> int:
    if args.exist_ok and not args.force and (args.dir / "bundle.pem").exists():
        # One-shot bootstrap jobs (compose, Kubernetes init containers) run this on every start.
        try:
            existing = load_ca(args.dir)
        except CAError as exc:
            return fail(str(exc))
        if existing.trust_domain != args.trust_domain:
            return fail(f"{args.dir} holds a CA for {existing.trust_domain}, not {args.trust_domain}")
        print(f"CA for trust domain {existing.trust_domain} already in {args.dir}; nothing to do")
        return 0
    try:
        ca = init_ca(args.dir, args.trust_domain, force=args.force)
    except (CAError, ValueError) as exc:
        return fail(str(exc))
    print(f"CA for trust domain {ca.trust_domain} written to {args.dir} (bundle: {args.dir / 'bundle.pem'})")
    return 0


def handle_issue(args: argparse.Namespace) -> int:
    try:
        ttl_s = parse_duration(args.ttl)
        if ttl_s <= 0:
            raise ValueError("TTL must be positive")
        spiffe_id = SpiffeId.parse(args.spiffe_id)
        ca = load_ca(args.dir)
        key = new_key()
        leaf = ca.issue(key.public_key(), spiffe_id, ttl_s, args.dns)
    except (CAError, ValueError) as exc:
        return fail(str(exc))
    prefix: Path = args.out
    write_atomic(prefix.with_name(prefix.name + ".key"), key_pem(key), private=True)
    write_atomic(prefix.with_name(prefix.name + ".pem"), cert_pem(leaf) + b"".join(cert_pem(c) for c in ca.chain))
    print(f"issued {spiffe_id} serial {leaf.serial_number:x} until {leaf.not_valid_after_utc.isoformat()}")
    return 0


def _duration(text: str, what: str) -> float:
    value = parse_duration(text)
    if value <= 0:
        raise ValueError(f"{what} must be positive")
    return value


def handle_serve(args: argparse.Namespace) -> int:
    from mesh_gateway.identity.issuer_api import IssuerServer, IssuerSettings
    from mesh_gateway.identity.local_issuer import LocalIssuer

    try:
        bootstrap = None if args.bootstrap_listen == "off" else args.bootstrap_listen
        settings = IssuerSettings(
            address=args.listen, bootstrap_address=bootstrap, dns=tuple(args.dns or ("localhost",)),
            max_ttl_s=_duration(args.max_ttl, "--max-ttl"), default_ttl_s=_duration(args.default_ttl, "--default-ttl"),
            allowed_dns=tuple(args.allow_dns), sign_per_minute=args.sign_per_minute, sign_burst=args.sign_burst)
        if settings.default_ttl_s > settings.max_ttl_s:
            raise ValueError("--default-ttl must not exceed --max-ttl")
        load_ca(args.dir)
    except (CAError, ValueError) as exc:
        return fail(str(exc))

    async def main() -> None:
        server = IssuerServer(LocalIssuer(args.dir), settings)
        await server.start()
        host = args.listen.rpartition(":")[0]
        print(f"issuer API on {host}:{server.port} (mTLS)"
              + (f", bootstrap on {bootstrap.rpartition(':')[0]}:{server.bootstrap_port}" if bootstrap else ""),
              flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        waiter = asyncio.ensure_future(server.wait())
        stopper = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait([waiter, stopper], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
            await server.stop(grace_s=5.0)
            waiter.cancel()
            await asyncio.gather(waiter, stopper, return_exceptions=True)

    try:
        asyncio.run(main())
    except OSError as exc:
        return fail(str(exc))
    return 0


def handle_token_create(args: argparse.Namespace) -> int:
    from mesh_gateway.identity.join_tokens import JoinTokenStore

    try:
        spiffe_id = SpiffeId.parse(args.spiffe_id)
        ca = load_ca(args.dir)
        if not spiffe_id.member_of(ca.trust_domain) or not spiffe_id.path:
            raise ValueError(f"{spiffe_id} is not a workload ID in trust domain {ca.trust_domain}")
        token = JoinTokenStore(args.dir).create(spiffe_id, _duration(args.ttl, "--ttl"))
    except (CAError, ValueError, OSError) as exc:
        return fail(str(exc))
    if args.out is not None:
        write_atomic(args.out, token.encode() + b"\n", private=True)
        print(f"join token for {spiffe_id} written to {args.out}")
        return 0
    print(token)
    return 0


def handle_rotate(args: argparse.Namespace) -> int:
    from mesh_gateway.identity.ca_rotation import read_retired, rotate_intermediate, rotate_root

    try:
        if args.root:
            ca = rotate_root(args.dir, _duration(args.max_leaf_ttl, "--max-leaf-ttl"))
            [*_, retired] = read_retired(args.dir)
            print(f"new root and intermediate issued; bundle holds {len(ca.roots)} roots; "
                  f"old root retired, pruned after {retired.prune_after.isoformat(timespec='seconds')}")
        else:
            ca = rotate_intermediate(args.dir)
            print(f"new intermediate serial {ca.intermediate.serial_number:x} "
                  f"until {ca.intermediate.not_valid_after_utc.isoformat(timespec='seconds')}")
    except (CAError, ValueError, OSError) as exc:
        return fail(str(exc))
    return 0


def handle_maintain(args: argparse.Namespace) -> int:
    from mesh_gateway.identity.ca_rotation import maintain

    try:
        done = maintain(args.dir)
    except (CAError, OSError) as exc:
        return fail(str(exc))
    print(f"prepared={done.prepared} activated={done.activated} pruned={len(done.pruned)}")
    return 0


def handle_bundle(args: argparse.Namespace) -> int:
    try:
        ca = load_ca(args.dir)
    except CAError as exc:
        return fail(str(exc))
    for root in ca.roots:
        print(f"# root {root.subject.rfc4514_string()} serial {root.serial_number:x} "
              f"expires {root.not_valid_after_utc.isoformat(timespec='seconds')}", file=sys.stderr)
    if args.out is not None:
        write_atomic(args.out, ca.bundle_pem)
        print(f"trust bundle ({len(ca.roots)} roots) written to {args.out}", file=sys.stderr)
        return 0
    sys.stdout.write(ca.bundle_pem.decode())
    return 0
