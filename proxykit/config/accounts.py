"""Reading the sections about who uses proxykit and what it remembers: client keys (with their
budgets and admin flag), the usage store and the management API's path."""

from __future__ import annotations

import re
from typing import Any

from proxykit.config.fields import FieldReader
from proxykit.config.model import BUDGET_PERIODS, AuthConfig, Budget, ClientKey, ManagementConfig, StoreConfig

_STORE_URL = re.compile(r"^(none|sqlite://(/.+)?|postgres(ql)?://.+)$")


class AccountFields(FieldReader):
    """The `auth`, `store` and `management` sections, for the config reader."""

    def auth(self, raw: Any) -> AuthConfig:
        entry = self.mapping(raw, "auth", ("keys",))
        raw_keys = entry.get("keys")
        if raw_keys is None:
            return AuthConfig()
        if not isinstance(raw_keys, list):
            self.fail("auth.keys", "must be a list")
            return AuthConfig()
        keys = [key for i, item in enumerate(raw_keys) if (key := self.client_key(item, f"auth.keys[{i}]"))]
        if len({key.name for key in keys}) != len(keys):
            self.fail("auth.keys", "key names must be unique")
        if len({key.key for key in keys}) != len(keys):
            self.fail("auth.keys", "two clients share the same key")
        return AuthConfig(keys=tuple(keys))

    def client_key(self, item: Any, path: str) -> ClientKey | None:
        entry = self.mapping(item, path, ("name", "key", "rpm", "tpm", "models", "budget", "admin"))
        name = self.string(entry.get("name"), f"{path}.name", required=True)
        secret = self.string(entry.get("key"), f"{path}.key", required=True)
        if name is None or not secret:
            if secret == "":
                self.fail(f"{path}.key", "is empty")
            return None
        limits = {
            key: self.number(entry[key], f"{path}.{key}", int, minimum=1)
            for key in ("rpm", "tpm") if entry.get(key) is not None
        }
        models = entry.get("models")
        return ClientKey(
            name=name, key=secret,
            models=None if models is None else self.string_list(models, f"{path}.models"),
            budget=self.budget(entry.get("budget"), f"{path}.budget"),
            admin=self.boolean(entry.get("admin"), f"{path}.admin", False),
            **limits,
        )

    def budget(self, raw: Any, path: str) -> Budget | None:
        if raw is None:
            return None
        entry = self.mapping(raw, path, ("max_usd", "period"))
        if "max_usd" not in entry:
            self.fail(f"{path}.max_usd", "is required")
            return None
        max_usd = self.number(entry["max_usd"], f"{path}.max_usd", float)
        period = self.choice(entry.get("period"), f"{path}.period", BUDGET_PERIODS, "month")
        return None if max_usd is None else Budget(max_usd=max_usd, period=period)

    def store(self, raw: Any) -> StoreConfig:
        entry = self.mapping(raw, "store", ("url", "retention_days"))
        default = StoreConfig()
        url = self.string(entry.get("url"), "store.url") or default.url
        if not _STORE_URL.match(url):
            self.fail("store.url", "must be sqlite:///FILE, sqlite:// (in memory), postgresql://... or none")
        days = self.number(entry["retention_days"], "store.retention_days", int, minimum=1) \
            if entry.get("retention_days") is not None else None
        return StoreConfig(url=url, retention_days=days or default.retention_days)

    def management(self, raw: Any) -> ManagementConfig:
        entry = self.mapping(raw, "management", ("path",))
        path = (self.string(entry.get("path"), "management.path") or ManagementConfig().path).rstrip("/")
        if not path.startswith("/") or path in ("", "/v1") or path.startswith(("/v1/", "/health")):
            self.fail("management.path", "must start with / and stay clear of /v1 and /health")
        return ManagementConfig(path=path)

    def defaults(self, raw: Any, path: str) -> tuple[tuple[str, object], ...]:
        """A model's body defaults: any JSON members but the ones that name the request."""
        if raw is None:
            return ()
        if not isinstance(raw, dict) or not all(isinstance(name, str) for name in raw):
            self.fail(path, "must be a mapping of body members, e.g. {temperature: 0.7}")
            return ()
        for name in ("model", "messages", "stream"):
            if name in raw:
                self.fail(f"{path}.{name}", "is the client's to send, not a default")
        return tuple((name, value) for name, value in raw.items() if name not in ("model", "messages", "stream"))

    def model_limits(self, raw: Any, path: str) -> dict[str, int | None]:
        """A model's own rpm and tpm across every client: `{requests_per_minute, tokens_per_minute}`."""
        entry = self.mapping(raw, path, ("requests_per_minute", "tokens_per_minute"))
        return {
            short: self.number(entry[name], f"{path}.{name}", int, minimum=1) if entry.get(name) is not None else None
            for short, name in (("rpm", "requests_per_minute"), ("tpm", "tokens_per_minute"))
        }

    def string_list(self, raw: Any, path: str) -> tuple[str, ...]:
        if raw is None:
            return ()
        if not isinstance(raw, list) or not all(isinstance(item, str) and item for item in raw):
            self.fail(path, "must be a list of names")
            return ()
        return tuple(self.expand(item, path) for item in raw)
