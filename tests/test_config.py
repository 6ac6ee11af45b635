"""Config validation as `mesh-gateway check` reports it: every error names its key path."""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh_gateway.cli import main

VALID = """
trust_domain: mesh.local
listeners:
  - name: public
    address: 127.0.0.1:8443
    tls: {client_auth: optional}
identity: {ca_dir: certs, spiffe_id: spiffe://mesh.local/ns/default/sa/gateway, ttl: 1h}
catalog:
  static:
    web: [{address: 127.0.0.1, port: 9001, spiffe_id: spiffe://mesh.local/ns/default/sa/web}]
routes:
  - {name: web, match: {host: "*", path_prefix: /}, service: web, timeout_s: 15}
admin: {address: 127.0.0.1:9901}
"""


def check(tmp_path: Path, text: str) -> int:
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    return main(["check", "-c", str(path)])


def test_valid_config_prints_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert check(tmp_path, VALID) == 0
    assert capsys.readouterr().out.strip() == "ok"


@pytest.mark.parametrize(("change", "expected"), [
    (("path_prefix: /}", "path_prefix: api}"), "routes[0].match.path_prefix: must start with '/'"),
    (("timeout_s: 15", "timeout_s: -1"), "routes[0].timeout_s: Input should be greater than 0"),
    (("service: web,", "service: nope,"), "routes[0].service: unknown service 'nope'"),
    (("port: 9001", "port: 99999"), "catalog.static.web[0].port: Input should be less than or equal to 65535"),
    (("ttl: 1h", "ttl: 10s"), "identity.ttl: must be at least 1m"),
    (("ttl: 1h", "ttl: soon"), "identity.ttl: expected a duration like 30s, 15m or 1h"),
    (("client_auth: optional", "client_auth: maybe"), "listeners[0].tls.client_auth: Input should be"),
    (("address: 127.0.0.1:9901", "address: nowhere"), "admin.address: expected host:port"),
    (("spiffe_id: spiffe://mesh.local/ns/default/sa/gateway", "spiffe_id: spiffe://other/x"),
     "identity.spiffe_id: must be in trust domain 'mesh.local'"),
    (("admin:", "bogus: 1\nadmin:"), "bogus: unknown key"),
    (("path_prefix: /}", "path_prefix: /, path: /x}"), "routes[0].match: give at most one of"),
])
def test_errors_name_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str], change: tuple[str, str],
                             expected: str) -> None:
    assert change[0] in VALID
    assert check(tmp_path, VALID.replace(change[0], change[1], 1)) == 2
    assert expected in capsys.readouterr().err


def test_invalid_yaml_and_missing_file_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert check(tmp_path, "listeners: [") == 2
    assert "invalid YAML" in capsys.readouterr().err
    assert main(["check", "-c", str(tmp_path / "absent.yaml")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    from mesh_gateway.config import load

    path = tmp_path / "conf" / "gateway.yaml"
    path.parent.mkdir()
    path.write_text(VALID)
    assert load(path).identity.ca_dir == tmp_path / "conf" / "certs"


def test_the_complete_example_in_the_docs_is_valid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import re

    docs = (Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text()
    examples = [b for b in re.findall(r"```yaml\n(.*?)```", docs, re.S) if "trust_domain:" in b and "listeners:" in b]
    assert examples, "docs/configuration.md lost its complete example"
    for example in examples:
        assert check(tmp_path, example) == 0, capsys.readouterr().err
