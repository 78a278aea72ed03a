"""What one proxykit app owns for its lifetime: the upstream HTTP client and the key pool."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import importlib.util
import logging
import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any

import anyio
import httpx
from prometheus_client import CollectorRegistry

from proxykit.cache.base import CacheBackend
from proxykit.cache.memory import MemoryCache
from proxykit.cache.redis import RedisCache
from proxykit.config import Config, ConfigError
from proxykit.config.model import Budget
from proxykit.keys.health import HealthChecks
from proxykit.keys.pool import KeyPool
from proxykit.keys.state import KeyState
from proxykit.keys.upkeep import PoolUpkeep
from proxykit.limits.base import MemoryRateLimiter, RateLimiter
from proxykit.limits.redis import RedisConnection, RedisRateLimiter, SharedKeyStates
from proxykit.metrics import ProxyMetrics, StoreCollector
from proxykit.store.budgets import SpendBook
from proxykit.store.ledger import Ledger
from proxykit.store.sql import SqlStore
from proxykit.upstream.base import upstream_for
from proxykit.upstream.proxy import ProxyRules
from proxykit.upstream.transport import Http1Transport

logger = logging.getLogger(__name__)


class ResourceState(enum.Enum):
    UNOPENED = 1
    OPENED = 2
    CLOSED = 3


class Resources:
    """Opened by the app's lifespan, or lazily by the first request when a host app mounts proxykit
    without wiring that lifespan (Starlette does not run a mounted app's lifespan, starlette #649).

        resources = Resources(config)
        async with resources.lifespan(app): ...
    """

    def __init__(self, config: Config, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.config = config
        self.keys = KeyPool(config)
        self.state = ResourceState.UNOPENED
        self.draining = False  # set on SIGTERM by `proxykit serve`: readiness answers 503 from then on
        # One connection pool: the forwarder sends through the transport directly, the client
        # (probes, and anyone embedding proxykit) wraps the same transport.
        self.transport = transport or Http1Transport(max_connections=4096, proxies=proxy_rules(config, os.environ))
        self.upstream = upstream_for(self.transport)
        self.client_timeout, self.timeouts = _timeouts(config)
        # Every app has its own registry: a host that mounts proxykit twice, or uses
        # prometheus-client itself, never sees duplicate metric names.
        self.registry = CollectorRegistry()
        # Made whether or not metrics are on: a reload may turn them on.
        self.metrics = ProxyMetrics(self.registry, self.keys)
        self.limiter: RateLimiter = MemoryRateLimiter()
        self.redis: RedisConnection | None = None
        self.shared_keys: SharedKeyStates | None = None
        self._publishing: set[asyncio.Task[None]] = set()
        if config.limits.backend == "redis":
            self.redis = RedisConnection(config.limits.redis_url)
            self.limiter = RedisRateLimiter(self.redis)
            self.shared_keys = SharedKeyStates(self.redis, self.keys)
            self.keys.on_rest = self._publish_rest
        self.cache: CacheBackend | None = None
        self._cache_redis: RedisConnection | None = None
        self._caches: list[CacheBackend] = []  # every backend made, closed at the end
        self._choose_cache(config)
        self.spend: SpendBook | None = None
        self.ledger: Ledger | None = None
        if config.store.enabled:
            self.ledger, self.spend = _ledger(config, self.metrics)
            self.registry.register(StoreCollector(self.ledger, self.spend))
        self._client: httpx.AsyncClient | None = None
        self._open_lock: anyio.Lock | None = None
        self.upkeep: PoolUpkeep | None = None
        self.health: HealthChecks | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def client(self) -> httpx.AsyncClient:
        assert self._client is not None, "Resources.open() must run first"
        return self._client

    async def open(self) -> None:
        if self.state is ResourceState.OPENED:
            return
        self._client = httpx.AsyncClient(
            transport=self.transport,
            timeout=self.client_timeout,
            follow_redirects=False,
            # One client serves every user: a jar that stored cookies would hand one user's to another.
            cookies=CookieJar(policy=DefaultCookiePolicy(allowed_domains=[])),
            trust_env=False,
        )
        self.upkeep = PoolUpkeep(self.keys, self._client, shared=self.shared_keys)
        if self.config.metrics.enabled:
            self.metrics.loop_lag.start(asyncio.get_running_loop())
        if self.ledger is not None:
            await self.ledger.start()
        self.health = HealthChecks(self.keys, self._client)
        # Plain tasks, not a task group: the lazy open on a first request has no group to join.
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self.upkeep.run()), loop.create_task(self.health.run())]
        self.state = ResourceState.OPENED

    async def ensure_open(self) -> None:
        """Open on first use when no lifespan did; cheap once opened."""
        if self.state is ResourceState.OPENED:
            return
        if self._open_lock is None:
            self._open_lock = anyio.Lock()
        async with self._open_lock:
            if self._client is None:  # not opened by whoever held the lock before us
                logger.warning(
                    "proxykit resources opened by the first request: the host app does not run "
                    "proxykit's lifespan (pass lifespan=proxy_app.router.lifespan_context)"
                )
                await self.open()

    def _publish_rest(self, state: KeyState) -> None:
        assert self.shared_keys is not None
        task = asyncio.get_running_loop().create_task(self.shared_keys.publish(state))
        self._publishing.add(task)  # held until done: the loop keeps only weak references
        task.add_done_callback(self._publishing.discard)

    def request_reload(self) -> None:
        """Re-read every `file:` key list soon (what SIGHUP does in `proxykit serve`)."""
        if self.upkeep is not None:
            self.upkeep.request_reload()

    def apply(self, config: Config) -> tuple[int, int]:
        """Takes a new config for new requests: key state, limit buckets, the cache, the store
        and the connection pool carry over (`proxykit.live` builds the new layers). Returns the
        keys (added, retired)."""
        self.config = config
        changed = self.keys.update(config)
        self.client_timeout, self.timeouts = _timeouts(config)
        if self._client is not None:
            self._client.timeout = self.client_timeout
        if self.upkeep is not None:
            self.upkeep.follow(config)
        if isinstance(self.transport, Http1Transport):
            self.transport.client.proxies = proxy_rules(config, os.environ)
        if self.spend is not None:
            self.spend.update(_budgets(config))
        self._choose_cache(config)
        if self.state is ResourceState.OPENED:
            if config.metrics.enabled:
                self.metrics.loop_lag.start(asyncio.get_running_loop())
            else:
                self.metrics.loop_lag.stop()
        return changed

    def _choose_cache(self, config: Config) -> None:
        """The cache backend the config asks for; one already made for it is kept, entries and all."""
        wanted = config.cache.backend if config.cache.enabled else None
        if wanted is None:
            self.cache = None
            return
        for cache in self._caches:
            if (wanted == "redis") == isinstance(cache, RedisCache):
                self.cache = cache
                if isinstance(cache, MemoryCache):
                    cache.max_bytes = config.cache.max_bytes
                return
        if wanted == "redis":
            # Entries shared by every replica, through the limits' Redis URL.
            self._cache_redis = self.redis or RedisConnection(config.limits.redis_url)
            self.cache = RedisCache(self._cache_redis)
        else:
            self.cache = MemoryCache(max_bytes=config.cache.max_bytes)
        self._caches.append(self.cache)

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        if self.redis is not None:
            await self.redis.aclose()
        if self._cache_redis is not None and self._cache_redis is not self.redis:
            await self._cache_redis.aclose()
        for cache in self._caches:
            await cache.aclose()
        if self.ledger is not None:
            await self.ledger.aclose()  # the rows still buffered are written first
        self.metrics.loop_lag.stop()
        self.metrics.close()
        self.state = ResourceState.CLOSED

    @asynccontextmanager
    async def lifespan(self, app: Any) -> AsyncIterator[None]:
        await self.open()
        try:
            yield
        finally:
            await self.aclose()


def _ledger(config: Config, metrics: ProxyMetrics) -> tuple[Ledger, SpendBook]:
    """The usage store's writer, and the budgets' spend (budgets may come with a reload)."""
    store = SqlStore(config.store.url, retention_days=config.store.retention_days)
    if store.postgres and importlib.util.find_spec("psycopg") is None:
        raise ConfigError(["store.url: PostgreSQL needs its driver: pip install 'proxykit-llm[postgres]'"])
    spend = SpendBook(_budgets(config))

    def count(result: str, amount: int) -> None:
        metrics.add(metrics.store_records, (result,), float(amount))

    return Ledger(store, spend=spend, count=count), spend


def _budgets(config: Config) -> dict[str, Budget]:
    return {key.name: key.budget for key in config.auth.keys if key.budget is not None}


def _timeouts(config: Config) -> tuple[httpx.Timeout, dict[str, float | None]]:
    timeouts = config.timeouts
    # LLM calls are slow: httpx's 5 s default everywhere would cut them off.
    client_timeout = httpx.Timeout(
        connect=timeouts.connect, read=timeouts.read, write=timeouts.read, pool=timeouts.first_byte,
    )
    # The forwarder's own calls: the first-byte deadline is its watch's (proxykit/watch.py),
    # so `read` bounds only the silence between body chunks, never the wait for headers.
    return client_timeout, {**client_timeout.as_dict(), "first_byte": None}


def proxy_rules(config: Config, environ: Mapping[str, str]) -> ProxyRules:
    """The environment's proxies, and each deployment's own `proxy` where it names one."""
    own = {
        deployment.base_url: deployment.proxy
        for deployment in config.deployments if deployment.proxy is not None
    }
    return ProxyRules.from_environment(environ, own)
