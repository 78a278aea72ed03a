"""Stores to test against: a SQLite file, and a database on a real throwaway PostgreSQL."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from proxykit.store.base import UsageRow
from proxykit.store.sql import SqlStore
from tests.postgres import PostgresServer, postgres_server

_databases = itertools.count()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    with postgres_server() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'usage.db'}"
    server: PostgresServer = request.getfixturevalue("postgres")
    return server.create_database(f"store_{next(_databases)}")


@pytest.fixture
def store(store_url: str) -> Iterator[SqlStore]:
    store = SqlStore(store_url)
    yield store
    store.close()


def row(**fields: Any) -> UsageRow:
    """A plausible row; `fields` override any of it."""
    values: dict[str, Any] = {
        "time": time.time(), "request_id": "req-1", "client": "team-a", "model": "chat", "served_model": "chat",
        "deployment": "chat", "key": "chat#0", "path": "/v1/chat/completions", "status": 200, "stream": False,
        "prompt_tokens": 10, "completion_tokens": 5, "reasoning_tokens": 0, "cached_tokens": 0, "cost_usd": 0.5,
        "duration_ms": 20.0, "ttfb_ms": 5.0, "attempts": 1, "cache": None, "totals_model": "chat",
    }
    values.update(fields)
    return UsageRow(**values)
