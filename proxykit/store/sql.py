"""The store's SQL, for SQLite (the standard library's `sqlite3`) and PostgreSQL (`psycopg`).

Both drivers are used the same way, from the one thread the ledger gives the store
(`proxykit.store.ledger`): a batch of rows is one transaction, and a read never runs on the event
loop. One connection, made on first use and again after the database went away.

    store = SqlStore("sqlite:///proxykit.db", retention_days=30)
    store.write(rows); store.usage_totals(start, end)
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final

from proxykit.store.base import HOUR, UsageRow
from proxykit.upstream.target import printable_url

logger = logging.getLogger(__name__)

SCHEMA_VERSION: Final = 3
# The schema, step by step: a database at version N runs the steps after N, in one transaction.
_MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = ((
    """CREATE TABLE proxykit_requests (
        time DOUBLE PRECISION NOT NULL, request_id TEXT NOT NULL, client TEXT NOT NULL, model TEXT NOT NULL,
        served_model TEXT, deployment TEXT, key_alias TEXT, path TEXT NOT NULL, status INTEGER NOT NULL,
        stream BOOLEAN NOT NULL, prompt_tokens BIGINT NOT NULL, completion_tokens BIGINT NOT NULL,
        reasoning_tokens BIGINT NOT NULL, cached_tokens BIGINT NOT NULL, cost_usd DOUBLE PRECISION NOT NULL,
        duration_ms DOUBLE PRECISION NOT NULL, ttfb_ms DOUBLE PRECISION, attempts INTEGER NOT NULL, cache TEXT,
        totals_model TEXT NOT NULL)""",
    "CREATE INDEX proxykit_requests_time ON proxykit_requests (time)",
    """CREATE TABLE proxykit_hourly (
        hour BIGINT NOT NULL, model TEXT NOT NULL, client TEXT NOT NULL, status INTEGER NOT NULL,
        requests BIGINT NOT NULL, prompt_tokens BIGINT NOT NULL, completion_tokens BIGINT NOT NULL,
        cost_usd DOUBLE PRECISION NOT NULL, PRIMARY KEY (hour, model, client, status))""",
    # Budgets read each client's spend since its period began, every second: this index answers alone.
    "CREATE INDEX proxykit_hourly_spend ON proxykit_hourly (client, hour, cost_usd)",
), (
    # Version 2: the management API's config overrides, shared by every replica.
    """CREATE TABLE proxykit_overrides (
        kind TEXT NOT NULL, name TEXT NOT NULL, body TEXT NOT NULL, updated DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (kind, name))""",
), (
    # Version 3: no index on request ids. Random keys made every batch rewrite pages all over the
    # index, most of the writer's work; a lookup by id scans newest first instead (README).
    "DROP INDEX IF EXISTS proxykit_requests_id",
))
_COLUMNS: Final = (
    "time, request_id, client, model, served_model, deployment, key_alias, path, status, stream, prompt_tokens, "
    "completion_tokens, reasoning_tokens, cached_tokens, cost_usd, duration_ms, ttfb_ms, attempts, cache, totals_model"
)
_UPSERT_TOTALS: Final = (
    "INSERT INTO proxykit_hourly (hour, model, client, status, requests, prompt_tokens, completion_tokens, cost_usd) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (hour, model, client, status) DO UPDATE SET "
    "requests = proxykit_hourly.requests + excluded.requests, "
    "prompt_tokens = proxykit_hourly.prompt_tokens + excluded.prompt_tokens, "
    "completion_tokens = proxykit_hourly.completion_tokens + excluded.completion_tokens, "
    "cost_usd = proxykit_hourly.cost_usd + excluded.cost_usd"
)
# Rows the writer inserts between two pauses: about a tenth of a millisecond of its work. For
# SQLite a piece is one statement of 800 values, under the least limit any SQLite build has had (999).
PIECE: Final = 40
# Any PostgreSQL advisory lock number: replicas starting together migrate one after the other.
_MIGRATION_LOCK: Final = 0x70726F78


class StoreUnavailable(Exception):
    """The database cannot be reached or refused the work. The message names no password."""


class SqlStore:
    """The store over one database connection. Not thread-safe: one thread uses it."""

    def __init__(self, url: str, *, retention_days: int = 30) -> None:
        self.url = url
        self.retention_days = retention_days
        self.postgres = url.startswith(("postgresql://", "postgres://"))
        self.printable = printable_url(url)
        self._connection: Any = None

    # Writing

    def write(self, rows: Sequence[UsageRow], *, pause: Callable[[], None] | None = None) -> None:
        """Rows and their hourly totals, in one transaction: `PIECE` rows at a time, with `pause`
        between pieces (the ledger's lets the event loop run)."""
        totals: dict[tuple[int, str, str, int], list[float]] = {}
        with self._transaction() as cursor:
            with self._inserting(cursor) as insert:
                for start in range(0, len(rows), PIECE):
                    if start and pause is not None:
                        pause()
                    piece = rows[start:start + PIECE]
                    insert(piece)
                    _add_totals(totals, piece)
            cursor.executemany(self._sql(_UPSERT_TOTALS), [
                (*key, int(requests), int(prompt), int(completion), cost)
                for key, (requests, prompt, completion, cost) in sorted(totals.items())  # one lock order
            ])

    @contextlib.contextmanager
    def _inserting(self, cursor: Any) -> Iterator[Callable[[Sequence[UsageRow]], None]]:
        """A function that inserts a piece of rows: into one COPY (PostgreSQL), or as one
        statement (SQLite). A statement a row would cost the writer a handover of the interpreter
        lock each (SQLite) or a round trip each (PostgreSQL)."""
        if self.postgres:
            with cursor.copy(f"COPY proxykit_requests ({_COLUMNS}) FROM STDIN") as copy:

                def copy_rows(piece: Sequence[UsageRow]) -> None:
                    for row in piece:
                        copy.write_row(row)

                yield copy_rows
            return
        one = "(" + ", ".join("?" * len(UsageRow._fields)) + ")"

        def insert(piece: Sequence[UsageRow]) -> None:
            cursor.execute(f"INSERT INTO proxykit_requests ({_COLUMNS}) VALUES " + ", ".join([one] * len(piece)),
                           list(itertools.chain.from_iterable(piece)))

        yield insert

    def prune(self, before: float) -> int:
        """Per-request rows older than `before` go; hourly totals stay."""
        with self._transaction() as cursor:
            cursor.execute(self._sql("DELETE FROM proxykit_requests WHERE time < ?"), (before,))
            return int(cursor.rowcount or 0)

    # Reading

    def spend_since(self, starts: dict[str, float]) -> dict[str, float]:
        """Each client's cost in the hourly totals from its period's start."""
        spent: dict[str, float] = {}
        with self._transaction() as cursor:
            for client, start in starts.items():
                cursor.execute(self._sql(
                    "SELECT COALESCE(SUM(cost_usd), 0) FROM proxykit_hourly WHERE client = ? AND hour >= ?"
                ), (client, int(start)))
                spent[client] = float(cursor.fetchone()[0])
        return spent

    def usage_totals(
        self, start: float, end: float, *, model: str | None = None, client: str | None = None,
    ) -> list[tuple[str, str, int, int, float]]:
        """(model, client, requests, tokens, cost) from the hourly totals of [start, end)."""
        where, params = _filters(("hour >= ?", int(start)), ("hour < ?", int(end)),
                                 ("model = ?", model), ("client = ?", client))
        return [(str(m), str(c), int(r), int(t or 0), float(cost or 0)) for m, c, r, t, cost in self._fetch(
            "SELECT model, client, SUM(requests), SUM(prompt_tokens + completion_tokens), SUM(cost_usd) "
            f"FROM proxykit_hourly WHERE {where} GROUP BY model, client", params,
        )]

    def performance_sample(
        self, since: float, *, model: str | None, client: str | None, limit: int,
    ) -> list[tuple[str, float, float | None, int, int]]:
        """(model, duration_ms, ttfb_ms, status, tokens) of the newest `limit` rows since `since`."""
        where, params = _filters(("time >= ?", since), ("totals_model = ?", model), ("client = ?", client))
        return [(str(m), float(d), None if t is None else float(t), int(s), int(k)) for m, d, t, s, k in self._fetch(
            "SELECT totals_model, duration_ms, ttfb_ms, status, prompt_tokens + completion_tokens "
            f"FROM proxykit_requests WHERE {where} ORDER BY time DESC LIMIT ?", (*params, limit),
        )]

    def model_window(self, model: str, since: float) -> tuple[int, float, int, float]:
        """(requests, mean duration_ms, failures (5xx and 429), newest time) of a model since `since`."""
        count, average, errors, last = self._fetch(
            "SELECT COUNT(*), AVG(duration_ms), SUM(CASE WHEN status >= 500 OR status = 429 THEN 1 ELSE 0 END), "
            "MAX(time) FROM proxykit_requests WHERE totals_model = ? AND time >= ?", (model, since),
        )[0]
        return int(count), float(average or 0), int(errors or 0), float(last or 0)

    def rows(
        self, *, limit: int, client: str | None = None, model: str | None = None, status: int | None = None,
        since: float | None = None, request_id: str | None = None,
    ) -> list[UsageRow]:
        """The newest rows that match, newest first."""
        where, params = _filters(("request_id = ?", request_id), ("client = ?", client), ("model = ?", model),
                                 ("status = ?", status), ("time >= ?", since))
        return [UsageRow(*values) for values in self._fetch(
            f"SELECT {_COLUMNS} FROM proxykit_requests WHERE {where} ORDER BY time DESC LIMIT ?", (*params, limit),
        )]

    def overrides(self) -> list[tuple[str, str, str]]:
        """(kind, name, JSON) of every override, in a stable order."""
        return [(str(kind), str(name), str(body)) for kind, name, body in self._fetch(
            "SELECT kind, name, body FROM proxykit_overrides ORDER BY kind, name", ())]

    def replace_overrides(self, rows: Sequence[tuple[str, str, str]], updated: float) -> None:
        """Every override at once, in one transaction: a replica never reads half a change."""
        with self._transaction() as cursor:
            cursor.execute("DELETE FROM proxykit_overrides")
            cursor.executemany(self._sql(
                "INSERT INTO proxykit_overrides (kind, name, body, updated) VALUES (?, ?, ?, ?)"
            ), [(*row, updated) for row in rows])

    def check(self) -> None:
        """Raises StoreUnavailable unless the database answers."""
        self._fetch("SELECT 1", ())

    def close(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(Exception):
                self._connection.close()
            self._connection = None

    # The connection

    def _fetch(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        with self._transaction() as cursor:
            cursor.execute(self._sql(sql), params)
            return list(cursor.fetchall())

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Any]:
        connection = self._connect()
        try:
            cursor = connection.cursor()
            if not self.postgres:
                cursor.execute("BEGIN")
            yield cursor
            connection.commit()
        except Exception as exc:
            with contextlib.suppress(Exception):
                connection.rollback()
            if self._lost(exc):
                self.close()  # the next call connects again
            raise StoreUnavailable(f"the store at {self.printable} failed: {_first_line(exc)}") from None

    def _connect(self) -> Any:
        if self._connection is not None:
            return self._connection
        try:
            self._connection = self._open()
            self._migrate()
        except Exception as exc:
            self.close()
            raise StoreUnavailable(f"cannot open the store at {self.printable}: {_first_line(exc)}") from None
        return self._connection

    def _open(self) -> Any:
        if self.postgres:
            import psycopg  # an extra: `pip install 'proxykit-llm[postgres]'`

            return psycopg.connect(self.url, connect_timeout=5, options="-c statement_timeout=30000")
        path = self.url[len("sqlite://"):]
        target = ":memory:" if path in ("", "/") else path[1:]
        if target != ":memory:":
            Path(target).parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(target, isolation_level=None, check_same_thread=False, timeout=5.0)
        connection.execute("PRAGMA journal_mode=WAL")  # readers (another process's stats) never block the writer
        connection.execute("PRAGMA synchronous=NORMAL")
        return connection

    def _migrate(self) -> None:
        connection = self._connection
        cursor = connection.cursor()
        if not self.postgres:
            cursor.execute("BEGIN IMMEDIATE")
        else:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        cursor.execute("CREATE TABLE IF NOT EXISTS proxykit_schema (version INTEGER NOT NULL)")
        cursor.execute("SELECT MAX(version) FROM proxykit_schema")
        version = cursor.fetchone()[0] or 0
        if version > SCHEMA_VERSION:
            connection.rollback()
            raise RuntimeError(f"schema version {version} is newer than this proxykit's ({SCHEMA_VERSION})")
        for step in _MIGRATIONS[version:]:
            for statement in step:
                cursor.execute(statement)
        if version < SCHEMA_VERSION:
            cursor.execute(self._sql("DELETE FROM proxykit_schema"))
            cursor.execute(self._sql("INSERT INTO proxykit_schema (version) VALUES (?)"), (SCHEMA_VERSION,))
            logger.info("store schema migrated from version %d to %d", version, SCHEMA_VERSION)
        connection.commit()

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.postgres else sql

    def _lost(self, exc: Exception) -> bool:
        if not self.postgres:
            return False
        return self._connection is None or bool(getattr(self._connection, "closed", True)) or \
            type(exc).__name__ in ("OperationalError", "InterfaceError")


def _add_totals(totals: dict[tuple[int, str, str, int], list[float]], rows: Sequence[UsageRow]) -> None:
    """Adds the rows to their hour's, model's, client's and status's totals."""
    for row in rows:
        key = (int(row.time // HOUR * HOUR), row.totals_model, row.client, row.status)
        entry = totals.get(key)
        if entry is None:
            totals[key] = [1, row.prompt_tokens, row.completion_tokens, row.cost_usd]
        else:
            entry[0] += 1
            entry[1] += row.prompt_tokens
            entry[2] += row.completion_tokens
            entry[3] += row.cost_usd


def _filters(*conditions: tuple[str, Any]) -> tuple[str, tuple[Any, ...]]:
    """A WHERE clause of the conditions whose value is given."""
    used = [(clause, value) for clause, value in conditions if value is not None]
    return " AND ".join(clause for clause, _ in used) or "1 = 1", tuple(value for _, value in used)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]
