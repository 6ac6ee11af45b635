package mesh.inbound_test

import rego.v1

import data.mesh.inbound

request(source, destination, method) := {"attributes": {
	"source": {"principal": source},
	"destination": {"principal": destination},
	"request": {"http": {"method": method, "path": "/"}},
}}

test_gateway_may_call_orders if {
	inbound.allow with input as request(
		"spiffe://mesh.local/ns/default/sa/gateway",
		"spiffe://mesh.local/ns/default/sa/orders", "GET",
	)
}

test_orders_may_call_inventory if {
	inbound.allow with input as request(
		"spiffe://mesh.local/ns/default/sa/orders",
		"spiffe://mesh.local/ns/default/sa/inventory", "GET",
	)
}

test_gateway_may_not_call_inventory if {
	not inbound.allow with input as request(
		"spiffe://mesh.local/ns/default/sa/gateway",
		"spiffe://mesh.local/ns/default/sa/inventory", "GET",
	)
}

test_writes_are_refused if {
	not inbound.allow with input as request(
		"spiffe://mesh.local/ns/default/sa/gateway",
		"spiffe://mesh.local/ns/default/sa/orders", "DELETE",
	)
}
