"""Errors proxykit itself answers with, all OpenAI-shaped (CONTRACT section 5). Pure: it imports
nothing of ASGI; `proxykit.respond` sends them, `proxykit.upstream.failures` maps httpx's to them.

ProxyError
 ├── InvalidRequest            400 invalid_request
 ├── InvalidApiKey             401 invalid_api_key
 ├── ModelNotAllowed           403 model_not_allowed
 ├── AdminOnly                 403 admin_only
 ├── ModelNotFound             404 model_not_found
 ├── RouteNotFound             404 not_found
 ├── MethodNotAllowed          405 method_not_allowed
 ├── RequestTooLarge           413 request_too_large
 ├── RateLimitExceeded         429 rate_limit_exceeded
 ├── BudgetExceeded            429 budget_exceeded (type insufficient_quota)
 ├── InternalError             500 internal_error
 ├── UpstreamError             502 upstream_error
 │    └── UpstreamBadResponse  502 upstream_error (an answer that is not HTTP: counts as a 5xx)
 ├── ModelUnavailable          503 model_unavailable
 ├── NoUpstreamAvailable       503 no_upstream_available
 ├── StoreUnreachable          503 store_unavailable (a management read while the store is down)
 └── UpstreamTimeout           504 upstream_timeout
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import ClassVar

from proxykit.outcomes import Outcome


class ProxyError(Exception):
    status: ClassVar[int] = 500
    error_type: ClassVar[str] = "server_error"
    code: ClassVar[str] = "internal_error"
    outcome: ClassVar[Outcome | None] = None  # the upstream attempt outcome it stands for, if any

    def __init__(self, message: str, *, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)  # client-safe: no key, no upstream URL, no body
        self.message = message
        self.headers = dict(headers or {})

    def body(self, request_id: str) -> bytes:
        error = {"message": self.message, "type": self.error_type, "code": self.code, "request_id": request_id}
        return json.dumps({"error": error}).encode()


class InvalidRequest(ProxyError):
    status, error_type, code = 400, "invalid_request_error", "invalid_request"


class InvalidApiKey(ProxyError):
    status, error_type, code = 401, "authentication_error", "invalid_api_key"


class ModelNotAllowed(ProxyError):
    status, error_type, code = 403, "permission_error", "model_not_allowed"


class AdminOnly(ProxyError):
    status, error_type, code = 403, "permission_error", "admin_only"


class ModelNotFound(ProxyError):
    status, error_type, code = 404, "invalid_request_error", "model_not_found"


class RouteNotFound(ProxyError):
    status, error_type, code = 404, "invalid_request_error", "not_found"


class MethodNotAllowed(ProxyError):
    status, error_type, code = 405, "invalid_request_error", "method_not_allowed"


class RequestTooLarge(ProxyError):
    status, error_type, code = 413, "invalid_request_error", "request_too_large"


class RateLimitExceeded(ProxyError):
    status, error_type, code = 429, "rate_limit_error", "rate_limit_exceeded"


class BudgetExceeded(ProxyError):
    status, error_type, code = 429, "insufficient_quota", "budget_exceeded"


class InternalError(ProxyError):
    status, error_type, code = 500, "server_error", "internal_error"


class UpstreamError(ProxyError):
    status, error_type, code, outcome = 502, "upstream_error", "upstream_error", Outcome.CONNECT_ERROR


class UpstreamBadResponse(UpstreamError):
    outcome = Outcome.HTTP_5XX  # the upstream answered, badly: that attempt failed, not its connection


class ModelUnavailable(ProxyError):
    status, error_type, code = 503, "service_unavailable", "model_unavailable"


class NoUpstreamAvailable(ProxyError):
    status, error_type, code = 503, "service_unavailable", "no_upstream_available"


class StoreUnreachable(ProxyError):
    status, error_type, code = 503, "service_unavailable", "store_unavailable"


class UpstreamTimeout(ProxyError):
    status, error_type, code, outcome = 504, "timeout_error", "upstream_timeout", Outcome.TIMEOUT
