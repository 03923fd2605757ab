"""`llmserve router`: run the model router, or drive a running one through its admin API.

    llmserve router --config router.yaml [--port 8080]          # serve
    llmserve router [--config router.yaml] promote --model chat [--deployment v2]
    llmserve router [--config router.yaml] rollback --model chat --reason "..."
    llmserve router [--config router.yaml] weight --model chat --weight 5
    llmserve router [--config router.yaml] reload | status | events

Admin calls find the router and its token in the config file when given, else in ``--url`` /
``$LLMSERVE_ROUTER_URL`` and ``--admin-token`` / ``$LLMSERVE_ROUTER_ADMIN_TOKEN``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("router", help="model router with canary, shadow and rollback",
                              description="Serve the router (with --config) or send it an "
                                          "admin command.")
    p.add_argument("--config", help="router YAML (see examples/router.yaml)")
    p.add_argument("--host", help="listen address (overrides the config)")
    p.add_argument("--port", type=int, help="listen port (overrides the config)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.add_argument("--url", help="admin commands: router base URL")
    p.add_argument("--admin-token", help="admin commands: bearer token")
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    promote = sub.add_parser("promote", help="make the canary (or --deployment) the primary")
    promote.add_argument("--model", required=True)
    promote.add_argument("--deployment", help="deployment to promote (default: the canary)")
    promote.add_argument("--reason", default="")
    rollback = sub.add_parser("rollback", help="send no more traffic to the canary")
    rollback.add_argument("--model", required=True)
    rollback.add_argument("--reason", default="")
    weight = sub.add_parser("weight", help="set the canary's share of users (percent)")
    weight.add_argument("--model", required=True)
    weight.add_argument("--weight", type=float, required=True)
    weight.add_argument("--reason", default="")
    sub.add_parser("reload", help="re-read the router's config file")
    sub.add_parser("status", help="print the routing state")
    events = sub.add_parser("events", help="print recent routing events")
    events.add_argument("--limit", type=int, default=50)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.action is None:
        return _serve(args)
    return _admin(args)


def _serve(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from llmserve.routing.app import create_app
    from llmserve.routing.config import load_config
    from llmserve.routing.router import Router

    if not args.config:
        raise ValueError("--config is required to serve (or give an ACTION for a running router)")
    config = load_config(args.config)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    router = Router(config, config_path=args.config)
    app = create_app(router, handle_sighup=True)
    host = args.host or config.host
    port = config.port if args.port is None else args.port
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=args.log_level,
                                           timeout_graceful_shutdown=10, access_log=False))
    server.run()
    return 0


def _target(args: argparse.Namespace) -> tuple[str, str | None]:
    url, token = args.url, args.admin_token
    if args.config:
        from llmserve.routing.config import load_config

        config = load_config(args.config)
        url = url or f"http://{config.host}:{config.port}"
        token = token or config.admin_token
    url = url or os.environ.get("LLMSERVE_ROUTER_URL", "http://127.0.0.1:8080")
    token = token or os.environ.get("LLMSERVE_ROUTER_ADMIN_TOKEN")
    return url.rstrip("/"), token


def _admin(args: argparse.Namespace) -> int:
    import httpx

    url, token = _target(args)
    calls: dict[str, tuple[str, str, dict[str, Any] | None]] = {
        "promote": ("POST", "/admin/promote", {"model": getattr(args, "model", None),
                                               "deployment": getattr(args, "deployment", None)}),
        "rollback": ("POST", "/admin/rollback", {"model": getattr(args, "model", None)}),
        "weight": ("POST", "/admin/weight", {"model": getattr(args, "model", None),
                                             "weight": getattr(args, "weight", None)}),
        "reload": ("POST", "/admin/reload", {}),
        "status": ("GET", "/admin/status", None),
        "events": ("GET", f"/admin/events?limit={getattr(args, 'limit', 50)}", None),
    }
    method, path, payload = calls[args.action]
    if payload is not None:
        payload.update(actor="cli", reason=getattr(args, "reason", ""))
    headers = {"authorization": f"Bearer {token}"} if token else {}
    try:
        resp = httpx.request(method, url + path, json=payload, headers=headers, timeout=30,
                             trust_env=False)
    except httpx.HTTPError as exc:
        print(f"llmserve router {args.action}: cannot reach {url}: {exc}", file=sys.stderr)
        return 1
    try:
        body = resp.json()
    except ValueError:
        body = {"raw": resp.text}
    if resp.status_code >= 400:
        message = body.get("error", {}).get("message") if isinstance(body, dict) else None
        print(f"llmserve router {args.action}: HTTP {resp.status_code}: {message or body}",
              file=sys.stderr)
        return 1
    print(json.dumps(body, indent=2, sort_keys=True))
    return 0
