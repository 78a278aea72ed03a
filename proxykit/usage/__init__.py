"""Usage accounting: token usage read from response bytes as they pass (`reader`), and the one
place that turns it into counts, estimates and cost (`accounting`). Knows nothing of ASGI."""
