"""`proxykit serve` and `proxykit check`. Exit codes: 0 fine, 2 a bad config or bad arguments."""

from __future__ import annotations

import argparse
import asyncio
import gc
import ipaddress
import logging
import os
import signal
import socket
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

import uvicorn
from starlette.applications import Starlette

from proxykit._utils import printable_url
from proxykit.app import create_app
from proxykit.config import Config, ConfigError
from proxykit.config.reader import config_from_dict, load_config
from proxykit.demo import DemoUpstream, demo_config
from proxykit.logs import configure_logging
from proxykit.metrics import MULTIPROCESS_ENV
from proxykit.serving import (
    DrainingServer,
    DrainingSupervisor,
    ServerLimits,
    drain_on_exit_signals,
    exit_quietly_after_sigterm,
)

logger = logging.getLogger("proxykit")

CONFIG_ENV = "PROXYKIT_CONFIG"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 4000


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check":
        return check(args.file)
    try:
        return serve(args)
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown
        return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="proxykit", description="An ASGI gateway for OpenAI-compatible APIs.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve", help="run the proxy under uvicorn")
    serve_parser.add_argument("--config", help=f"the YAML config (default: ${CONFIG_ENV})")
    serve_parser.add_argument("--demo", action="store_true", help="run in front of a built-in demo upstream")
    serve_parser.add_argument("--host", default=DEFAULT_HOST)
    serve_parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    serve_parser.add_argument("--workers", type=int, default=1)
    serve_parser.add_argument("--log-level", default="info",
                              choices=["critical", "error", "warning", "info", "debug"])
    limits = ServerLimits()
    serve_parser.add_argument("--max-header-bytes", type=int, default=limits.max_header_bytes, metavar="N",
                              help="request line and headers larger than this get 431 (default: %(default)s)")
    serve_parser.add_argument("--max-headers", type=int, default=limits.max_headers, metavar="N",
                              help="requests with more headers get 431 (default: %(default)s)")
    serve_parser.add_argument("--header-timeout", type=float, default=limits.header_timeout, metavar="S",
                              help="seconds for a request's headers to arrive, else 408 (default: %(default)s)")
    serve_parser.add_argument("--body-timeout", type=float, default=limits.body_timeout, metavar="S",
                              help="seconds a request body may pause, else 408 (default: %(default)s)")
    serve_parser.add_argument("--limit-concurrency", type=int, default=None, metavar="N",
                              help="connections and requests at once per worker; more get 503 (default: no limit)")
    serve_parser.add_argument("--timeout-keep-alive", type=float, default=5.0, metavar="S",
                              help="seconds an idle client connection stays open (default: %(default)s)")
    serve_parser.add_argument("--timeout-graceful-shutdown", type=float, default=30.0, metavar="S",
                              help="on SIGTERM, seconds for requests and streams in flight to finish "
                                   "(default: %(default)s)")
    check_parser = commands.add_parser("check", help="validate a config and summarise it")
    check_parser.add_argument("file")
    return parser


def check(path: str) -> int:
    try:
        config = load_config(path)
    except ConfigError as exc:
        _print_problems(path, exc)
        return 2
    print(summary(config))
    return 0


def summary(config: Config) -> str:
    """Models, deployments and key counts; never a key."""
    deployments = [deployment for model in config.models for deployment in model.deployments]
    keys = sum(len(deployment.api_keys) for deployment in deployments)
    lines = [
        f"config OK: {len(config.models)} models, {len(deployments)} deployments, {keys} upstream keys, "
        f"{len(config.auth.keys)} client keys (auth {'on' if config.auth.enabled else 'off'})",
    ]
    for model in config.models:
        fallbacks = f" (fallbacks: {', '.join(model.fallbacks)})" if model.fallbacks else ""
        lines.append(f"  model {model.name}{fallbacks}")
        for deployment in model.deployments:
            count = sum(1 for key in deployment.api_keys if key.secret)
            source = " from a file" if deployment.keys_file else ""
            lines.append(
                f"    deployment {deployment.name}: {printable_url(deployment.base_url)} "
                f"model={deployment.model}, {count} keys{source}"
            )
    return "\n".join(lines)


def serve(args: argparse.Namespace) -> int:
    configure_logging(args.log_level)
    if args.demo:
        asyncio.run(_serve_demo(args))
        return 0
    path = args.config or os.environ.get(CONFIG_ENV)
    if not path:
        print(f"proxykit: give --config FILE or set {CONFIG_ENV} (or try --demo)", file=sys.stderr)
        return 2
    try:
        config = load_config(path)
    except ConfigError as exc:
        _print_problems(path, exc)
        return 2
    warn_if_open(config, args.host)
    if args.workers > 1:
        exit_quietly_after_sigterm()
        _serve_workers(path, args)
        return 0
    app = create_app(config)
    if hasattr(signal, "SIGHUP"):  # re-read `file:` key lists without a restart
        signal.signal(signal.SIGHUP, lambda signum, frame: app.state.resources.request_reload())
    server = DrainingServer(_uvicorn_config(app, args))
    exit_quietly_after_sigterm()
    _tune_garbage_collector()
    server.run()
    return 0


def _tune_garbage_collector() -> None:
    """Every request allocates a few hundred short-lived objects (coroutines, messages, headers),
    none in reference cycles that outlive it. At CPython's default threshold the collector runs
    every few requests and rescans everything loaded at start. Objects from startup are frozen
    out of collection, and young objects are collected every 10,000 allocations instead of 700;
    a larger threshold would hold more memory between collections with hundreds of streams open.
    The benchmark's README has the figures."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)


def _serve_workers(path: str, args: argparse.Namespace) -> None:
    # Each worker process builds its own app from the same file. prometheus-client's multiprocess
    # mode (chosen by this variable at import, in each worker) adds up every worker's metrics.
    os.environ[CONFIG_ENV] = os.path.abspath(path)
    os.environ["PROXYKIT_LOG_LEVEL"] = args.log_level
    with tempfile.TemporaryDirectory(prefix="proxykit-metrics-") as metrics_dir:
        os.environ.setdefault(MULTIPROCESS_ENV, metrics_dir)
        config = uvicorn.Config(
            "proxykit.cli:app_from_environment", factory=True, workers=args.workers, **_server_options(args),
        )
        DrainingSupervisor(config, sockets=[config.bind_socket()]).run()


def app_from_environment() -> Starlette:
    """The app of one `--workers N` process, from the config file named by $PROXYKIT_CONFIG."""
    configure_logging(os.environ.get("PROXYKIT_LOG_LEVEL", "info"))
    app = create_app(os.environ[CONFIG_ENV])
    drain_on_exit_signals(app)  # uvicorn made this worker's server: its signal handlers are wrapped
    _tune_garbage_collector()
    return app


def warn_if_open(config: Config, host: str) -> bool:
    """Warn when a proxy without auth listens beyond this machine; True when it warned."""
    if config.auth.enabled or _is_loopback(host):
        return False
    logger.warning(
        "auth is off and proxykit listens on %s: anyone who reaches this port spends your upstream keys", host
    )
    return True


async def _serve_demo(args: argparse.Namespace) -> None:
    host, port = args.host, args.port
    # The demo upstream listens on a free loopback port, in this same process and event loop.
    upstream_socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    upstream_socket.bind(("127.0.0.1", 0))
    upstream_port = upstream_socket.getsockname()[1]
    config = config_from_dict(demo_config(f"http://127.0.0.1:{upstream_port}/v1"))
    upstream = uvicorn.Server(uvicorn.Config(DemoUpstream(), log_level="warning", access_log=False, lifespan="off"))
    proxy = DrainingServer(_uvicorn_config(create_app(config), args))
    url = f"http://{host}:{port}"
    body = '{"model": "demo-chat", "stream": true, "messages": [{"role": "user", "content": "Hello"}]}'
    print(
        f"proxykit demo: models {', '.join(model.name for model in config.models)} at {url}/v1 (auth off)\n"
        f"try:\n  curl -N {url}/v1/chat/completions -H 'content-type: application/json' -d '{body}'",
        flush=True,
    )
    upstream_task = asyncio.create_task(upstream.serve(sockets=[upstream_socket]))
    try:
        await proxy.serve()
    finally:
        upstream.should_exit = True
        await upstream_task


def _uvicorn_config(app: Starlette, args: argparse.Namespace) -> uvicorn.Config:
    return uvicorn.Config(app, **_server_options(args))


def _server_options(args: argparse.Namespace) -> dict[str, Any]:
    # proxykit writes its own access line (with model, client and key alias), so uvicorn's is off.
    # It reads neither the client address nor the scheme, so uvicorn need not rewrite them from
    # X-Forwarded-* on every request (the headers still go upstream as sent). No `server: uvicorn`
    # on every response either.
    limits = ServerLimits(
        max_header_bytes=args.max_header_bytes, max_headers=args.max_headers,
        header_timeout=args.header_timeout, body_timeout=args.body_timeout,
    )
    return {
        "host": args.host, "port": args.port, "log_level": args.log_level, "access_log": False,
        "proxy_headers": False, "server_header": False, "http": limits.protocol(), "ws": "none",
        "limit_concurrency": args.limit_concurrency, "timeout_keep_alive": args.timeout_keep_alive,
        "timeout_graceful_shutdown": args.timeout_graceful_shutdown,
    }


def _print_problems(path: str, exc: ConfigError) -> None:
    print(f"proxykit: {path} is not a valid config:", file=sys.stderr)
    for problem in exc.problems:
        print(f"  {problem}", file=sys.stderr)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

