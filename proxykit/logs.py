"""Log correlation: the request id on every record logged while a request is handled."""

from __future__ import annotations

import logging
from contextvars import ContextVar
from typing import Final

request_id_var: Final[ContextVar[str]] = ContextVar("proxykit_request_id", default="-")


class RequestIdFilter(logging.Filter):
    """Adds `record.request_id`, for formats such as `%(request_id)s %(message)s`.

        handler.addFilter(RequestIdFilter())
    """

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


def configure_logging(level: str) -> None:
    """The CLI's logging: one line a record, with the request id."""
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
    root = logging.getLogger("proxykit")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    # httpx logs every request URL at INFO, and an URL can carry a key in its query string.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
