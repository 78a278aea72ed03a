"""Request ids: taken or made, returned, on every log record, and reset afterwards."""

from __future__ import annotations

import logging

import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from proxykit import RequestIdFilter, RequestIdMiddleware
from proxykit.logs import request_id_var
from tests.conftest import in_process

pytestmark = pytest.mark.anyio


def app_logging_one_line() -> Starlette:
    async def endpoint(request: Request) -> PlainTextResponse:
        logging.getLogger("proxykit.test").warning("inside the request")
        return PlainTextResponse("ok")

    return Starlette(routes=[Route("/", endpoint)], middleware=[Middleware(RequestIdMiddleware)])


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        pytest.param("abc-123_x.y:z", True, id="plain-token"),
        pytest.param("has space", False, id="space"),
        pytest.param("x" * 129, False, id="too-long"),
        pytest.param("a\u00e9", False, id="not-ascii"),
    ],
)
async def test_incoming_id_is_kept_only_when_it_is_a_plain_token(sent: str, kept: bool) -> None:
    async with in_process(app_logging_one_line()) as client:
        response = await client.get("/", headers=[(b"x-request-id", sent.encode())])
    returned = response.headers["x-request-id"]
    assert (returned == sent) is kept
    if not kept:
        assert len(returned) == 32


async def test_log_records_carry_the_request_id(caplog: pytest.LogCaptureFixture) -> None:
    caplog.handler.addFilter(RequestIdFilter())
    with caplog.at_level(logging.INFO):
        async with in_process(app_logging_one_line()) as client:
            await client.get("/", headers={"x-request-id": "trace-me"})
    inside = [r for r in caplog.records if r.getMessage() == "inside the request"]
    access = [r for r in caplog.records if r.name == "proxykit.access"]
    assert [r.request_id for r in inside] == ["trace-me"]  # type: ignore[attr-defined]
    assert "status=200" in access[0].getMessage()
    assert request_id_var.get() == "-"  # reset after the request
