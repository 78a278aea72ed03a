"""Egress proxies: which proxy an upstream call goes through, and the CONNECT tunnel for HTTPS.

    rules = ProxyRules.from_environment(os.environ, {"https://api.example/v1": "http://proxy:3128"})
    proxy = rules.proxy_for("https", "api.example", "https://api.example/v1/chat/completions")

The environment is read as curl reads it: `https_proxy` for HTTPS, `http_proxy` for HTTP,
`all_proxy` for both, `no_proxy` for hosts that go direct, each in either case (lowercase
first). A deployment's own `proxy` wins over the environment; `none` sends it direct. Only
`http://` proxies are spoken; credentials in a proxy URL become `Proxy-Authorization` and are
never printed.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import unquote, urlsplit

import httpx

DIRECT: Final = "none"  # a deployment's `proxy: none`: no proxy, whatever the environment says
_MAX_CONNECT_ANSWER: Final = 16 * 1024


@dataclass(frozen=True, slots=True)
class Proxy:
    host: str
    port: int
    authorization: bytes | None = field(default=None, repr=False)  # `Proxy-Authorization` value


def parse_proxy(url: str) -> Proxy:
    """An `http://[user:pass@]host[:port]` proxy; a URL without a scheme is http, as curl has it.
    Raises ValueError (whose message never holds the URL) for anything else."""
    if "://" not in url:
        url = f"http://{url}"
    parts = urlsplit(url)
    if parts.scheme.lower() != "http":
        raise ValueError(f"only http:// proxies are supported, not {parts.scheme}://")
    try:
        port = parts.port or 80
    except ValueError:
        raise ValueError("the proxy URL has an invalid port") from None
    if not parts.hostname:
        raise ValueError("the proxy URL has no host")
    authorization = None
    if parts.username is not None:
        credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
        authorization = b"Basic " + base64.b64encode(credentials)
    return Proxy(parts.hostname, port, authorization)


class ProxyRules:
    """Decides, per upstream URL, whether it goes through a proxy and which."""

    def __init__(
        self, *, http: str | None = None, https: str | None = None, no_proxy: str = "",
        by_base_url: Mapping[str, str] | None = None,
    ) -> None:
        self._http = http
        self._https = https
        self._no_proxy = _NoProxy(no_proxy)
        # Longest base URL first: a deployment's own rule is found before a shorter one's.
        self._by_base_url = sorted((by_base_url or {}).items(), key=lambda item: -len(item[0]))
        self._cache: dict[tuple[str, str, str], Proxy | None] = {}

    @classmethod
    def from_environment(cls, environ: Mapping[str, str], by_base_url: Mapping[str, str] | None = None) -> ProxyRules:
        def read(name: str) -> str | None:
            return environ.get(name.lower()) or environ.get(name.upper()) or None

        every = read("all_proxy")
        return cls(
            http=read("http_proxy") or every, https=read("https_proxy") or every,
            no_proxy=read("no_proxy") or "", by_base_url=by_base_url,
        )

    @property
    def active(self) -> bool:
        return bool(self._http or self._https or self._by_base_url)

    def proxy_for(self, scheme: str, host: str, url: str) -> Proxy | None:
        """The proxy for `url` (whose scheme and host are given parsed), or None to go direct.
        Raises httpx.ConnectError for a proxy URL that cannot be used."""
        base = next((base for base, _ in self._by_base_url if url.startswith(base)), "")
        key = (scheme, host, base)
        if key not in self._cache:
            if len(self._cache) > 1024:  # hosts come from the config: this never fills in practice
                self._cache.clear()
            self._cache[key] = self._decide(scheme, host, base)
        return self._cache[key]

    def _decide(self, scheme: str, host: str, base: str) -> Proxy | None:
        if base:
            chosen: str | None = dict(self._by_base_url)[base]
            if chosen == DIRECT:
                return None
        else:
            chosen = self._https if scheme == "https" else self._http
            if chosen is None or self._no_proxy.matches(host):
                return None
        assert chosen is not None
        try:
            return parse_proxy(chosen)
        except ValueError as exc:
            raise httpx.ConnectError(f"the egress proxy cannot be used: {exc}") from None


class _NoProxy:
    """curl's `no_proxy`: `*`, host names (a name also covers its subdomains, with or without a
    leading dot), IP addresses and CIDR ranges, comma-separated; ports are ignored."""

    def __init__(self, value: str) -> None:
        self.everything = False
        self.names: list[str] = []
        self.networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for raw in value.split(","):
            entry = raw.strip().lower()
            if not entry:
                continue
            if entry == "*":
                self.everything = True
                continue
            entry = _without_port(entry)
            try:
                self.networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
            except ValueError:
                self.names.append(entry.lstrip(".").rstrip("."))

    def matches(self, host: str) -> bool:
        if self.everything:
            return True
        host = host.lower().strip("[]").rstrip(".")
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return any(host == name or host.endswith("." + name) for name in self.names)
        return any(address in network for network in self.networks)


def _without_port(entry: str) -> str:
    if entry.startswith("["):  # [v6]:port
        return entry.split("]")[0] + "]"
    if entry.count(":") == 1:  # name:port or v4:port; a bare v6 address has several colons
        return entry.split(":")[0]
    return entry


class _TunnelHandshake(asyncio.Protocol):
    """Reads the proxy's answer to CONNECT, bounded; the bytes after it belong to TLS."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.answer = loop.create_future()
        self._received = b""

    def data_received(self, data: bytes) -> None:
        self._received += data
        if b"\r\n\r\n" in self._received:
            head = self._received.split(b"\r\n\r\n", 1)[0]
            if not self.answer.done():
                self.answer.set_result(head)
        elif len(self._received) > _MAX_CONNECT_ANSWER and not self.answer.done():
            self.answer.set_exception(httpx.ProxyError("the egress proxy's answer to CONNECT is too long"))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.answer.done():
            self.answer.set_exception(httpx.ProxyError("the egress proxy closed the connection during CONNECT"))


async def open_tunnel(
    loop: asyncio.AbstractEventLoop, proxy: Proxy, host: str, port: int,
) -> asyncio.Transport:
    """A TCP connection to `proxy`, turned by CONNECT into a tunnel to host:port; TLS goes on top."""
    handshake = _TunnelHandshake(loop)
    transport, _ = await loop.create_connection(lambda: handshake, proxy.host, proxy.port)
    authority = f"[{host}]" if ":" in host else host
    lines = [f"CONNECT {authority}:{port} HTTP/1.1".encode("idna"), f"host: {authority}:{port}".encode("idna")]
    if proxy.authorization is not None:
        lines.append(b"proxy-authorization: " + proxy.authorization)
    transport.write(b"\r\n".join(lines) + b"\r\n\r\n")
    try:
        head = await handshake.answer
        status_line = head.split(b"\r\n", 1)[0].split()
        if len(status_line) < 2 or not status_line[1].startswith(b"2"):
            code = status_line[1].decode("latin-1") if len(status_line) > 1 else "no status"
            raise httpx.ProxyError(f"the egress proxy refused the tunnel ({code[:3]})")
    except BaseException:
        transport.close()
        raise
    return transport
