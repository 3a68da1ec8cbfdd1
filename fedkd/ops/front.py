"""The SuperLink's network front: TLS in front of ``flower-superlink`` that passes only the
Fleet API (what SuperNodes call) and refuses the Control and Runtime APIs.

Flower 1.41 serves the Fleet, Control and Runtime APIs of ``flower-superlink`` on one HTTPS
port, and the Control API has no authentication in open-source Flower: whoever reaches that
port (anyone holding the public ``ca.crt``) can submit an app that every SuperNode runs,
register or unregister nodes and list runs. ``fedkd deploy superlink`` therefore binds the
SuperLink to ``127.0.0.1:<control port>`` (the operator's ``flwr`` CLI, on the server host,
uses that address) and starts this front on the network address. The front forwards the
requests in :data:`FLEET_ROUTES` (method and exact path, the calls Flower's
``FleetHttpClient`` makes, FAB download ``get-fab`` included) and ``GET /health``, and
answers every other request itself: 403 for ``/v1/control/...`` and ``/v1/runtime/...``,
404 otherwise, with a one-line reason. SuperNode authentication is unchanged: the signed
headers are forwarded as they are and the SuperLink checks them.

Built on Starlette (the app), httpx (the upstream client) and uvicorn (the TLS server),
the stack Flower itself runs on; HTTP/1.1, unary requests, as Flower's clients speak.
The loopback hop is TLS too (Flower refuses SuperNode authentication without it), its
certificate checked against the federation's CA.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

FLEET_ROUTES = frozenset(("POST", f"/v1/fleet/{name}") for name in (
    "register-node", "activate-node", "deactivate-node", "unregister-node", "send-node-heartbeat",
    "pull-messages", "push-messages", "get-run", "get-fab", "push-object", "pull-object",
    "confirm-message-received",
))
"""The Fleet API as ``(method, path)``: the routes of ``flwr/superlink/routers/fleet/router.py``
(Flower 1.41), exactly the calls of ``flwr/supernode/fleet_http_client.py``."""

PUBLIC_ROUTES = FLEET_ROUTES | {("GET", "/health")}
MAX_BODY_BYTES = 512 * 1024 * 1024
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                         "trailer", "transfer-encoding", "upgrade", "host", "content-length",
                         "content-encoding"})


def refusal(method: str, path: str) -> tuple[int, str] | None:
    """``(status, reason)`` when the front refuses ``method path``; None when it forwards it."""
    if (method.upper(), path) in PUBLIC_ROUTES:
        return None
    if path.startswith(("/v1/control", "/v1/runtime")):
        return 403, (f"fedkd front: {path} refused: the Control and Runtime APIs are served on the "
                     "server host's loopback address only (flwr there uses 127.0.0.1:<control port>)")
    return 404, f"fedkd front: {method} {path} refused: only the Fleet API is served here"


def _forward_headers(headers: Any) -> list[tuple[str, str]]:
    return [(k, v) for k, v in headers.items() if k.lower() not in _HOP_BY_HOP]


def front_app(*, upstream: str, ca_file: str | Path | None, max_body: int = MAX_BODY_BYTES,
              timeout: float = 300.0):
    """The Starlette app forwarding :data:`PUBLIC_ROUTES` to ``https://<upstream>`` (the
    SuperLink on loopback, its certificate verified against ``ca_file``; its host name is
    not checked, the address being this host's own loopback); ``ca_file=None``: plaintext
    ``http://<upstream>`` (an insecure deployment)."""
    import contextlib

    import httpx
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse, Response
    from starlette.routing import Route

    context: ssl.SSLContext | bool = False
    if ca_file is not None:
        context = ssl.create_default_context(cafile=str(ca_file))
        context.check_hostname = False
    scheme = "http" if ca_file is None else "https"
    state: dict[str, httpx.AsyncClient] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app):  # noqa: ANN001, ANN202
        async with httpx.AsyncClient(base_url=f"{scheme}://{upstream}", verify=context,
                                     timeout=httpx.Timeout(timeout, connect=10.0)) as client:
            state["client"] = client
            yield

    async def handle(request: Request) -> Response:
        refused = refusal(request.method, request.url.path)
        if refused is not None:
            return PlainTextResponse(refused[1] + "\n", status_code=refused[0])
        body = bytearray()
        async for chunk in request.stream():  # bounded whether or not a content-length is sent
            body.extend(chunk)
            if len(body) > max_body:
                return PlainTextResponse(f"fedkd front: a body over {max_body} bytes refused\n", status_code=413)
        headers = _forward_headers(request.headers)
        if request.client is not None:
            headers.append(("x-forwarded-for", request.client.host))
        try:
            upstream_response = await state["client"].request(request.method, request.url.path,
                                                              content=bytes(body), headers=headers)
        except httpx.HTTPError as err:
            return PlainTextResponse(f"fedkd front: SuperLink unreachable: {type(err).__name__}\n",
                                     status_code=502)
        return Response(upstream_response.content, status_code=upstream_response.status_code,
                        headers=dict(_forward_headers(upstream_response.headers)))

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
    return Starlette(routes=[Route("/{path:path}", handle, methods=methods)], lifespan=lifespan)


def serve_front(*, host: str, port: int, upstream: str, certs_dir: str | Path, insecure: bool = False) -> None:
    """Serve :func:`front_app` on ``host:port`` until interrupted: over TLS with
    ``server.pem``/``server.key`` of ``certs_dir``, plaintext when ``insecure``."""
    import uvicorn

    from fedkd.ops.deploy import CA_CERT, SERVER_CERT, SERVER_KEY

    certs = Path(certs_dir)
    tls = {} if insecure else {"ssl_certfile": str(certs / SERVER_CERT), "ssl_keyfile": str(certs / SERVER_KEY)}
    app = front_app(upstream=upstream, ca_file=None if insecure else certs / CA_CERT)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, http="h11", **tls)
