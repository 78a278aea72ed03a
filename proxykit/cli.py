"""`proxykit serve`, `check` and `import-litellm`. Exit codes: 0 fine, 1 a deployment did not
answer `check --probe`, 2 a bad config or bad arguments, 3 the address to listen on is taken or
not allowed."""

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
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import uvicorn
import yaml
from starlette.applications import Starlette

from proxykit import __version__
from proxykit.app import create_app
from proxykit.config import Config, ConfigError
from proxykit.config.litellm import import_litellm
from proxykit.config.reader import config_from_dict, load_config
from proxykit.demo import DemoUpstream, demo_config
from proxykit.logs import configure_logging, uvicorn_log_config
from proxykit.metrics import MULTIPROCESS_ENV
from proxykit.probe import probe
from proxykit.serving import (
    DrainingServer,
    DrainingSupervisor,
    ServerLimits,
    drain_on_exit_signals,
    exit_quietly_after_sigterm,
)
from proxykit.upstream.target import printable_url

logger = logging.getLogger("proxykit")

CONFIG_ENV = "PROXYKIT_CONFIG"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 4000
EXIT_CANNOT_LISTEN = 3
EXIT_PROBE_FAILED = 1


def _cannot_listen(host: str, port: int) -> str | None:
    """Why `host:port` cannot be listened on, found before anything is printed or started; None
    when it can (the server binds it again right after, as uvicorn does)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return exc.strerror or "no such address"
    family, kind, protocol, _, address = infos[0]
    with socket.socket(family, kind, protocol) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as exc:
            return (exc.strerror or str(exc)).lower()
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check":
        return check(args.file, with_probe=args.probe)
    if args.command == "import-litellm":
        return import_from_litellm(args.file)
    try:
        return serve(args)
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown
        return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="proxykit", description="An ASGI gateway for OpenAI-compatible APIs.")
    parser.add_argument("--version", action="version", version=f"proxykit {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    # Every option with its default, in `proxykit serve --help`.
    serve_parser = commands.add_parser(
        "serve", help="run the proxy under uvicorn", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    serve_parser.add_argument("--config", help=f"the YAML config; without it, ${CONFIG_ENV} names the file")
    serve_parser.add_argument("--demo", action="store_true", help="run in front of a built-in demo upstream")
    serve_parser.add_argument("--host", default=DEFAULT_HOST, help="the address to listen on")
    serve_parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="the port to listen on")
    serve_parser.add_argument("--workers", type=int, default=1, help="processes; each its own event loop")
    serve_parser.add_argument("--log-level", default="info", help="the least severe level logged",
                              choices=["critical", "error", "warning", "info", "debug"])
    serve_parser.add_argument("--log-format", default="text", choices=["text", "json"],
                              help="json: every line of output is one JSON object")
    limits = ServerLimits()
    serve_parser.add_argument("--max-header-bytes", type=int, default=limits.max_header_bytes, metavar="N",
                              help="a request line and headers larger than this get 431")
    serve_parser.add_argument("--max-headers", type=int, default=limits.max_headers, metavar="N",
                              help="requests with more headers get 431")
    serve_parser.add_argument("--header-timeout", type=float, default=limits.header_timeout, metavar="S",
                              help="seconds for a request's headers to arrive, else 408")
    serve_parser.add_argument("--body-timeout", type=float, default=limits.body_timeout, metavar="S",
                              help="seconds a request body may pause, else 408")
    serve_parser.add_argument("--limit-concurrency", type=int, default=None, metavar="N",
                              help="connections and requests at once per worker; more get 503 (None: no limit)")
    serve_parser.add_argument("--timeout-keep-alive", type=float, default=5.0, metavar="S",
                              help="seconds an idle client connection stays open")
    serve_parser.add_argument("--timeout-graceful-shutdown", type=float, default=30.0, metavar="S",
                              help="on SIGTERM, seconds for requests and streams in flight to finish")
    check_parser = commands.add_parser("check", help="validate a config and summarise it")
    check_parser.add_argument("file")
    check_parser.add_argument("--probe", action="store_true",
                              help="also GET {base_url}/models once per deployment (unbilled), and report")
    import_parser = commands.add_parser("import-litellm", help="print a proxykit config for a LiteLLM proxy config")
    import_parser.add_argument("file")
    return parser


def check(path: str, *, with_probe: bool = False) -> int:
    try:
        config = load_config(path)
    except ConfigError as exc:
        _print_problems(path, exc)
        return 2
    print(summary(config))
    if with_probe:
        lines, all_answered = asyncio.run(probe(config))
        print("\n".join(lines))
        return 0 if all_answered else EXIT_PROBE_FAILED
    return 0


def import_from_litellm(path: str) -> int:
    try:
        print(import_litellm(yaml.safe_load(Path(path).read_text(encoding="utf-8"))), end="")
    except OSError as exc:
        print(f"proxykit: {path}: cannot read the file ({exc.strerror})", file=sys.stderr)
        return 2
    except yaml.YAMLError:
        print(f"proxykit: {path}: not valid YAML", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"proxykit: {path}: {exc}", file=sys.stderr)
        return 2
    return 0


def summary(config: Config) -> str:
    """Models, deployments and key counts; never a key."""
    deployments = config.deployments
    keys = sum(deployment.key_count for deployment in deployments)
    lines = [
        f"config OK: {len(config.models)} models, {len(deployments)} deployments, {keys} upstream keys, "
        f"{len(config.auth.keys)} client keys (auth {'on' if config.auth.enabled else 'off'})",
    ]
    for model in config.models:
        fallbacks = f" (fallbacks: {', '.join(model.fallbacks)})" if model.fallbacks else ""
        lines.append(f"  model {model.name}{fallbacks}")
        for deployment in model.deployments:
            count = deployment.key_count
            keys_text = f"{count} keys" + (" from a file" if deployment.keys_file else "") if count else "no key"
            lines.append(
                f"    deployment {deployment.name}: {printable_url(deployment.base_url)} "
                f"model={deployment.model}, {keys_text}"
            )
            if not _has_a_path(deployment.base_url):
                lines.append(
                    f"      warning: the base_url has no version path (such as /v1): requests go to "
                    f"{printable_url(deployment.base_url)}/chat/completions and the like"
                )
    return "\n".join(lines)


def _has_a_path(base_url: str) -> bool:
    """OpenAI-style base URLs end in their API version (…/v1); one with no path at all is
    usually a mistake that answers every request with a plain 404."""
    return bool(urlsplit(base_url).path.rstrip("/"))


def serve(args: argparse.Namespace) -> int:
    configure_logging(args.log_level, args.log_format)
    if (problem := _cannot_listen(args.host, args.port)) is not None:
        print(f"proxykit: cannot listen on {args.host}:{args.port}: {problem}", file=sys.stderr)
        return EXIT_CANNOT_LISTEN
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
    logger.info("%s", banner(config, args.host, args.port, args.workers))
    if args.workers > 1:
        exit_quietly_after_sigterm()
        _serve_workers(path, args)
        return 0
    app = create_app(path)  # from the path: the app watches the file and reloads it when it changes
    reload_on_sighup(app)
    server = DrainingServer(_uvicorn_config(app, args))
    exit_quietly_after_sigterm()
    _tune_garbage_collector()
    server.run()
    return 0


def banner(config: Config, host: str, port: int, workers: int = 1) -> str:
    """One line: what `serve` is about to serve, and where; never a key."""
    deployments = config.deployments
    keys = sum(deployment.key_count for deployment in deployments)
    processes = f", {workers} workers" if workers > 1 else ""
    cache = f"cache {config.cache.backend}" if config.cache.enabled else "cache off"
    store = f"store {printable_url(config.store.url)}" if config.store.enabled else "store off"
    return (
        f"proxykit serving {len(config.models)} models ({len(deployments)} deployments, {keys} upstream keys) "
        f"at http://{host}:{port}/v1, auth {'on' if config.auth.enabled else 'off'}, limits {config.limits.backend}, "
        f"{cache}, {store}, management API at {config.management.path}{processes}"
    )


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
    os.environ["PROXYKIT_LOG_FORMAT"] = args.log_format
    with tempfile.TemporaryDirectory(prefix="proxykit-metrics-") as metrics_dir:
        os.environ.setdefault(MULTIPROCESS_ENV, metrics_dir)
        config = uvicorn.Config(
            "proxykit.cli:app_from_environment", factory=True, workers=args.workers, **_server_options(args),
        )
        DrainingSupervisor(config, sockets=[config.bind_socket()]).run()


def app_from_environment() -> Starlette:
    """The app of one `--workers N` process, from the config file named by $PROXYKIT_CONFIG."""
    configure_logging(os.environ.get("PROXYKIT_LOG_LEVEL", "info"), os.environ.get("PROXYKIT_LOG_FORMAT", "text"))
    app = create_app(os.environ[CONFIG_ENV])
    reload_on_sighup(app)  # the supervisor passes its SIGHUP on to every worker
    drain_on_exit_signals(app)  # uvicorn made this worker's server: its signal handlers are wrapped
    _tune_garbage_collector()
    return app


def reload_on_sighup(app: Starlette) -> None:
    """SIGHUP re-reads the config file and every `file:` key list, changed or not."""
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, lambda signum, frame: app.state.proxykit.request_reload())


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
    # The demo keeps its usage store in memory: it leaves no file behind.
    config = config_from_dict({**demo_config(f"http://127.0.0.1:{upstream_port}/v1"), "store": {"url": "sqlite://"}})
    upstream = uvicorn.Server(uvicorn.Config(DemoUpstream(), log_level="warning", access_log=False, lifespan="off"))
    proxy = DrainingServer(_uvicorn_config(create_app(config), args))
    url = f"http://{host}:{port}"
    body = '{"model": "demo-chat", "stream": true, "messages": [{"role": "user", "content": "Hello"}]}'
    text = (
        f"proxykit demo: models {', '.join(model.name for model in config.models)} at {url}/v1 (auth off)\n"
        f"try:\n  curl -N {url}/v1/chat/completions -H 'content-type: application/json' -d '{body}'\n"
        f"  curl {url}{config.management.path}/stats/usage      (what it served; the management API)"
    )
    if args.log_format == "json":
        logger.info("%s", text)  # every line of output is one JSON object
    else:
        print(text, flush=True)
    # uvicorn's servers share one logger: the demo upstream starts and stops quietly, so the
    # proxy's lines are the only ones.
    quiet = _Quiet()
    logging.getLogger("uvicorn.error").addFilter(quiet)
    with quiet:
        upstream_task = asyncio.create_task(upstream.serve(sockets=[upstream_socket]))
        while not upstream.started and not upstream_task.done():
            await asyncio.sleep(0.01)
    try:
        await proxy.serve()
    finally:
        with quiet:
            upstream.should_exit = True
            await upstream_task


class _Quiet(logging.Filter):
    """Drops INFO records while entered."""

    def __init__(self) -> None:
        super().__init__()
        self.active = False

    def __enter__(self) -> None:
        self.active = True

    def __exit__(self, *exc: object) -> None:
        self.active = False

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.active or record.levelno > logging.INFO


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
    options: dict[str, Any] = {}
    if (log_config := uvicorn_log_config(args.log_level, args.log_format)) is not None:
        options["log_config"] = log_config
    return {
        **options,
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

