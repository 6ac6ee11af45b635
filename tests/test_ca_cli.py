"""`mesh-gateway ca init|issue` as a user runs them, checked with openssl."""

from __future__ import annotations

import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from mesh_gateway.cli import main

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")


def run_cli(*args: str) -> int:
    return main(list(args))


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "certs"
    assert run_cli("ca", "init", "--dir", str(directory), "--trust-domain", "mesh.local") == 0
    return directory


def test_init_writes_root_intermediate_bundle_and_private_keys(ca_dir: Path) -> None:
    for name in ("root.pem", "intermediate.pem", "bundle.pem", "root.key", "intermediate.key"):
        assert (ca_dir / name).exists(), name
    assert mode(ca_dir / "root.key") == 0o600
    assert mode(ca_dir / "intermediate.key") == 0o600
    intermediate = x509.load_pem_x509_certificate((ca_dir / "intermediate.pem").read_bytes())
    constraints = intermediate.extensions.get_extension_for_class(x509.NameConstraints).value
    assert constraints.permitted_subtrees == [x509.UniformResourceIdentifier("mesh.local")]
    assert intermediate.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 0


def test_init_refuses_to_overwrite_without_force(ca_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = (ca_dir / "root.pem").read_bytes()
    assert run_cli("ca", "init", "--dir", str(ca_dir), "--trust-domain", "mesh.local") == 2
    assert "--force" in capsys.readouterr().err
    assert (ca_dir / "root.pem").read_bytes() == before
    assert run_cli("ca", "init", "--dir", str(ca_dir), "--trust-domain", "mesh.local", "--force") == 0
    assert (ca_dir / "root.pem").read_bytes() != before


@needs_openssl
def test_issued_leaf_verifies_with_openssl_and_has_one_uri_san(ca_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "web"
    assert run_cli("ca", "issue", "--dir", str(ca_dir), "--spiffe-id", "spiffe://mesh.local/ns/default/sa/web",
                   "--dns", "localhost", "--ttl", "1h", "--out", str(out)) == 0
    assert mode(tmp_path / "web.key") == 0o600
    chain = x509.load_pem_x509_certificates((tmp_path / "web.pem").read_bytes())
    assert len(chain) == 2
    san = chain[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://mesh.local/ns/default/sa/web"]
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    (tmp_path / "leaf.pem").write_bytes(chain[0].public_bytes(encoding=__import__(
        "cryptography.hazmat.primitives.serialization", fromlist=["Encoding"]).Encoding.PEM))
    result = subprocess.run(["openssl", "verify", "-CAfile", str(ca_dir / "bundle.pem"), "-untrusted",
                             str(ca_dir / "intermediate.pem"), str(tmp_path / "leaf.pem")],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    lifetime = chain[0].not_valid_after_utc - chain[0].not_valid_before_utc
    assert 3600 <= lifetime.total_seconds() <= 3610  # 1 h plus the 10 s backdating


@needs_openssl
def test_name_constraint_rejects_a_leaf_for_another_trust_domain(ca_dir: Path, tmp_path: Path) -> None:
    import datetime as dt

    from cryptography.hazmat.primitives import hashes, serialization

    from mesh_gateway.identity.ca import load_ca, new_key

    ca = load_ca(ca_dir)
    now = dt.datetime.now(dt.UTC)
    forged = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(ca.intermediate.subject)
              .public_key(new_key().public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now).not_valid_after(now + dt.timedelta(hours=1))
              .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier("spiffe://evil.example/x")]),
                             critical=True)
              .sign(ca.intermediate_key, hashes.SHA256()))
    (tmp_path / "forged.pem").write_bytes(forged.public_bytes(serialization.Encoding.PEM))
    result = subprocess.run(["openssl", "verify", "-CAfile", str(ca_dir / "bundle.pem"), "-untrusted",
                             str(ca_dir / "intermediate.pem"), str(tmp_path / "forged.pem")],
                            capture_output=True, text=True, check=False)
    assert result.returncode != 0
    assert "permitted subtree violation" in result.stdout + result.stderr


@pytest.mark.parametrize(("spiffe_id", "ttl", "message"), [
    ("spiffe://other.domain/ns/default/sa/web", "1h", "not in trust domain"),
    ("http://mesh.local/web", "1h", "not a spiffe:// URI"),
    ("spiffe://mesh.local/ns/../admin", "1h", "invalid SPIFFE ID path segment"),
    ("spiffe://mesh.local/ns/default/sa/web", "0s", "TTL must be positive"),
    ("spiffe://mesh.local/ns/default/sa/web", "-5m", "expected a duration"),
    ("spiffe://mesh.local/ns/default/sa/web", "800d", "past the intermediate's expiry"),
])
def test_bad_issue_input_is_one_line_exit_2_and_writes_nothing(
        ca_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], spiffe_id: str, ttl: str, message: str,
) -> None:
    out = tmp_path / "bad"
    assert run_cli("ca", "issue", "--dir", str(ca_dir), "--spiffe-id", spiffe_id, f"--ttl={ttl}",
                   "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1
    assert not (tmp_path / "bad.pem").exists() and not (tmp_path / "bad.key").exists()


def test_console_entry_point_runs_as_a_module(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "mesh_gateway", "ca", "init", "--dir", str(tmp_path / "c"),
                             "--trust-domain", "Bad_Domain"], capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert "invalid trust domain" in result.stderr
    assert "Traceback" not in result.stderr
