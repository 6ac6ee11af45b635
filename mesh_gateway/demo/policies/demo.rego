# The policy `mesh-gateway demo` (and `make run`) serves: the demo client, identified by the SPIFFE ID in its
# certificate, may GET and HEAD anything; every other caller and method is denied (403). See docs/authz.md and the
# fuller example in policies/.
package envoy.authz

import rego.v1

default allow := false

allow if {
	input.attributes.source.principal == "spiffe://mesh.local/ns/default/sa/demo-client"
	input.attributes.request.http.method in {"GET", "HEAD"}
}
