"""fedkd.ops.front: what the SuperLink's front forwards (the Fleet API, exactly as Flower's
SuperNode calls it) and what it refuses; the live front is exercised in
tests/e2e/test_e2e_deployment.py."""

from __future__ import annotations

import ast
import inspect

from fedkd.ops.front import FLEET_ROUTES, refusal


def test_the_fleet_routes_are_exactly_what_flowers_supernode_calls():
    from flwr.supernode import fleet_http_client

    tree = ast.parse(inspect.getsource(fleet_http_client))
    called = {node.value.value for node in ast.walk(tree) if isinstance(node, ast.keyword)
              and node.arg == "path" and isinstance(node.value, ast.Constant)}
    assert {path for _, path in FLEET_ROUTES} == called


def test_the_fleet_routes_are_all_the_superlink_serves_under_v1_fleet():
    from flwr.superlink.routers.fleet.router import router

    served = {(method, route.path) for route in router.routes for method in route.methods}
    assert served == set(FLEET_ROUTES)


def test_control_and_runtime_are_refused_with_403_the_rest_404():
    assert refusal("POST", "/v1/fleet/pull-messages") is None and refusal("GET", "/health") is None
    status, reason = refusal("POST", "/v1/control/start-run")
    assert status == 403 and reason.startswith("fedkd front: /v1/control/start-run refused: the Control")
    assert refusal("POST", "/v1/runtime/push-messages")[0] == 403
    assert refusal("GET", "/v1/fleet/pull-messages")[0] == 404  # the Fleet API is POST only
    assert refusal("POST", "/v1/fleet/../control/start-run")[0] == 404
    assert refusal("GET", "/docs")[0] == 404
