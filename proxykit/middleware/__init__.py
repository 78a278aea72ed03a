"""Pure ASGI middlewares, one class a module."""
