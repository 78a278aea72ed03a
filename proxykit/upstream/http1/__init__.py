"""proxykit's HTTP/1.1 client: keep-alive pools over asyncio (`client`), one socket and its parser
(`connection`), one response fed as its bytes arrive (`response`)."""
