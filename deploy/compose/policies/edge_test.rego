package mesh.edge_test

import rego.v1

import data.mesh.edge

request(method, path) := {
	"attributes": {"request": {"http": {"method": method}}},
	"parsed_path": path,
}

test_orders_are_public if edge.allow with input as request("GET", ["orders", "apple"])

test_items_pass_the_edge if edge.allow with input as request("GET", ["items"])

test_writes_are_refused if not edge.allow with input as request("POST", ["orders", "apple"])

test_other_paths_are_refused if not edge.allow with input as request("GET", ["admin"])
