"""Typed configuration: frozen dataclasses (CONTRACT section 3). `proxykit.config.reader` reads
them from YAML or a dict and reports every problem with its field path.

    config = load_config("proxykit.yaml")   # from proxykit import load_config
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

ROUTING_STRATEGIES: Final = ("usage-based", "round-robin", "least-busy", "weighted", "latency-based")
RETRY_REASONS: Final = frozenset({"connect_error", "timeout"})
LIMIT_BACKENDS: Final = ("memory", "redis")
AUTH_HEADERS: Final = ("authorization", "x-api-key", "api-key")
CACHE_BACKENDS: Final = ("memory", "redis")
BUDGET_PERIODS: Final = ("day", "week", "month", "total")


class ConfigError(Exception):
    """A config that cannot run. `problems` holds one `field.path: message` line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class Budget:
    """What a client key may spend in a UTC period: day, week (from Monday), month or total."""

    max_usd: float
    period: str = "month"


@dataclass(frozen=True, slots=True)
class ClientKey:
    """A key that clients present to proxykit. `name` is what logs and metrics show."""

    name: str
    key: str = field(repr=False)
    rpm: int | None = None
    tpm: int | None = None
    models: tuple[str, ...] | None = None  # glob allow-list; None allows every model
    budget: Budget | None = None
    admin: bool = False  # may use the management API's admin routes and see every client's data


@dataclass(frozen=True, slots=True)
class AuthConfig:
    keys: tuple[ClientKey, ...] = ()

    @property
    def enabled(self) -> bool:
        return bool(self.keys)


@dataclass(frozen=True, slots=True)
class UpstreamKey:
    """One upstream API key; `alias` (`<deployment>#<i>` or a configured name) stands in for it."""

    alias: str
    secret: str = field(repr=False)  # "" for an upstream that takes no key (a local vLLM)


@dataclass(frozen=True, slots=True)
class Deployment:
    name: str
    base_url: str
    model: str  # the upstream's model id
    api_keys: tuple[UpstreamKey, ...]
    rpm: int | None = None
    tpm: int | None = None
    weight: float = 1.0
    max_tokens: int | None = None
    keys_file: str | None = None  # set when the keys came from `file:PATH`
    proxy: str | None = field(default=None, repr=False)  # egress proxy URL (may carry a password);
    # "none" = direct; None = the HTTPS_PROXY / HTTP_PROXY / NO_PROXY environment
    auth_header: str = "authorization"  # how the key goes: authorization (Bearer KEY) | x-api-key | api-key
    headers: tuple[tuple[str, str], ...] = ()  # static headers, e.g. (("anthropic-version", "2023-06-01"),)
    priority: int = 0  # a tier: a higher number serves only while no key of a lower tier is available

    @property
    def key_count(self) -> int:
        """Keys it holds; a keyless upstream (a local vLLM) holds one empty key, and counts none."""
        return sum(1 for key in self.api_keys if key.secret)


@dataclass(frozen=True, slots=True)
class Pricing:
    input_per_1m: float = 0.0
    output_per_1m: float = 0.0


@dataclass(frozen=True, slots=True)
class ModelConfig:
    name: str
    deployments: tuple[Deployment, ...]
    fallbacks: tuple[str, ...] = ()
    pricing: Pricing | None = None
    priority: int = 0  # orders the management API's model lists, lowest first
    enabled: bool = True  # False: requests get 503 model_unavailable, and it is no one's fallback
    defaults: tuple[tuple[str, object], ...] = ()  # body members added when the client sent none
    rpm: int | None = None  # the model's own limits, across every client (`rate_limit`)
    tpm: int | None = None


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    strategy: str = "usage-based"


@dataclass(frozen=True, slots=True)
class BackoffConfig:
    initial: float = 0.2
    max: float = 8.0


@dataclass(frozen=True, slots=True)
class HealthConfig:
    """Active checks: an unbilled `GET {base_url}/models` per deployment every `interval` seconds."""

    interval: float = 30.0  # 0 turns active checks off
    failure_threshold: int = 3  # consecutive failed checks: the deployment is unhealthy
    recovery_threshold: int = 2  # consecutive passed checks: healthy again


@dataclass(frozen=True, slots=True)
class RetryConfig:
    attempts: int = 3
    backoff: BackoffConfig = BackoffConfig()
    retry_on: tuple[int | str, ...] = (429, 500, 502, 503, 504, "connect_error", "timeout")


@dataclass(frozen=True, slots=True)
class CooldownConfig:
    on_429: float = 60.0
    on_auth_error: float = 3600.0
    after_failures: int = 3
    seconds: float = 30.0


@dataclass(frozen=True, slots=True)
class TimeoutConfig:
    """`first_byte`: until the upstream's headers arrive. `read`: the longest silence between chunks."""

    connect: float = 5.0
    first_byte: float = 120.0
    read: float = 300.0


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_body_bytes: int = 20_000_000
    backend: str = "memory"
    queue_timeout: float = 5.0  # how long a request waits for an upstream key at its rpm/tpm to make room
    redis_url: str = field(default="redis://127.0.0.1:6379/0", repr=False)  # may carry a password


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    enabled: bool = True
    path: str = "/metrics"
    require_key: bool = False


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """The exact-match response cache (CONTRACT section 10)."""

    enabled: bool = False
    backend: str = "memory"  # memory | redis (limits.redis_url, shared by every replica)
    ttl: float = 3600.0  # seconds
    max_bytes: int = 268_435_456  # memory backend; an answer over a tenth of it is not stored
    shared_between_clients: bool = False  # False: each client key has its own entries


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """The usage store (CONTRACT section 8): `sqlite:///FILE`, `sqlite://` (memory),
    `postgresql://...` (shared by replicas) or `none`."""

    url: str = field(default="sqlite:///proxykit.db", repr=False)  # a PostgreSQL URL may carry a password
    retention_days: int = 30  # per-request rows; hourly totals are kept for good

    @property
    def enabled(self) -> bool:
        return self.url != "none"


@dataclass(frozen=True, slots=True)
class ManagementConfig:
    path: str = "/api/llm"


@dataclass(frozen=True, slots=True)
class Config:
    models: tuple[ModelConfig, ...]
    auth: AuthConfig = AuthConfig()
    routing: RoutingConfig = RoutingConfig()
    health: HealthConfig = HealthConfig()
    retry: RetryConfig = RetryConfig()
    cooldown: CooldownConfig = CooldownConfig()
    timeouts: TimeoutConfig = TimeoutConfig()
    limits: LimitsConfig = LimitsConfig()
    metrics: MetricsConfig = MetricsConfig()
    cache: CacheConfig = CacheConfig()
    store: StoreConfig = StoreConfig()
    management: ManagementConfig = ManagementConfig()
    _by_name: dict[str, ModelConfig] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {model.name: model for model in self.models})  # frozen: set once

    def model(self, name: str) -> ModelConfig | None:
        return self._by_name.get(name)

    @property
    def deployments(self) -> list[Deployment]:
        """Every deployment of every model."""
        return [deployment for model in self.models for deployment in model.deployments]
