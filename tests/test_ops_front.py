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


def test_the_front_app_refuses_before_forwarding_and_bounds_bodies():
    """The real Starlette app in-process (an upstream port with nothing on it): refusals and
    the body limit are answered by the front itself; a Fleet call is forwarded (and fails
    with 502, nothing listening there)."""
    from starlette.testclient import TestClient

    from fedkd.ops.deploy import free_port
    from fedkd.ops.front import front_app

    app = front_app(upstream=f"127.0.0.1:{free_port()}", ca_file=None, max_body=1000)
    with TestClient(app) as client:
        refused = client.post("/v1/control/start-run", content=b"x")
        assert refused.status_code == 403 and refused.text.startswith("fedkd front: /v1/control/start-run")
        assert client.get("/v1/fleet/pull-messages").status_code == 404
        assert client.post("/v1/fleet/push-object", content=b"x" * 1001).status_code == 413
        unreachable = client.post("/v1/fleet/pull-messages", content=b"x" * 1000)
        assert unreachable.status_code == 502 and "SuperLink unreachable" in unreachable.text
