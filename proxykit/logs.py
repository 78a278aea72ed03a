"""Log correlation: the request id on every record logged while a request is handled."""

from __future__ import annotations

import datetime
import json
import logging
from contextvars import ContextVar
from typing import Any, Final

request_id_var: Final[ContextVar[str]] = ContextVar("proxykit_request_id", default="-")


class RequestIdFilter(logging.Filter):
    """Adds `record.request_id`, for formats such as `%(request_id)s %(message)s`.

        handler.addFilter(RequestIdFilter())
    """

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a record: time, level, logger, message, request id, and the fields a
    record carries in `extra={"fields": {...}}` (the access line's model, status, ...)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None) or request_id_var.get()
        if request_id != "-":
            entry["request_id"] = request_id
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


def handler_for(log_format: str) -> logging.Handler:
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    return handler


def configure_logging(level: str, log_format: str = "text") -> None:
    """The CLI's logging: one line a record, with the request id; `json`: one JSON object a line."""
    root = logging.getLogger("proxykit")
    root.handlers[:] = [handler_for(log_format)]
    root.setLevel(level.upper())
    root.propagate = False
    # httpx logs every request URL at INFO, and an URL can carry a key in its query string.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def uvicorn_log_config(level: str, log_format: str) -> dict[str, Any] | None:
    """uvicorn's own logging in the same format; None keeps uvicorn's default for text."""
    if log_format != "json":
        return None
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "proxykit.logs.JsonFormatter"}},
        "handlers": {"default": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}},
        "loggers": {
            name: {"handlers": ["default"], "level": level.upper(), "propagate": False}
            for name in ("uvicorn", "uvicorn.error", "uvicorn.access")
        },
    }
