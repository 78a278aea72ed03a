"""The store's SQL on SQLite and on a real PostgreSQL: rows, hourly totals, pruning, migrations."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from proxykit.store.base import HOUR
from proxykit.store.sql import PIECE, SCHEMA_VERSION, SqlStore, StoreUnavailable
from tests.store.conftest import row


def test_rows_come_back_newest_first_with_every_field(store: SqlStore) -> None:
    now = time.time()
    first = row(request_id="a", time=now - 10, stream=True, ttfb_ms=None, cache="miss")
    second = row(request_id="b", time=now - 5, status=429, client="team-b", key=None)
    store.write([first, second])
    assert store.rows(limit=10) == [second, first]
    assert store.rows(limit=10, request_id="a") == [first]
    assert store.rows(limit=10, client="team-b") == [second]
    assert store.rows(limit=10, status=429) == [second]
    assert store.rows(limit=10, since=now - 7) == [second]
    assert store.rows(limit=1) == [second]
    assert first.as_json()["stream"] is True and "totals_model" not in first.as_json()


def test_a_large_batch_comes_back_whole_and_exact(store: SqlStore) -> None:
    # More rows than one statement takes (SQLite) and text that COPY's format must escape (PostgreSQL).
    now = time.time()
    awkward = ["tab\there", "new\nline", "back\\slash", "quote'\"", "\\N", "模型", ""]
    batch = [
        row(request_id=f"r{i}", time=now - 2000 + i, model=awkward[i % len(awkward)], stream=i % 2 == 0,
            key=None if i % 3 else f"chat#{i}", ttfb_ms=None if i % 5 else i / 7, cost_usd=i / 3,
            prompt_tokens=i * 10**9)
        for i in range(1001)
    ]
    store.write(batch)
    assert store.rows(limit=2000) == batch[::-1]


def test_a_batch_goes_in_pieces_with_a_pause_between_and_stays_one_transaction(store: SqlStore) -> None:
    hour = (time.time() // HOUR - 1) * HOUR
    batch = [row(request_id=f"r{i}", time=hour + i, cost_usd=0.25) for i in range(4 * PIECE + 3)]
    store.check()  # connected: SQLite's count of the rows its connection changed starts here
    changed_before = 0 if store.postgres else store._connection.total_changes
    pauses: list[int] = []

    def pause() -> None:  # COPY has no count of its rows so far: there, the pauses are counted
        pauses.append(len(pauses) + 1 if store.postgres else store._connection.total_changes - changed_before)

    store.write(batch, pause=pause)
    expected = [1, 2, 3, 4] if store.postgres else [PIECE, 2 * PIECE, 3 * PIECE, 4 * PIECE]
    assert pauses == expected
    assert store.rows(limit=1000) == batch[::-1]
    assert store.usage_totals(hour, hour + HOUR) == [("chat", "team-a", len(batch), 15 * len(batch), 0.25 * len(batch))]

    def fail_at_the_third() -> None:
        pauses.append(0)
        if len(pauses) == len(expected) + 3:
            raise RuntimeError("the writer stopped")

    with pytest.raises(StoreUnavailable):
        store.write([row(request_id=f"late{i}", time=hour + i) for i in range(4 * PIECE)], pause=fail_at_the_third)
    assert len(store.rows(limit=1000)) == len(batch)  # no piece of the failed batch stayed
    assert store.usage_totals(hour, hour + HOUR)[0][2] == len(batch)


def test_hourly_totals_add_up_per_model_client_and_status(store: SqlStore) -> None:
    hour = (time.time() // HOUR - 2) * HOUR
    store.write([row(time=hour + 1), row(time=hour + 2, cost_usd=0.25), row(time=hour + 3, client="team-b")])
    store.write([row(time=hour + HOUR + 1, totals_model="other", model="other")])
    totals = {(model, client): (requests, tokens, cost)
              for model, client, requests, tokens, cost in store.usage_totals(hour, hour + 2 * HOUR)}
    assert totals == {("chat", "team-a"): (2, 30, 0.75), ("chat", "team-b"): (1, 15, 0.5),
                      ("other", "team-a"): (1, 15, 0.5)}
    assert store.usage_totals(hour, hour + HOUR, client="team-b") == [("chat", "team-b", 1, 15, 0.5)]
    assert store.usage_totals(hour + HOUR, hour + 2 * HOUR, model="chat") == []
    assert store.spend_since({"team-a": hour + HOUR, "team-b": hour}) == {"team-a": 0.5, "team-b": 0.5}


def test_pruning_removes_old_rows_and_keeps_the_totals(store: SqlStore) -> None:
    old = time.time() - 40 * 86400
    store.write([row(time=old, request_id="old"), row(request_id="new")])
    assert store.prune(time.time() - 30 * 86400) == 1
    assert [kept.request_id for kept in store.rows(limit=10)] == ["new"]
    assert sum(requests for _, _, requests, _, _ in store.usage_totals(0, time.time() + HOUR)) == 2


def test_a_model_window_counts_failures_and_the_mean(store: SqlStore) -> None:
    now = time.time()
    store.write([row(duration_ms=10), row(duration_ms=30, status=502), row(status=429), row(time=now - 900)])
    count, mean, failures, last = store.model_window("chat", now - 300)
    assert (count, failures) == (3, 2)
    assert mean == pytest.approx(20.0)
    assert last == pytest.approx(now, abs=5)


def test_the_schema_is_created_once_and_versioned(store_url: str) -> None:
    for _ in range(2):  # opening a migrated store changes nothing
        store = SqlStore(store_url)
        store.write([row()])
        store.close()
    store = SqlStore(store_url)
    assert len(store.rows(limit=10)) == 2
    store.close()


def test_a_schema_newer_than_this_proxykit_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "usage.db"
    SqlStore(f"sqlite:///{path}").check()
    with sqlite3.connect(path) as connection:
        connection.execute("UPDATE proxykit_schema SET version = ?", (SCHEMA_VERSION + 1,))
    with pytest.raises(StoreUnavailable, match="newer than this proxykit"):
        SqlStore(f"sqlite:///{path}").check()


def test_an_unreachable_postgresql_names_no_password() -> None:
    store = SqlStore("postgresql://user:hunter2-secret@127.0.0.1:1/db")
    with pytest.raises(StoreUnavailable) as caught:
        store.write([row()])
    assert "hunter2" not in str(caught.value) and "127.0.0.1:1/db" in str(caught.value)
