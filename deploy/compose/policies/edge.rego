# The gateway's edge policy in the compose stack and the Kubernetes example (query: data.mesh.edge.allow).
# Reading orders and the item list is public; the services' own sidecars then decide who may call them
# (mesh_inbound.rego): /orders/... succeeds end to end, /items is refused by inventory's sidecar.
package mesh.edge

import rego.v1

default allow := false

allow if {
	input.attributes.request.http.method in {"GET", "HEAD"}
	input.parsed_path[0] in {"orders", "items"}
}
