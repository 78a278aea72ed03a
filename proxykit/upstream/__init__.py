"""Upstream calls: what the forwarder needs of one (`base`), proxykit's own HTTP/1.1 client
(`http1`), httpx transports over it and over aiohttp (`transport`), egress proxies (`proxy`), and
how their failures become proxykit's errors (`failures`). Knows nothing of ASGI."""
