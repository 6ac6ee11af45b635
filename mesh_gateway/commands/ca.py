"""`mesh-gateway ca init|issue`: the internal CA from the command line."""

from __future__ import annotations

import argparse
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
    write_atomic(prefix.with_name(prefix.name + ".pem"), cert_pem(leaf) + cert_pem(ca.intermediate))
    print(f"issued {spiffe_id} serial {leaf.serial_number:x} until {leaf.not_valid_after_utc.isoformat()}")
    return 0
