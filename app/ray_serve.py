"""Scale-out on Ray Serve: N replicas of the model, each with its own batching engine, behind one
OpenAI-compatible HTTP endpoint.

    pip install -r requirements-ray.txt
    python -m app.ray_serve --replicas 2 --port 8000 -- --model smollm2 --batch 8

Each replica is a Ray actor that builds the app exactly as ``python -m app`` does from the flags after
``--`` (model, experts, ``--batch``, prompt style...) and answers the OpenAI routes of
app/openai_api.py with it: the same parsing, experts, prompt assembly, limits and errors as the single
server. Ray Serve's HTTP proxy spreads requests over the replicas (at most ``--max-ongoing`` in flight
on each; more wait at the proxy), restarts a replica that dies, and answers a request whose replica
died mid-way with an error status: a request is never dropped silently. Each answer carries the header
``x-replica`` naming the replica that wrote it. There is no page here: the browser app stays
``python -m app``.

On a cluster of machines (a GPU per replica)::

    ray start --head --port 6379                     # on the first machine
    ray start --address HEAD_IP:6379                 # on each other machine
    python -m app.ray_serve --address auto --replicas 4 --gpus-per-replica 1 --host 0.0.0.0 \\
        --api-key "$KEY" -- --model official --dtype bfloat16 --batch 8

``--address auto`` joins the running cluster instead of starting a local Ray; every machine needs this
repository, its virtual environment and the weights at the same paths.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from typing import Any

log = logging.getLogger("app.ray_serve")

APP_NAME = "chat"


def replica_class() -> Any:
    """The Serve deployment (defined on demand: ray is an optional extra, imported only here)."""
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Match

    @serve.deployment
    class ChatReplica:
        def __init__(self, app_argv: list[str], api: dict[str, Any]) -> None:
            from app.__main__ import build_app, build_parser
            from app.openai_api import ApiSettings, api_routes

            logging.basicConfig(level=logging.INFO, format="%(message)s")
            args = build_parser().parse_args(app_argv)
            chat = build_app(args)
            if chat.engine is None:
                raise RuntimeError(f"the replica has no model: {chat.load_error}")
            self.routes = api_routes(chat, ApiSettings(**api))
            self.name = serve.get_replica_context().replica_tag

        async def __call__(self, request: Request) -> Response:
            partial = False
            for route in self.routes:
                match, child = route.matches(request.scope)
                if match == Match.FULL:
                    request.scope.update(child)
                    response = await route.endpoint(request)
                    response.headers["x-replica"] = self.name
                    return response
                partial = partial or match == Match.PARTIAL
            if partial:
                return JSONResponse({"error": {"message": f"{request.method} is not allowed here", "type":
                                               "invalid_request_error", "code": "method_not_allowed"}}, 405)
            return JSONResponse({"error": {"message": f"no such route: {request.url.path} (this server has "
                                           "/v1/models and /v1/chat/completions)", "type": "invalid_request_error",
                                           "code": "not_found"}}, 404)

    return ChatReplica


def deploy(app_argv: list[str], replicas: int = 2, host: str = "127.0.0.1", port: int = 8000,
           address: str | None = None, cpus_per_replica: float = 1.0, gpus_per_replica: float = 0.0,
           max_ongoing: int = 16, api_key: str | None = None, max_upload_mb: int = 25) -> str:
    """Start Ray (or join ``address``), then Serve's proxy on host:port and the replicas; returns the URL.
    Blocks until every replica has loaded its model."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        # a local Ray stays on loopback and offers at least the CPUs the replicas ask for
        local = {} if address is not None else {
            "_node_ip_address": "127.0.0.1", "num_cpus": max(os.cpu_count() or 1, int(replicas * cpus_per_replica))}
        ray.init(address=address, include_dashboard=False, log_to_driver=False, **local)
    serve.start(http_options={"host": host, "port": port})
    api = {"api_key": api_key, "host": host, "max_upload_bytes": max_upload_mb * 2**20}
    deployment = replica_class().options(num_replicas=replicas, max_ongoing_requests=max_ongoing,
                                         ray_actor_options={"num_cpus": cpus_per_replica,
                                                            "num_gpus": gpus_per_replica})
    serve.run(deployment.bind(app_argv, api), name=APP_NAME, route_prefix="/")
    return f"http://{host}:{port}"


def replica_actor_names() -> list[str]:
    """Named Ray actors of this app's replicas (for operators and the kill test)."""
    from ray.util import list_named_actors

    return [a["name"] for a in list_named_actors(all_namespaces=True)
            if a["name"].startswith("SERVE_REPLICA::") and f"{APP_NAME}#" in a["name"]]


def shutdown() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m app.ray_serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 serves your network (then set --api-key)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--address", default=None, help="a Ray cluster to join (auto: the one `ray start` made)")
    p.add_argument("--cpus-per-replica", type=float, default=1.0)
    p.add_argument("--gpus-per-replica", type=float, default=0.0)
    p.add_argument("--max-ongoing", type=int, default=16, help="requests in flight per replica; more wait")
    p.add_argument("--api-key", default=os.environ.get("MM_API_KEY"))
    p.add_argument("app_args", nargs="*", help="after --: the flags of `python -m app` for every replica")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    public = a.host not in ("127.0.0.1", "localhost", "::1")
    if public and not a.api_key:
        log.warning("serving %s without --api-key: every API request will be refused (401)", a.host)
    url = deploy(a.app_args, a.replicas, a.host, a.port, a.address, a.cpus_per_replica, a.gpus_per_replica,
                 a.max_ongoing, a.api_key)
    log.info("%d replicas answer at %s/v1/chat/completions; Ctrl+C stops them", a.replicas, url)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
