#!/usr/bin/env python3
"""Side-by-side benchmark: direct upstream vs nginx vs mesh-gateway doing the same TLS → mTLS job.

    python bench/run.py                    # every variant, 3 interleaved rounds of 10 s per target
    python bench/run.py --variants tls,full --rounds 5 --duration 20
    python bench/run.py --smoke            # tiny duration, one round: checks that the harness works

Results are ratios measured in the same run on the same machine; absolute numbers on a shared machine mean
little. Needs wrk and nginx (installed with apt-get when missing and running as root). Only 127.0.0.1 is used.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

import spyprof  # noqa: E402
from procs import BenchError, Supervisor, Usage, free_port, group_usage, wait_until  # noqa: E402
from setups import (  # noqa: E402
    FEATURE_KEYS,
    Features,
    Pki,
    UpstreamPorts,
    build_pki,
    gateway_config,
    proxy_conf,
    upstream_conf,
)

from mesh_gateway.config import ConfigError, GatewayConfig, parse  # noqa: E402

TARGETS = ("direct", "nginx", "gateway")
WRK_SCRIPT = HERE / "report.lua"


@dataclass(frozen=True)
class Variant:
    key: str
    features: Features
    path: str = "/"
    best_available: bool = False
    """Drop optional features the gateway does not have yet instead of skipping (the label says what ran)."""

    @property
    def label(self) -> str:
        f = self.features
        parts = ["TLS+mTLS" if f.tls else "plain HTTP"]
        if f.authz:
            parts.append("authz")
        if f.trace_ratio is not None:
            parts.append(f"trace {f.trace_ratio * 100:g} %")
        if f.workers != 1:
            parts.append(f"{f.workers} workers")
        if self.path != "/":
            parts.append("16 KiB body")
        if f.http1_server != "h1":
            parts.append(f"{f.http1_server} server")
        return " + ".join(parts)

    def available(self) -> tuple[Variant | None, str]:
        """The variant to run (maybe reduced to what the gateway supports) or None and why it is skipped."""
        missing = missing_features(self.features)
        if not missing:
            return self, ""
        if not self.best_available or "workers" in missing:
            return None, f"gateway config has no {', '.join(missing)} section yet"
        reduced = replace(self.features, authz=self.features.authz and "authz" not in missing,
                          trace_ratio=None if FEATURE_KEYS["tracing"] in missing else self.features.trace_ratio)
        return replace(self, features=reduced), ""


FULL = Features(authz=True, trace_ratio=0.01)
VARIANTS = (
    Variant("plain", Features(tls=False)),
    Variant("tls", Features()),
    Variant("authz", Features(authz=True)),
    Variant("full", FULL),
    Variant("trace100", Features(authz=True, trace_ratio=1.0)),
    Variant("w2", replace(FULL, workers=2), best_available=True),
    Variant("16k", FULL, path="/16k", best_available=True),
)


@dataclass
class Sample:
    rps: float
    p50_us: float
    p99_us: float
    requests: int
    errors: int
    cpu_s: float


@dataclass
class Result:
    variant: Variant
    samples: dict[str, list[Sample]] = field(default_factory=lambda: {t: [] for t in TARGETS})
    peak_rss_kib: dict[str, int] = field(default_factory=dict)
    skipped: str = ""


def missing_features(features: Features) -> list[str]:
    wanted = []
    if features.authz:
        wanted.append(FEATURE_KEYS["authz"])
    if features.trace_ratio is not None:
        wanted.append(FEATURE_KEYS["tracing"])
    if features.workers != 1:
        wanted.append(FEATURE_KEYS["workers"])
    return [key for key in wanted if key not in GatewayConfig.model_fields]


def ensure_tools() -> tuple[str, str]:
    """wrk and nginx from PATH or /usr/sbin; install the Debian packages when missing (root only)."""
    def find(name: str) -> str | None:
        return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")

    if not (find("wrk") and find("nginx")):
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            sys.exit("wrk and nginx are required: sudo apt-get install -y wrk nginx")
        print("installing wrk and nginx with apt-get …", file=sys.stderr)
        subprocess.run(["apt-get", "update", "-q"], check=True, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-q", "wrk", "nginx"], check=True, timeout=600,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    wrk, nginx = find("wrk"), find("nginx")
    assert wrk and nginx
    return wrk, nginx


def probe(url_port: int, path: str, tls: bool, timeout_s: float = 2.0) -> bool:
    """One real request (200 expected), so a target is only benchmarked once it answers correctly."""
    with socket.create_connection(("127.0.0.1", url_port), timeout=timeout_s) as raw:
        sock: socket.socket = raw
        if tls:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE  # wrk does not verify either; the proxies verify their upstream
            sock = ctx.wrap_socket(raw, server_hostname="localhost")
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data.startswith(b"HTTP/1.1 200")


def run_wrk(wrk: str, args: argparse.Namespace, url: str, duration_s: float) -> dict[str, float]:
    cmd = [wrk, "-t", str(args.threads), "-c", str(args.connections), "-d", f"{max(1, round(duration_s))}s",
           "--timeout", "5s", "-s", str(WRK_SCRIPT), url]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + 60, check=False)
    for line in result.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            parsed: dict[str, float] = json.loads(line.removeprefix("BENCH_JSON "))
            return parsed
    raise BenchError(f"wrk produced no report for {url}:\n{result.stdout}\n{result.stderr}")


class Bench:
    def __init__(self, args: argparse.Namespace, root: Path, sup: Supervisor) -> None:
        self.args = args
        self.root = root
        self.sup = sup
        self.targets = [t for t in TARGETS if t in args.targets.split(",")]
        self.wrk, self.nginx = ensure_tools()
        self.pki: Pki = build_pki(root, args.python, REPO)
        self.up = UpstreamPorts(free_port(), free_port(), free_port())
        conf = upstream_conf(root, self.pki, self.up, args.upstream_workers)
        self.upstream = self._start_nginx("upstream", conf)
        for port, tls in ((self.up.plain, False), (self.up.tls, True)):
            wait_until(lambda p=port, t=tls: probe(p, "/", t), 15, "the nginx upstream",  # type: ignore[misc]
                       lambda: sup.check_alive(self.upstream))

    def _start_nginx(self, name: str, conf: Path) -> subprocess.Popen[bytes]:
        return self.sup.start(name, [self.nginx, "-p", str(self.root), "-c", str(conf), "-g", "daemon off;"],
                              self.root / f"{name}.out")

    def run_variant(self, variant: Variant) -> Result:
        runnable, why = variant.available()
        if runnable is None:
            return Result(variant, skipped=why)
        variant = runnable
        result = Result(variant)
        f = variant.features
        gw_port, ng_port, admin_port = free_port(), free_port(), free_port()
        config = gateway_config(self.root, self.pki, gw_port, admin_port, self.up, f)
        try:
            parse(config)
        except ConfigError as exc:
            result.skipped = "gateway rejects the generated config: " + "; ".join(exc.errors)
            return result
        gw_yaml = self.root / f"gateway-{variant.key}.yaml"
        gw_yaml.write_text(yaml.safe_dump(config, sort_keys=False))
        ng = self._start_nginx(f"proxy-{variant.key}",
                               proxy_conf(self.root, self.pki, ng_port, self.up, tls=f.tls, workers=f.workers))
        gw = None
        if "gateway" in self.targets:
            argv = [self.args.python, "-m", "mesh_gateway", "run", "-c", str(gw_yaml)]
            if self.args.gateway_cmd:  # an alternative proxy in the gateway's seat (see docs/performance.md)
                argv = shlex.split(self.args.gateway_cmd.format(
                    python=self.args.python, port=gw_port, root=self.root, upstream_port=self.up.mtls,
                    plain_upstream_port=self.up.plain, tls=int(f.tls)))
            gw = self.sup.start(f"gateway-{variant.key}", argv,
                                self.root / f"gateway-{variant.key}.log",
                                env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=self.root)
        try:
            direct_port = self.up.tls if f.tls else self.up.plain
            ports = {"direct": (direct_port, None), "nginx": (ng_port, ng), "gateway": (gw_port, gw)}
            ports = {name: ports[name] for name in self.targets}
            for name, (port, proc) in ports.items():
                alive = (lambda p=proc: self.sup.check_alive(p)) if proc else None  # type: ignore[misc]
                wait_until(lambda p=port: probe(p, variant.path, f.tls), 30, f"{name} ({variant.key})",  # type: ignore[misc]
                           alive)
            scheme = "https" if f.tls else "http"
            for port, _ in ports.values():  # warm-up: JITs nothing, but fills pools and caches
                if self.args.warmup > 0:
                    run_wrk(self.wrk, self.args, f"{scheme}://127.0.0.1:{port}{variant.path}", self.args.warmup)
            for _ in range(self.args.rounds):
                for name, (port, proc) in ports.items():  # interleaved: A B C A B C …
                    pgid = (proc or self.upstream).pid
                    before = group_usage(pgid)
                    report = run_wrk(self.wrk, self.args, f"{scheme}://127.0.0.1:{port}{variant.path}",
                                     self.args.duration)
                    after = group_usage(pgid)
                    if proc:
                        self.sup.check_alive(proc)
                    result.samples[name].append(to_sample(report, before, after))
            if self.args.profile and gw:
                self._profile(variant, f"{scheme}://127.0.0.1:{gw_port}{variant.path}", gw.pid)
            result.peak_rss_kib = {"nginx": group_usage(ng.pid).peak_rss_kib}
            if gw:
                result.peak_rss_kib["gateway"] = group_usage(gw.pid).peak_rss_kib
        finally:
            if gw:
                self.sup.stop(gw)
            self.sup.stop(ng)
        return result


    def _profile(self, variant: Variant, url: str, pid: int) -> None:
        exe = spyprof.py_spy(self.args.python)
        if exe is None:
            raise BenchError("--profile needs py-spy: pip install py-spy")
        out_dir = Path(self.args.profile)
        out_dir.mkdir(parents=True, exist_ok=True)
        raw = out_dir / f"{variant.key}.txt"
        spy = spyprof.start(exe, pid, self.args.duration, raw)
        try:
            run_wrk(self.wrk, self.args, url, self.args.duration)
            spy.wait(timeout=self.args.duration + 30)
        finally:
            if spy.poll() is None:
                spy.kill()
                spy.wait(timeout=5)
        summary = spyprof.summarise(raw)
        (out_dir / f"{variant.key}-top.md").write_text(f"# {variant.label}\n\n{summary}\n")
        print(f"profile of {variant.key} ({raw}):\n{summary}", file=sys.stderr)


def to_sample(report: dict[str, float], before: Usage, after: Usage) -> Sample:
    requests = int(report["requests"])
    seconds = report["duration_us"] / 1e6
    errors = int(sum(report[k] for k in ("connect", "read", "write", "status", "timeout")))
    return Sample(requests / seconds if seconds else 0.0, report["p50"], report["p99"], requests, errors,
                  after.cpu_s - before.cpu_s)


def _ms(us: float) -> str:
    return f"{us / 1000:.2f}"


def render(results: list[Result], args: argparse.Namespace) -> str:
    lines = [f"wrk: {args.threads} threads, {args.connections} connections, keep-alive, {args.duration:g} s x "
             f"{args.rounds} interleaved round(s) per target; medians across rounds. CPU µs/req = process-group "
             "utime+stime ÷ requests (direct = the upstream nginx).", "",
             "| variant | target | req/s | p50 ms | p99 ms | CPU µs/req | peak RSS MiB | errors |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    summary = ["", "| variant | gateway/nginx | gateway/direct | p99 added vs direct ms | p99 added vs nginx ms |",
               "|---|---:|---:|---:|---:|"]
    skipped = []
    for res in results:
        if res.skipped:
            skipped.append(f"- skipped **{res.variant.key}** ({res.variant.label}): {res.skipped}")
            continue
        med: dict[str, dict[str, float]] = {}
        for target in TARGETS:
            s = res.samples[target]
            if not s:
                continue
            reqs = sum(x.requests for x in s)
            med[target] = {"rps": statistics.median(x.rps for x in s),
                           "p50": statistics.median(x.p50_us for x in s),
                           "p99": statistics.median(x.p99_us for x in s),
                           "cpu": sum(x.cpu_s for x in s) / reqs * 1e6 if reqs else 0.0}
            rss = res.peak_rss_kib.get(target)
            lines.append(f"| {res.variant.label} | {target} | {med[target]['rps']:,.0f} | {_ms(med[target]['p50'])} "
                         f"| {_ms(med[target]['p99'])} | {med[target]['cpu']:.0f} | "
                         f"{f'{rss / 1024:.0f}' if rss else '-'} | {sum(x.errors for x in s)} |")
        if len(med) < len(TARGETS):
            continue
        g, n, d = med["gateway"], med["nginx"], med["direct"]
        summary.append(f"| {res.variant.label} | {g['rps'] / n['rps']:.2f}x | {g['rps'] / d['rps']:.2f}x | "
                       f"{_ms(g['p99'] - d['p99'])} | {_ms(g['p99'] - n['p99'])} |")
    return "\n".join(lines + summary + (["", *skipped] if skipped else []))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run (default 10)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per variant (default 3)")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds per target first")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--upstream-workers", type=int, default=1)
    parser.add_argument("--variants", default=",".join(v.key for v in VARIANTS),
                        help="comma-separated subset of: " + ", ".join(v.key for v in VARIANTS))
    parser.add_argument("--targets", default=",".join(TARGETS), help="subset of direct,nginx,gateway")
    parser.add_argument("--gateway-cmd", default="",
                        help="run this command instead of the gateway; {python} {port} {root} {upstream_port} "
                             "{plain_upstream_port} {tls} are substituted")
    parser.add_argument("--profile", metavar="DIR", default="",
                        help="after the rounds, profile the gateway with py-spy under one more wrk run; "
                             "raw stacks and a top-functions table go to DIR")
    parser.add_argument("--http1-server", choices=("h1", "aiohttp"), default="h1",
                        help="the gateway's HTTP/1.1 server (listeners[].server), to compare the two")
    parser.add_argument("--python", default=sys.executable, help="interpreter that runs the gateway")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (configs, certs, logs)")
    parser.add_argument("--smoke", action="store_true", help="1 s, one round, no warm-up, plain+tls only")
    args = parser.parse_args(argv)
    if args.smoke:
        args.duration, args.rounds, args.warmup = 1.0, 1, 0.0
        if args.variants == parser.get_default("variants"):
            args.variants = "plain,tls"
    if not 1 <= args.duration <= 600 or not 1 <= args.rounds <= 20:
        parser.error("--duration must be 1..600 s and --rounds 1..20")
    chosen = [v for key in args.variants.split(",") for v in VARIANTS if v.key == key.strip()]
    if not chosen:
        parser.error(f"no known variant in {args.variants!r}")
    chosen = [replace(v, features=replace(v.features, http1_server=args.http1_server)) for v in chosen]
    root = Path(tempfile.mkdtemp(prefix="mesh-bench-"))
    sup = Supervisor()
    print(f"work dir: {root}", file=sys.stderr, flush=True)
    try:
        bench = Bench(args, root, sup)
        results = []
        for variant in chosen:
            print(f"… {variant.key}: {variant.label}", file=sys.stderr, flush=True)
            results.append(bench.run_variant(variant))
        print(render(results, args))
        return 0
    except BenchError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    finally:
        sup.close()
        if args.keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
