"""Where a request to a deployment goes and what it carries, and how its URL may be printed.

    url = join_url(deployment.base_url, "/chat/completions", query)
    headers += deployment_headers(deployment, secret)
    printable_url("https://u:p@api.example/v1?key=SECRET")   # "https://api.example/v1?key=***"
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from proxykit.config import Deployment

RawHeaders = list[tuple[bytes, bytes]]


def join_url(base_url: str, path: str, query: str = "") -> str:
    """`base_url` + `path`, with the base's own query (a Gemini-style `?key=`) kept after the path
    and the client's query after that."""
    if "?" in base_url:
        base_url, base_query = base_url.split("?", 1)
        query = f"{base_query}&{query}" if query else base_query
    return f"{base_url}{path}?{query}" if query else base_url + path


def deployment_headers(deployment: Deployment, secret: str) -> RawHeaders:
    """What a deployment adds to every request: its key, in the header its API reads (OpenAI's
    `Authorization: Bearer`, Anthropic's `x-api-key`, Azure's `api-key`), and its static headers."""
    headers = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in deployment.headers]
    if secret:
        if deployment.auth_header == "authorization":
            headers.append((b"authorization", b"Bearer " + secret.encode("latin-1")))
        else:
            headers.append((deployment.auth_header.encode("latin-1"), secret.encode("latin-1")))
    return headers


def printable_url(url: str) -> str:
    """`url` as it may be printed: no user or password, and no query value (it may be a key)."""
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    query = "&".join(f"{pair.split('=', 1)[0]}=***" if "=" in pair else pair for pair in parts.query.split("&"))
    return urlunsplit((parts.scheme, netloc, parts.path, query if parts.query else "", ""))
