"""The identity section of gateway.yaml: sources validated at load, errors naming the key, secrets hidden."""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh_gateway import config as cfg

BASE = {"trust_domain": "mesh.local", "listeners": [{"name": "a", "address": "127.0.0.1:8443"}]}


def parse(identity: dict[str, object]) -> cfg.GatewayConfig:
    return cfg.parse({**BASE, "identity": {"spiffe_id": "spiffe://mesh.local/gw", **identity}})


@pytest.mark.parametrize(
    ("identity", "error"),
    [
        ({"provider": "consul"}, "identity.consul: required when provider is consul"),
        ({"issuer": "remote"}, "identity.remote: required when issuer is remote"),
        ({"provider": "consul", "issuer": "remote", "consul": {"service": "gw"},
          "remote": {"address": "127.0.0.1:8501"}}, "identity.issuer: must be local when provider is consul"),
        ({"provider": "consul", "consul": {"service": "gw", "token": "x", "token_file": "t"}},
         "identity.consul: give token or token_file, not both"),
        ({"provider": "consul", "consul": {"service": "gw", "address": "127.0.0.1:8500"}}, "identity.consul.address"),
        ({"issuer": "remote", "remote": {"address": "nowhere"}}, "identity.remote.address: expected host:port"),
        ({"ttl": "30s"}, "identity.ttl: must be at least 1m"),
        ({"provider": "vault"}, "identity.provider"),
    ],
)
def test_identity_errors_name_the_key(identity: dict[str, object], error: str) -> None:
    with pytest.raises(cfg.ConfigError) as exc:
        parse(identity)
    assert any(line.startswith(error) for line in exc.value.errors), exc.value.errors


def test_consul_token_hidden_and_paths_resolved(tmp_path: Path) -> None:
    config = parse({"provider": "consul", "consul": {"service": "gw", "token": "s3cret-acl"}})
    assert "s3cret-acl" not in repr(config)
    assert config.identity.consul is not None
    assert config.identity.consul.token is not None and config.identity.consul.token.get_secret_value() == "s3cret-acl"
    (tmp_path / "gw.yaml").write_text(
        "trust_domain: mesh.local\nlisteners: [{name: a, address: '127.0.0.1:8443'}]\n"
        "identity: {spiffe_id: 'spiffe://mesh.local/gw', issuer: remote,\n"
        "           remote: {address: '127.0.0.1:8501', join_token_file: gw.token, bundle: b.pem}}\n")
    loaded = cfg.load(tmp_path / "gw.yaml")
    assert loaded.identity.remote is not None
    assert loaded.identity.remote.join_token_file == tmp_path / "gw.token"
    assert loaded.identity.remote.bundle == tmp_path / "b.pem"
