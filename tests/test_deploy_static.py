"""The deployment material cannot run here (no Docker, no cluster), so it is kept honest statically: every file
parses, references only files that exist, every command is a valid `mesh-gateway` invocation, and every config it
mounts passes `mesh-gateway check`."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import regorus
import yaml

from mesh_gateway.cli import build_parser, main

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
K8S = sorted((ROOT / "deploy" / "k8s").glob("*.yaml"))
IMAGE = "mesh-gateway"


def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def our_services() -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in compose()["services"].items() if svc.get("image", "").startswith(IMAGE)}


def parses(argv: list[str]) -> Any:
    """argparse exits on an invalid command line; turn that into a test failure naming the command."""
    try:
        return build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"not a valid mesh-gateway invocation: {shlex.join(argv)}")


def check_ok(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "-c", str(path)]) == 0, capsys.readouterr().err
    capsys.readouterr()


def test_compose_has_the_whole_stack():
    services = compose()["services"]
    assert {"consul", "opa", "jaeger", "ca-init", "gateway", "orders", "orders-sidecar", "inventory",
            "inventory-sidecar"} <= set(services)
    assert services["consul"]["image"].startswith("hashicorp/consul:")
    assert services["opa"]["image"].startswith("openpolicyagent/opa:")
    assert services["opa"]["command"][:2] == ["run", "--server"]
    assert services["jaeger"]["image"].startswith("jaegertracing/jaeger:2.")
    ports = " ".join(services["jaeger"]["ports"])
    assert ":4317:4317" in ports and ":16686:16686" in ports


def test_compose_references_only_existing_files_and_services():
    data = compose()
    services = data["services"]
    volumes = set(data.get("volumes", {}))
    for name, svc in services.items():
        build = svc.get("build")
        if build:
            assert (ROOT / build["context"] / build["dockerfile"]).is_file(), name
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in volumes, f"{name}: undeclared volume {source}"
        for dependency in svc.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown {dependency}"
        mode = svc.get("network_mode", "")
        if mode.startswith("service:"):
            assert mode.removeprefix("service:") in services


def test_compose_commands_are_valid_and_their_configs_pass_check(capsys):
    checked = []
    for name, svc in our_services().items():
        args = parses(svc["command"])
        if getattr(args, "config", None) is None:
            continue
        mounts = dict(reversed(v.split(":")[:2]) for v in svc.get("volumes", []))
        host_path = mounts.get(str(args.config))
        assert host_path is not None, f"{name}: {args.config} is not mounted"
        check_ok(ROOT / host_path, capsys)
        checked.append(name)
    assert sorted(checked) == ["gateway", "inventory-sidecar", "orders-sidecar"]


def test_compose_configs_only_name_services_of_the_stack():
    services = compose()["services"]
    for name, svc in our_services().items():
        args = parses(svc["command"])
        if getattr(args, "config", None) is None:
            continue
        mounts = dict(reversed(v.split(":")[:2]) for v in svc.get("volumes", []))
        data = yaml.safe_load((ROOT / mounts[str(args.config)]).read_text())
        consul = data.get("consul") or (data.get("discovery") or {}).get("consul") or {}
        urls = [((data.get("authz") or {}).get("opa") or {}).get("url"),
                data.get("telemetry", {}).get("tracing", {}).get("endpoint"),
                f"http://{consul['address']}" if consul else None,
                (data.get("identity", {}).get("remote") or {}).get("address")]
        for found in filter(None, urls):
            host = found.split("://", 1)[-1].split(":")[0].split("/")[0]
            assert host in services, f"{name}: {found} names no service of the stack"
            assert host in svc.get("depends_on", {}) or host == svc.get("network_mode", "").removeprefix("service:"), \
                f"{name} uses {host} but does not wait for it"
        if consul.get("registration", {}).get("enabled"):
            # Registered under a name the other containers resolve: the service whose network namespace it uses.
            own = svc.get("network_mode", "").removeprefix("service:") or name
            assert consul["registration"]["address"] == own, f"{name} registers an address others cannot reach"


def volume_of(svc: dict[str, Any], container_path: str) -> tuple[str, str] | None:
    """(named volume, path inside it) for a container path, or None when no named volume holds it."""
    for volume in svc.get("volumes", []):
        source, target = volume.split(":")[:2]
        if not source.startswith(".") and (container_path + "/").startswith(target.rstrip("/") + "/"):
            return source, container_path[len(target.rstrip("/")):]
    return None


def test_compose_identity_files_are_produced_by_a_bootstrap_job_and_no_workload_holds_the_ca_key():
    services = compose()["services"]
    ca_jobs = {"ca-init", "ca", "ca-bundle"} | {n for n in services if n.endswith("-token")}
    for name, svc in our_services().items():
        if name not in ca_jobs:
            assert all(not v.startswith("certs:") for v in svc.get("volumes", [])), f"{name} mounts the CA"
    produced = set()
    for name in ca_jobs:
        command = [str(a) for a in services[name]["command"]]
        if "--out" in command:
            found = volume_of(services[name], command[command.index("--out") + 1])
            assert found is not None, f"{name} writes outside a shared volume"
            produced.add(found)
    serve = [str(a) for a in services["ca"]["command"]]
    allowed_dns = {serve[i + 1] for i, arg in enumerate(serve) if arg == "--allow-dns"}
    checked = 0
    for name, svc in our_services().items():
        args = parses(svc["command"])
        if getattr(args, "config", None) is None:
            continue
        mounts = dict(reversed(v.split(":")[:2]) for v in svc.get("volumes", []))
        identity = yaml.safe_load((ROOT / mounts[str(args.config)]).read_text())["identity"]
        assert identity["issuer"] == "remote", f"{name} should get its SVID from the CA API"
        for key in ("bundle", "join_token_file"):
            assert volume_of(svc, identity["remote"][key]) in produced, f"{name}: nothing writes {key}"
        assert set(identity["dns"]) <= allowed_dns, f"{name} asks for DNS SANs `ca serve` refuses"
        checked += 1
    assert checked == 3


def opa_policy_set() -> regorus.Engine:
    """What the compose OPA server serves: every path on its command line, resolved through its volumes."""
    opa = compose()["services"]["opa"]
    mounts = dict(reversed(v.split(":")[:2]) for v in opa["volumes"])
    roots = [arg for arg in opa["command"] if arg.startswith("/")]
    assert roots and all(root in mounts for root in roots), "OPA loads paths that are not mounted"
    engine = regorus.Engine()
    for root in roots:
        source = ROOT / mounts[root]
        files = [source] if source.is_file() else sorted(source.rglob("*"))
        for path in files:
            if path.suffix == ".rego":
                engine.add_policy(str(path.relative_to(ROOT)), path.read_text())
            elif path.name == "data.json" and path.parent == source:
                engine.add_data_json(path.read_text())
    return engine


def mesh_input(source: str, destination: str, method: str = "GET", path: str = "/") -> dict[str, Any]:
    return {"attributes": {"source": {"principal": f"spiffe://mesh.local/ns/default/sa/{source}"},
                           "destination": {"principal": f"spiffe://mesh.local/ns/default/sa/{destination}"},
                           "request": {"http": {"method": method, "path": path}}},
            "parsed_path": [p for p in path.split("/") if p]}


def decide(engine: regorus.Engine, query: str, document: dict[str, Any]) -> bool:
    engine.set_input(document)
    return bool(engine.eval_rule(query))


def test_compose_opa_serves_the_queries_the_configs_ask_for():
    engine = opa_policy_set()
    # The gateway: reads of orders and items pass the edge, anything else does not.
    assert decide(engine, "data.mesh.edge.allow", mesh_input("none", "gateway", path="/orders/apple"))
    assert decide(engine, "data.mesh.edge.allow", mesh_input("none", "gateway", path="/items"))
    assert not decide(engine, "data.mesh.edge.allow", mesh_input("none", "gateway", "DELETE", "/orders/apple"))
    # The sidecars: gateway → orders and orders → inventory only.
    assert decide(engine, "data.mesh.inbound.allow", mesh_input("gateway", "orders"))
    assert decide(engine, "data.mesh.inbound.allow", mesh_input("orders", "inventory"))
    assert not decide(engine, "data.mesh.inbound.allow", mesh_input("gateway", "inventory"))
    # And the shipped example policy still loads beside them.
    assert decide(engine, "data.envoy.authz.allow", mesh_input("client", "gateway", path="/api/x"))


def test_compose_ca_bootstrap_is_idempotent(tmp_path, capsys):
    argv = [str(a) for a in compose()["services"]["ca-init"]["command"]]
    argv[argv.index("/certs")] = str(tmp_path / "certs")
    assert main(argv) == 0
    bundle = (tmp_path / "certs" / "bundle.pem").read_bytes()
    assert main(argv) == 0, "a second `docker compose up` must not fail the one-shot CA service"
    assert (tmp_path / "certs" / "bundle.pem").read_bytes() == bundle
    assert "nothing to do" in capsys.readouterr().out


def test_compose_bootstrap_jobs_write_the_bundle_and_a_private_token(tmp_path, capsys):
    services = compose()["services"]

    def run(name: str) -> None:
        argv = [str(a) for a in services[name]["command"]]
        for container, host in (("/certs", tmp_path / "certs"), ("/trust", tmp_path / "trust"),
                                ("/tokens", tmp_path / "tokens")):
            argv = [str(host) + a[len(container):] if a.startswith(container) else a for a in argv]
        assert main(argv) == 0, capsys.readouterr().err

    for name in ("ca-init", "ca-bundle", "orders-token"):
        run(name)
    assert (tmp_path / "trust" / "bundle.pem").read_bytes() == (tmp_path / "certs" / "bundle.pem").read_bytes()
    token = tmp_path / "tokens" / "orders"
    assert token.stat().st_mode & 0o777 == 0o600
    assert len(token.read_text().strip()) > 30
    assert token.read_text().strip() not in capsys.readouterr().out, "a token written to a file is not printed"


def test_dockerfile_is_non_root_and_copies_existing_files():
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    for line in text.splitlines():
        if line.startswith("COPY") and "--from=" not in line:
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), f"Dockerfile copies missing {source}"
    user = re.findall(r"^USER (\S+)", text, re.M)
    assert user and not user[-1].startswith(("root", "0")), "the image must not run as root"
    assert 'ENTRYPOINT ["mesh-gateway"]' in text
    cmd = re.search(r"^CMD (\[.*\])", text, re.M)
    assert cmd is not None
    parses(yaml.safe_load(cmd.group(1)))
    assert "PYTHONDONTWRITEBYTECODE=1" in text, "read-only root FS: no bytecode written at run time"


def k8s_documents() -> list[dict[str, Any]]:
    docs = []
    for path in K8S:
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def test_k8s_has_the_gateway_objects_and_a_sidecar_example():
    kinds = {(d["kind"], d["metadata"]["name"]) for d in k8s_documents()}
    for expected in [("Deployment", "mesh-gateway"), ("Service", "mesh-gateway"), ("ConfigMap", "mesh-gateway-config"),
                     ("ConfigMap", "mesh-gateway-policies"), ("PodDisruptionBudget", "mesh-gateway"),
                     ("HorizontalPodAutoscaler", "mesh-gateway"), ("Deployment", "orders")]:
        assert expected in kinds
    orders = next(d for d in k8s_documents() if d["kind"] == "Deployment" and d["metadata"]["name"] == "orders")
    pod = orders["spec"]["template"]["spec"]
    sidecar = next(c for c in pod["initContainers"] if c["name"] == "mesh-sidecar")
    assert sidecar["restartPolicy"] == "Always"
    assert parses(sidecar["args"]).command == "sidecar"


def test_k8s_containers_run_valid_commands_read_only_and_non_root():
    for doc in k8s_documents():
        if doc["kind"] != "Deployment":
            continue
        pod = doc["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        for container in pod.get("initContainers", []) + pod["containers"]:
            assert container["image"].startswith(IMAGE)
            parses(container["args"])
            assert container["securityContext"]["readOnlyRootFilesystem"] is True
            config_maps = {v["name"]: v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v}
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in {v["name"] for v in pod["volumes"]}
                if mount["name"] in config_maps and "subPath" in mount:
                    assert mount["subPath"] in config_map(config_maps[mount["name"]])["data"]


def config_map(name: str) -> dict[str, Any]:
    return next(d for d in k8s_documents() if d["kind"] == "ConfigMap" and d["metadata"]["name"] == name)


def test_k8s_configs_pass_check(tmp_path, capsys):
    checked = 0
    for doc in k8s_documents():
        if doc["kind"] != "ConfigMap":
            continue
        for key, text in doc["data"].items():
            if key.endswith(".yaml"):
                path = tmp_path / f"{doc['metadata']['name']}-{key}"
                path.write_text(text)
                check_ok(path, capsys)
                checked += 1
    assert checked == 2


def test_k8s_policies_compile_and_decide_like_the_shipped_files():
    shipped = config_map("mesh-gateway-policies")["data"]
    assert shipped["edge.rego"] == (ROOT / "deploy" / "compose" / "policies" / "edge.rego").read_text()
    engine = regorus.Engine()
    for name, text in shipped.items():
        engine.add_policy(name, text)
    assert decide(engine, "data.mesh.edge.allow", mesh_input("none", "gateway", path="/orders/apple"))
    assert decide(engine, "data.mesh.inbound.allow", mesh_input("gateway", "orders"))
    assert not decide(engine, "data.mesh.inbound.allow", mesh_input("gateway", "inventory"))
    demo = regorus.Engine()
    demo_policy = ROOT / "mesh_gateway" / "demo" / "policies" / "mesh_inbound.rego"
    demo.add_policy("mesh_inbound.rego", demo_policy.read_text())
    for caller, callee in (("gateway", "orders"), ("orders", "inventory"), ("gateway", "inventory"), ("x", "orders")):
        document = mesh_input(caller, callee)
        assert decide(engine, "data.mesh.inbound.allow", document) == decide(demo, "data.mesh.inbound.allow", document)


def test_the_sidecar_yaml_in_the_docs_passes_check(tmp_path, capsys):
    text = (ROOT / "docs" / "sidecar.md").read_text()
    example = text.split("## sidecar.yaml", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "sidecar.yaml"
    path.write_text(example)
    check_ok(path, capsys)


def test_systemd_unit_runs_valid_commands():
    text = (ROOT / "deploy" / "systemd" / "mesh-gateway.service").read_text()
    commands = re.findall(r"^ExecStart(?:Pre)?=(\S+) (.*)$", text, re.M)
    assert len(commands) == 2
    for binary, rest in commands:
        assert binary.endswith("/mesh-gateway")
        parses(shlex.split(rest))
    assert re.search(r"^User=(?!root)\S+", text, re.M)
    assert "NoNewPrivileges=true" in text
