# Tests for authz.rego: `mesh-gateway policy test policies/` (and `make test`) runs every test_* rule.
package envoy.authz_test

import rego.v1

import data.envoy.authz

client := "spiffe://mesh.local/ns/default/sa/client"

console := "spiffe://mesh.local/ns/ops/sa/console"

# ES256 tokens signed by the key whose public half is data.mesh.jwt.jwks (kid mesh-demo-1).
admin_token := "eyJ0eXAiOiJKV1QiLCJhbGciOiJFUzI1NiIsImtpZCI6Im1lc2gtZGVtby0xIn0.eyJpc3MiOiJodHRwczovL2lkcC5tZXNoLmxvY2FsIiwiYXVkIjoibWVzaC1nYXRld2F5Iiwic3ViIjoiYWxpY2UiLCJyb2xlcyI6WyJhZG1pbiJdLCJleHAiOjQxMDI0NDQ4MDB9.HyIRlbZSwoQjtRRYOquyjqD_Dzwu5Pg2yWZIpPi00JZVM5PlElX7JcSHjyfEEXSFW6sld74TeyU7l6eps6txmg"

viewer_token := "eyJ0eXAiOiJKV1QiLCJhbGciOiJFUzI1NiIsImtpZCI6Im1lc2gtZGVtby0xIn0.eyJpc3MiOiJodHRwczovL2lkcC5tZXNoLmxvY2FsIiwiYXVkIjoibWVzaC1nYXRld2F5Iiwic3ViIjoiYm9iIiwicm9sZXMiOlsidmlld2VyIl0sImV4cCI6NDEwMjQ0NDgwMH0.grhhxNfu0hDzN49SuFlZiMqsBxsrYYcV__6zzQyQkfCQX-CfUC5AlVU6D7zmvB6-_i4FjKycIo5DvIcLZNH41g"

expired_token := "eyJ0eXAiOiJKV1QiLCJhbGciOiJFUzI1NiIsImtpZCI6Im1lc2gtZGVtby0xIn0.eyJpc3MiOiJodHRwczovL2lkcC5tZXNoLmxvY2FsIiwiYXVkIjoibWVzaC1nYXRld2F5Iiwic3ViIjoiYWxpY2UiLCJyb2xlcyI6WyJhZG1pbiJdLCJleHAiOjE2MDAwMDAwMDB9.Xb6bCRlao9ZEQ5NZCTV7MPG4LMDFgE2mhvFfCfyUChXY6_iqjwicrecvy_okEdIo5uE2hCFevNaBYtiQfthrtA"

foreign_issuer_token := "eyJ0eXAiOiJKV1QiLCJhbGciOiJFUzI1NiIsImtpZCI6Im1lc2gtZGVtby0xIn0.eyJpc3MiOiJodHRwczovL2V2aWwuZXhhbXBsZSIsImF1ZCI6Im1lc2gtZ2F0ZXdheSIsInN1YiI6ImFsaWNlIiwicm9sZXMiOlsiYWRtaW4iXSwiZXhwIjo0MTAyNDQ0ODAwfQ.-_38A3E1T6yjXZq976pJfH-mVBjWN3lruRSM7PRtiSl89Jth723415L0KnAwbB99WvOekMONCmkljKLBrQippQ"

req(who, method, segments, headers) := {
	"attributes": {
		"source": {"principal": who},
		"request": {"http": {"method": method, "headers": headers}},
	},
	"parsed_path": segments,
}

bearer(token) := {"authorization": concat(" ", ["Bearer", token])}

test_client_reads_api if {
	authz.allow with input as req(client, "GET", ["api", "orders", "7"], {})
}

test_client_reads_api_root if {
	authz.allow with input as req(client, "GET", ["api"], {})
}

test_client_cannot_delete if {
	not authz.allow with input as req(client, "DELETE", ["api", "orders", "7"], {})
}

test_client_posts_orders_only if {
	authz.allow with input as req(client, "POST", ["api", "orders"], {})
	not authz.allow with input as req(client, "POST", ["api", "users"], {})
}

test_prefixes_match_whole_segments if {
	not authz.allow with input as req(client, "GET", ["apix"], {})
	not authz.allow with input as req(client, "GET", ["API"], {})
}

test_unknown_caller_denied if {
	not authz.allow with input as req("spiffe://mesh.local/ns/default/sa/intruder", "GET", ["api"], {})
}

test_caller_without_certificate_denied if {
	not authz.allow with input as {
		"attributes": {"request": {"http": {"method": "GET", "headers": {}}}},
		"parsed_path": ["api"],
	}
}

test_admin_needs_a_token if {
	not authz.allow with input as req(console, "GET", ["admin", "users"], {})
}

test_admin_with_admin_token if {
	authz.allow with input as req(console, "GET", ["admin", "users"], bearer(admin_token))
}

test_admin_with_viewer_token_denied if {
	not authz.allow with input as req(console, "GET", ["admin", "users"], bearer(viewer_token))
}

test_admin_with_expired_token_denied if {
	not authz.allow with input as req(console, "GET", ["admin"], bearer(expired_token))
}

test_admin_with_foreign_issuer_denied if {
	not authz.allow with input as req(console, "GET", ["admin"], bearer(foreign_issuer_token))
}

test_admin_token_does_not_help_without_a_grant if {
	not authz.allow with input as req(client, "GET", ["admin"], bearer(admin_token))
}

test_result_tells_upstream_who_was_authorized if {
	decision := authz.result with input as req(client, "GET", ["api"], {})
	decision.allowed == true
	decision.headers["x-authz-principal"] == client
}

test_result_challenges_missing_token if {
	decision := authz.result with input as req(console, "GET", ["admin"], {})
	decision.allowed == false
	decision.http_status == 401
	startswith(decision.response_headers_to_add["www-authenticate"], "Bearer")
}

test_result_denies_with_403 if {
	decision := authz.result with input as req(client, "DELETE", ["api"], {})
	decision == {"allowed": false, "http_status": 403, "body": "forbidden by policy"}
}
