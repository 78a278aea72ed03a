"""`proxykit import-litellm`: a proxykit config from a LiteLLM proxy `config.yaml`.

    text = import_litellm(yaml.safe_load(open("config.yaml")))

`model_list` entries of one `model_name` become one model; entries of it that share an
`api_base`, an upstream model and limits become one deployment whose keys form the pool. The
provider prefix (`openai/`, `hosted_vllm/`, ...) comes off the upstream model id. A key is never
copied: `os.environ/X` becomes `${X}`, and a key written in clear becomes a variable to set. What
cannot be carried over is listed in a comment at the top, never dropped silently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Final

import yaml

# Providers whose prefix comes off the model id, and the base URL each implies without `api_base`.
PROVIDERS: Final[dict[str, str | None]] = {
    "openai": "https://api.openai.com/v1",
    "text-completion-openai": "https://api.openai.com/v1",
    "hosted_vllm": None,
    "vllm": None,
    "openai_like": None,
    "custom_openai": None,
    "azure": None,
    "anthropic": "https://api.anthropic.com/v1",
    "deepseek": "https://api.deepseek.com/v1",
    "groq": "https://api.groq.com/openai/v1",
    "mistral": "https://api.mistral.ai/v1",
    "together_ai": "https://api.together.xyz/v1",
    "openrouter": "https://openrouter.ai/api/v1",
    "fireworks_ai": "https://api.fireworks.ai/inference/v1",
    "xai": "https://api.x.ai/v1",
}
STRATEGIES: Final = {
    "simple-shuffle": "weighted", "least-busy": "least-busy", "usage-based-routing": "usage-based",
    "usage-based-routing-v2": "usage-based", "latency-based-routing": "latency-based",
}
_CARRIED_PARAMS: Final = frozenset({"model", "api_key", "api_base", "rpm", "tpm", "weight", "order"})


@dataclass
class _Import:
    notes: list[str] = field(default_factory=list)  # what could not be carried over
    secrets: int = 0  # keys written in clear, turned into variables

    def note(self, where: str, what: str) -> None:
        self.notes.append(f"{where}: {what}")

    def key(self, raw: Any, where: str, slug: str) -> str | None:
        if not isinstance(raw, str) or not raw:
            return None
        if raw.startswith("os.environ/"):
            return "${" + raw.removeprefix("os.environ/") + "}"
        self.secrets += 1
        name = f"{slug}_KEY_{self.secrets}"
        self.note(where, f"a key written in clear: set ${name} to it (its value is not copied)")
        return "${" + name + "}"


def import_litellm(data: Any) -> str:
    """The proxykit config, as YAML text with a comment for each setting not carried over.
    Raises ValueError when `data` has no `model_list`."""
    if not isinstance(data, dict) or not isinstance(data.get("model_list"), list) or not data["model_list"]:
        raise ValueError("not a LiteLLM proxy config: it has no model_list")
    job = _Import()
    models = _models(data["model_list"], job)
    config: dict[str, Any] = {}
    router = data.get("router_settings") or {}
    settings = data.get("litellm_settings") or {}
    general = data.get("general_settings") or {}
    if (master := general.get("master_key")) is not None:
        key = job.key(master, "general_settings.master_key", "MASTER")
        if key:
            config["auth"] = {"keys": [{"name": "master", "key": key}]}
    config["models"] = list(models.values())
    _fallbacks(models, [*(settings.get("fallbacks") or []), *(router.get("fallbacks") or [])], job)
    _router(router, settings, config, job)
    for section, known in (("general_settings", {"master_key"}), ("litellm_settings", {"num_retries", "fallbacks",
                                                                                       "request_timeout"})):
        for name in (data.get(section) or {}):
            if name not in known:
                job.note(f"{section}.{name}", "no proxykit equivalent")
    for name in (data.get("environment_variables") or {}):
        job.note(f"environment_variables.{name}", "set it in proxykit's environment instead")
    for name in data:
        if name not in ("model_list", "router_settings", "litellm_settings", "general_settings",
                        "environment_variables"):
            job.note(name, "no proxykit equivalent")
    header = ["# proxykit config imported from a LiteLLM proxy config (proxykit import-litellm)."]
    if job.notes:
        header.append("# Not carried over:")
        header += [f"#   {note}" for note in job.notes]
    return "\n".join(header) + "\n" + yaml.safe_dump(config, sort_keys=False, allow_unicode=True)


def _models(entries: list[Any], job: _Import) -> dict[str, dict[str, Any]]:
    models: dict[str, dict[str, Any]] = {}
    pools: dict[tuple[str, tuple[Any, ...]], dict[str, Any]] = {}
    for i, entry in enumerate(entries):
        where = f"model_list[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("model_name"), str):
            job.note(where, "no model_name: skipped")
            continue
        name = entry["model_name"]
        params = entry.get("litellm_params") or {}
        provider, model_id = _split_provider(str(params.get("model") or name))
        base_url = params.get("api_base") or PROVIDERS.get(provider or "")
        if not base_url:
            job.note(where, f"no api_base for provider {provider!r}: skipped")
            continue
        base_url = str(base_url).rstrip("/")
        if provider == "azure" and not base_url.endswith("/v1"):
            base_url += "/openai/v1"  # Azure OpenAI's v1 API, which speaks OpenAI's paths
        limits = {key: entry.get(key, params.get(key)) for key in ("rpm", "tpm", "weight")}
        group = (name, (base_url, model_id, provider, *limits.values(), params.get("order")))
        model = models.setdefault(name, {"name": name, "deployments": []})
        deployment = pools.get(group)
        if deployment is None:
            deployment = pools[group] = {"base_url": base_url}
            if model_id != name:
                deployment["model"] = model_id
            deployment.update({key: value for key, value in limits.items() if value is not None})
            if isinstance(params.get("order"), int):  # LiteLLM's order: the lower, the sooner, as tiers here
                deployment["priority"] = params["order"]
            if provider == "anthropic":
                deployment.update(auth_header="x-api-key", headers={"anthropic-version": "2023-06-01"})
            elif provider == "azure":
                deployment["auth_header"] = "api-key"
            _model_info(entry.get("model_info") or {}, model, deployment, where, job)
            model["deployments"].append(deployment)
        if (key := job.key(params.get("api_key"), f"{where}.litellm_params.api_key", _slug(name))) is not None:
            deployment.setdefault("api_keys", []).append(key)
        if params.get("order") is not None and not isinstance(params.get("order"), int):
            job.note(f"{where}.litellm_params.order", "not a whole number: not carried over")
        for param in params:
            if param not in _CARRIED_PARAMS:
                job.note(f"{where}.litellm_params.{param}", "no proxykit equivalent")
    for model in models.values():
        if len(model["deployments"]) > 1:  # proxykit names several deployments `name@0`, `name@1`...
            for j, deployment in enumerate(model["deployments"]):
                deployment.setdefault("name", f"{_slug(model['name']).lower()}-{j}")
    return models


def _model_info(info: dict[str, Any], model: dict[str, Any], deployment: dict[str, Any], where: str,
                job: _Import) -> None:
    if isinstance(info.get("max_tokens"), int):
        deployment["max_tokens"] = info["max_tokens"]
    prices = {"input_per_1m": info.get("input_cost_per_token"), "output_per_1m": info.get("output_cost_per_token")}
    if any(isinstance(price, (int, float)) for price in prices.values()):
        model["pricing"] = {key: round(float(price) * 1e6, 6) for key, price in prices.items()
                            if isinstance(price, (int, float))}
    for name in info:
        if name not in ("max_tokens", "input_cost_per_token", "output_cost_per_token", "id", "mode", "base_model"):
            job.note(f"{where}.model_info.{name}", "no proxykit equivalent")


def _fallbacks(models: dict[str, dict[str, Any]], rules: list[Any], job: _Import) -> None:
    for rule in rules:
        for source, targets in (rule.items() if isinstance(rule, dict) else ()):
            if source not in models:
                job.note(f"fallbacks.{source}", "names no imported model")
                continue
            known = [target for target in targets or () if target in models and target != source]
            for target in targets or ():
                if target not in known:
                    job.note(f"fallbacks.{source}", f"{target!r} names no imported model")
            if known:
                models[source].setdefault("fallbacks", []).extend(known)


def _router(router: dict[str, Any], settings: dict[str, Any], config: dict[str, Any], job: _Import) -> None:
    strategy = router.get("routing_strategy")
    if strategy is not None:
        if strategy in STRATEGIES:
            config["routing"] = {"strategy": STRATEGIES[strategy]}
        else:
            job.note("router_settings.routing_strategy", f"{strategy!r} has no proxykit equivalent")
    retries = router.get("num_retries", settings.get("num_retries"))
    if isinstance(retries, int):
        config["retry"] = {"attempts": retries}
    timeout = router.get("timeout", settings.get("request_timeout"))
    if isinstance(timeout, (int, float)):
        config["timeouts"] = {"first_byte": timeout}
    cooldown = {"after_failures": router.get("allowed_fails"), "seconds": router.get("cooldown_time")}
    if any(value is not None for value in cooldown.values()):
        config["cooldown"] = {key: value for key, value in cooldown.items() if value is not None}
    if router.get("redis_host"):
        password = router.get("redis_password")
        secret = job.key(password, "router_settings.redis_password", "REDIS") if password else None
        auth = f":{secret}@" if secret else ""
        config["limits"] = {
            "backend": "redis", "redis_url": f"redis://{auth}{router['redis_host']}:{router.get('redis_port', 6379)}/0",
        }
    carried = {"routing_strategy", "num_retries", "timeout", "allowed_fails", "cooldown_time", "fallbacks",
               "redis_host", "redis_port", "redis_password"}
    for name in router:
        if name not in carried:
            job.note(f"router_settings.{name}", "no proxykit equivalent")


def _split_provider(model: str) -> tuple[str | None, str]:
    prefix, _, rest = model.partition("/")
    return (prefix, rest) if rest and prefix in PROVIDERS else (None, model)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").upper() or "MODEL"
