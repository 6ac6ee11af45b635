# Inbound policy of the demo mesh's sidecars (query: data.mesh.inbound.allow).
# Each sidecar evaluates it for calls into its own service: the destination principal is the sidecar's
# (= the service's) SPIFFE ID, the source principal the caller's, both taken from verified certificates.
package mesh.inbound

import rego.v1

default allow := false

# destination service identity → identities allowed to call it
allowed_callers := {
	"spiffe://mesh.local/ns/default/sa/orders": {"spiffe://mesh.local/ns/default/sa/gateway"},
	"spiffe://mesh.local/ns/default/sa/inventory": {"spiffe://mesh.local/ns/default/sa/orders"},
}

allow if {
	input.attributes.request.http.method in {"GET", "HEAD"}
	input.attributes.source.principal in allowed_callers[input.attributes.destination.principal]
}
