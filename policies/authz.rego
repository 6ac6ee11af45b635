# Example mesh-gateway policy, in the OPA-Envoy shape (package envoy.authz, query data.envoy.authz.allow).
#
# - Default deny.
# - Each caller, identified by the SPIFFE ID of its client certificate, may use the methods listed for it in
#   data.mesh.grants under the listed path prefixes. Prefixes match whole path segments of input.parsed_path,
#   which the gateway has already percent-decoded and dot-segment-normalised: "/api" covers "/api" and
#   "/api/x", not "/apix", and "/api/%2e%2e/admin" arrives here as ["admin"].
# - Anything under /admin additionally needs a bearer JWT, verified against data.mesh.jwt, with role "admin".
# - `result` is the same decision as an object (use `query: data.envoy.authz.result`): it tells the upstream
#   who was let in, and answers 401 with a challenge when an admin path lacks a token.
package envoy.authz

import rego.v1

import input.attributes.request.http as http_request

default allow := false

principal := input.attributes.source.principal

allow if {
	granted
	not admin_path
}

allow if {
	granted
	admin_path
	token.valid
	"admin" in token.payload.roles
}

granted if {
	some grant in data.mesh.grants
	grant.principal == principal
	http_request.method in grant.methods
	some prefix in grant.prefixes
	segment_prefix(prefix)
}

admin_path if input.parsed_path[0] == "admin"

segment_prefix(prefix) if {
	want := split(trim(prefix, "/"), "/")
	want != [""]
	array.slice(input.parsed_path, 0, count(want)) == want
}

segment_prefix(prefix) if prefix == "/"

bearer := token if {
	[scheme, token] := split(http_request.headers.authorization, " ")
	lower(scheme) == "bearer"
}

token := {"valid": valid, "payload": payload} if {
	[valid, _, payload] := io.jwt.decode_verify(bearer, {
		"cert": json.marshal(data.mesh.jwt.jwks),
		"iss": data.mesh.jwt.issuer,
		"aud": data.mesh.jwt.audience,
	})
}

result := {
	"allowed": true,
	"headers": {"x-authz-principal": principal},
	"response_headers_to_add": {"x-authz-policy": "envoy.authz"},
} if {
	allow
} else := {
	"allowed": false,
	"http_status": 401,
	"body": "admin paths need a bearer token",
	"response_headers_to_add": {"www-authenticate": "Bearer realm=\"mesh\""},
} if {
	granted
	admin_path
	not bearer
} else := {"allowed": false, "http_status": 403, "body": "forbidden by policy"}
