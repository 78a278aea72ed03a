"""Every metric proxykit exports (CONTRACT section 6), bound to the registry it is given."""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from proxykit.keys.pool import KeyPool
from proxykit.keys.state import KeyStatus
from proxykit.lag import LoopLagProbe
from proxykit.store.budgets import SpendBook
from proxykit.store.ledger import Ledger

MULTIPROCESS_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"
DURATION_BUCKETS: Final = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)
TTFB_BUCKETS: Final = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120)
OVERHEAD_BUCKETS: Final = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
FLUSH_EVERY: Final = 1.0  # seconds: the longest pending numbers wait (memory), not what a scrape sees
FOLD_SLICE: Final = 500  # histogram observations folded per loop turn (well under a millisecond)

Labels = tuple[str, ...]
Change = tuple[Counter | Gauge, Labels, float]  # added to a counter or gauge
Observation = tuple[Histogram, Labels, float]


class ProxyMetrics:
    """Every metric proxykit exports, bound to the registry it is given.

        metrics = ProxyMetrics(CollectorRegistry(), pool)
        body = await metrics.scrape()   # or metrics.exposition(), folding everything at once
    """

    def __init__(self, registry: CollectorRegistry, pool: KeyPool) -> None:
        self.registry = registry
        # Registered before every metric, so any collection of this registry flushes first.
        registry.register(_FlushFirst(self))
        self.requests = Counter("proxykit_requests_total", "Requests answered, by status.",
                                ["model", "client", "status"], registry=registry)
        self.duration = Histogram("proxykit_request_duration_seconds", "Time from request to the last byte.",
                                  ["model"], buckets=DURATION_BUCKETS, registry=registry)
        self.ttfb = Histogram("proxykit_time_to_first_byte_seconds", "Time from request to the first body byte.",
                              ["model"], buckets=TTFB_BUCKETS, registry=registry)
        self.in_flight = Gauge("proxykit_in_flight_requests", "Requests in progress.", ["model"],
                               registry=registry, multiprocess_mode="livesum")
        self.attempts = Counter("proxykit_upstream_attempts_total", "Upstream attempts, by outcome.",
                                ["model", "deployment", "key", "outcome"], registry=registry)
        self.retries = Counter("proxykit_retries_total", "Attempts after the first, by the failure before.",
                               ["model", "reason"], registry=registry)
        self.rate_limited = Counter("proxykit_rate_limited_total", "Requests refused by a client limit.",
                                    ["client", "limit"], registry=registry)
        self.overhead = Histogram("proxykit_overhead_seconds", "Time spent in proxykit, upstream waits excluded.",
                                  ["model"], buckets=OVERHEAD_BUCKETS, registry=registry)
        self.tokens = Counter("proxykit_tokens_total", "Tokens, as the upstream reported them.",
                              ["model", "client", "type"], registry=registry)
        self.cost = Counter("proxykit_cost_usd_total", "Cost from the model's pricing, in USD.",
                            ["model", "client"], registry=registry)
        self.cache_requests = Counter("proxykit_cache_requests_total", "Cacheable requests, by what the cache did.",
                                      ["model", "result"], registry=registry)
        self.cache_saved_tokens = Counter("proxykit_cache_saved_tokens_total",
                                          "Prompt and completion tokens of answers served from the cache.",
                                          ["model"], registry=registry)
        self.budget_rejected = Counter("proxykit_budget_rejected_total", "Requests refused by a spent budget.",
                                       ["client"], registry=registry)
        self.store_records = Counter("proxykit_store_records_total", "Usage rows written to the store, or dropped.",
                                     ["result"], registry=registry)
        self.config_reloads = Counter("proxykit_config_reloads_total",
                                      "Re-reads of a changed config file and SIGHUPs, by result.",
                                      ["result"], registry=registry)
        self.loop_lag = LoopLagProbe()  # started with the app's resources, on their event loop
        registry.register(self.loop_lag)
        self.key_collector = KeyAvailabilityCollector(pool)
        registry.register(self.key_collector)
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        # Requests add to plain dicts, folded into the metrics at every scrape and every second:
        # prometheus-client takes a lock and a labels lookup per change, a large share of the
        # proxy's own work per request. Under `--workers N` any worker may answer a scrape, so each change is
        # written at once there.
        self._write_at_once = bool(os.environ.get(MULTIPROCESS_ENV))
        self._lock = threading.Lock()  # a host may collect the registry from another thread
        self._counts: defaultdict[tuple[MetricWrapperBase, Labels], float] = defaultdict(float)
        self._observed: defaultdict[tuple[Histogram, Labels], list[float]] = defaultdict(list)
        self._flush_timer: asyncio.TimerHandle | None = None
        self._flush_due = 0.0  # time.monotonic() when the timer should have fired
        self._folding: Iterator[tuple[Any, float]] | None = None  # observations a spread fold has yet to make
        self._scraping = False  # `scrape` is rendering: its collection folds counts only

    def add(self, metric: Counter | Gauge, labels: Labels, amount: float = 1.0) -> None:
        """Adds to a counter, or to a gauge (`amount` may be negative)."""
        with self._lock:
            self._counts[metric, labels] += amount
        self._flush_later()

    def record(self, counts: Iterable[Change], observations: Iterable[Observation]) -> None:
        """Everything one request changes, at once."""
        with self._lock:
            for metric, labels, amount in counts:
                self._counts[metric, labels] += amount
            for histogram, labels, value in observations:
                self._observed[histogram, labels].append(value)
        self._flush_later()

    def flush(self) -> None:
        """Folds every pending change into the metrics, at once (a host's collection, shutdown)."""
        self._fold_counts()
        for child, value in self._take_observations():
            child.observe(value)

    def _fold_counts(self) -> None:
        with self._lock:
            counts, self._counts = self._counts, defaultdict(float)
        for (metric, labels), amount in counts.items():
            if amount:
                self.labelled(metric, *labels).inc(amount)

    def _take_observations(self) -> Iterator[tuple[Any, float]]:
        """Pending histogram observations, with those a spread fold has not reached yet."""
        with self._lock:
            observed, self._observed = self._observed, defaultdict(list)
        taken = ((self.labelled(histogram, *labels), value)
                 for (histogram, labels), values in observed.items() for value in values)
        left, self._folding = self._folding, None
        return itertools.chain(left, taken) if left is not None else taken

    def _flush_later(self) -> None:
        if self._write_at_once:
            self.flush()
        # A timer overdue by a second belonged to an event loop that has ended (a host may run the
        # app on one loop after another): set one on this loop.
        elif self._flush_timer is None or time.monotonic() > self._flush_due + 1.0:
            self._flush_timer = asyncio.get_running_loop().call_later(FLUSH_EVERY, self.flush_spread)
            self._flush_due = time.monotonic() + FLUSH_EVERY

    def flush_spread(self) -> None:
        """A second's worth of histogram observations is thousands of `observe()` calls: they are
        folded a slice a loop turn, so no request waits behind all of them."""
        self._flush_timer = None
        self._fold_counts()
        self._fold_slice(self._take_observations())

    def _fold_slice(self, pending: Iterator[tuple[Any, float]]) -> None:
        if self._observe_some(pending):
            self._folding = pending  # a flush or a scrape meanwhile takes the rest over
            asyncio.get_running_loop().call_soon(self._continue_fold, pending)

    def _continue_fold(self, folding: Iterator[tuple[Any, float]]) -> None:
        if self._folding is folding:  # not taken over meanwhile by a flush or a scrape
            self._folding = None
            self._fold_slice(folding)

    def close(self) -> None:
        """At shutdown: nothing stays pending (a `--workers` process writes its last numbers)."""
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        self.flush()

    def labelled(self, metric: MetricWrapperBase, *values: str) -> Any:
        """`metric.labels(*values)`, memoized: prometheus-client validates labels and takes a lock
        on every call, and label values here are bounded, so the cache is too."""
        key = (id(metric), values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    async def scrape(self) -> bytes:
        """The text format for `/metrics`: what is pending is folded in first a slice a loop turn,
        since a second's observations under load are tens of thousands of `observe()` calls that
        at once would hold every request behind them at every scrape. What arrives meanwhile
        waits for the next fold, as it would have waited for the next scrape."""
        self._fold_counts()
        pending = self._take_observations()
        while self._observe_some(pending):
            await asyncio.sleep(0)
        self._scraping = True
        try:
            return self._render()
        finally:
            self._scraping = False

    @staticmethod
    def _observe_some(pending: Iterator[tuple[Any, float]]) -> bool:
        """Observes a slice of `pending`; True when it may hold more."""
        observed = 0
        for child, value in itertools.islice(pending, FOLD_SLICE):
            child.observe(value)
            observed += 1
        return observed == FOLD_SLICE

    def exposition(self) -> bytes:
        """The text format, everything pending folded in at once. Under `--workers N` every worker
        writes its numbers to shared files, and any worker's scrape adds them all up."""
        self.flush()
        return self._render()

    def fold_for_collection(self) -> None:
        """Before any collection of the registry: everything pending, at once, unless `scrape`
        is collecting, having folded the observations a slice a loop turn already."""
        if self._scraping:
            self._fold_counts()
        else:
            self.flush()

    def _render(self) -> bytes:
        if os.environ.get(MULTIPROCESS_ENV):
            combined = CollectorRegistry()
            MultiProcessCollector(combined)  # type: ignore[no-untyped-call]
            combined.register(self.key_collector)  # key state is this worker's own view
            return generate_latest(combined)
        return generate_latest(self.registry)


class _FlushFirst(Collector):
    """Collects nothing: it folds pending changes into the metrics collected after it."""

    def __init__(self, metrics: ProxyMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        self.metrics.fold_for_collection()
        return iter(())


class KeyAvailabilityCollector(Collector):
    """`proxykit_upstream_key_available`, read from the key pool at scrape time: it costs the
    request path nothing."""

    def __init__(self, pool: KeyPool) -> None:
        self.pool = pool

    def collect(self) -> Iterator[Metric]:
        gauge = GaugeMetricFamily("proxykit_upstream_key_available", "1 when an upstream key is usable, else 0.",
                                  labels=["deployment", "key"])
        now = self.pool.clock()
        for state in self.pool.all_keys():
            usable = state.status(now) is KeyStatus.AVAILABLE
            gauge.add_metric([state.deployment.name, state.alias], 1.0 if usable else 0.0)
        yield gauge
        healthy = GaugeMetricFamily("proxykit_deployment_healthy",
                                    "1 while a deployment passes its active health checks, else 0.",
                                    labels=["model", "deployment"])
        for name, keys in self.pool.models.items():
            for deployment in keys.model.deployments:
                healthy.add_metric([name, deployment.name], 0.0 if deployment.name in self.pool.unhealthy else 1.0)
        yield healthy


class StoreCollector(Collector):
    """The usage store's health and the budgets' spend, read at scrape time:
    `proxykit_store_up`, `proxykit_store_buffered_rows`, and per budgeted client
    `proxykit_budget_spent_usd` beside `proxykit_budget_max_usd`."""

    def __init__(self, ledger: Ledger, spend: SpendBook | None) -> None:
        self.ledger = ledger
        self.spend = spend

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("proxykit_store_up", "1 while the usage store takes writes, else 0.",
                                value=1.0 if self.ledger.healthy else 0.0)
        yield GaugeMetricFamily("proxykit_store_buffered_rows", "Usage rows waiting for the store.",
                                value=float(self.ledger.buffered))
        if self.spend is None:
            return
        spent = GaugeMetricFamily("proxykit_budget_spent_usd", "Spend in the budget's current period, in USD.",
                                  labels=["client"])
        limit = GaugeMetricFamily("proxykit_budget_max_usd", "The budget of the current period, in USD.",
                                  labels=["client"])
        now = time.time()
        for client, budget in self.spend.budgets.items():
            spent.add_metric([client], self.spend.spent(client, now))
            limit.add_metric([client], budget.max_usd)
        yield spent
        yield limit
