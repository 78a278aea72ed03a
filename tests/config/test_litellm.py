"""`proxykit import-litellm`: LiteLLM proxy configs, shaped like the seed users' and like LiteLLM's
docs show them, become proxykit configs that validate; nothing is dropped without a comment."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxykit.config import config_from_dict
from proxykit.config.litellm import import_litellm

SEED_MODELS = [
    "deepseek-ai/DeepSeek-V3", "deepseek-ai/DeepSeek-R1", "Qwen/Qwen2.5-72B-Instruct", "Qwen/QwQ-32B",
    "THUDM/GLM-4-9B-0414", "Qwen/Qwen2.5-VL-72B-Instruct", "moonshotai/Kimi-K2-Instruct", "BAAI/bge-m3",
]


def seed_shaped() -> dict[str, Any]:
    """Seed 000's deployment: 8 SiliconFlow models, each over the same 100 keys, as LiteLLM needs
    them (one model_list entry per key), usage-based routing, 3 retries, a master key."""
    entries = [
        {"model_name": model, "litellm_params": {
            "model": f"openai/{model}", "api_base": "https://api.siliconflow.cn/v1",
            "api_key": f"os.environ/SILICONFLOW_KEY_{k}", "rpm": 1000, "tpm": 50000,
        }}
        for model in SEED_MODELS for k in range(100)
    ]
    return {
        "model_list": entries,
        "router_settings": {"routing_strategy": "usage-based-routing-v2", "num_retries": 3},
        "general_settings": {"master_key": "sk-litellm-master-key-2024"},
    }


def environment(text: str) -> dict[str, str]:
    """A value for every ${VAR} the imported config names."""
    return {name: f"value-of-{name}" for name in re.findall(r"\$\{(\w+)\}", text)}


def test_the_seed_deployment_becomes_eight_models_of_one_100_key_pool_each() -> None:
    text = import_litellm(seed_shaped())
    config = config_from_dict(yaml.safe_load(text), environ=environment(text))
    assert [model.name for model in config.models] == SEED_MODELS
    for model in config.models:
        [deployment] = model.deployments
        assert len(deployment.api_keys) == 100
        assert deployment.model == model.name  # `openai/` taken off the upstream id
        assert (deployment.rpm, deployment.tpm) == (1000, 50000)
    assert config.routing.strategy == "usage-based"
    assert config.retry.attempts == 3
    assert "sk-litellm-master-key-2024" not in text  # the master key is a variable to set
    assert "set $MASTER_KEY_1 to it" in text


def test_the_forms_of_litellms_docs_are_carried_or_commented() -> None:
    data = {
        "model_list": [
            {"model_name": "gpt-4o", "litellm_params": {
                "model": "azure/gpt-4o-eu", "api_base": "https://eu.openai.azure.com",
                "api_key": "os.environ/AZURE_KEY_EU", "api_version": "2024-02-01", "order": 1, "weight": 2}},
            {"model_name": "gpt-4o", "litellm_params": {"model": "openai/gpt-4o", "api_key": "os.environ/OPENAI_KEY"},
             "rpm": 480, "model_info": {"input_cost_per_token": 0.0000025, "output_cost_per_token": 0.00001}},
            {"model_name": "vllm-model", "litellm_params": {
                "model": "hosted_vllm/facebook/opt-125m", "api_base": "http://vllm:8000/v1"}},
        ],
        "litellm_settings": {"num_retries": 2, "fallbacks": [{"gpt-4o": ["vllm-model"]}], "drop_params": True},
        "router_settings": {
            "routing_strategy": "latency-based-routing", "redis_host": "redis", "redis_port": 6380,
            "redis_password": "os.environ/REDIS_PASSWORD", "cooldown_time": 60, "model_group_alias": {},
        },
        "general_settings": {"master_key": "os.environ/MASTER", "database_url": "postgresql://x"},
    }
    text = import_litellm(data)
    config = config_from_dict(yaml.safe_load(text), environ=environment(text))
    gpt = config.model("gpt-4o")
    assert gpt is not None
    azure, openai = gpt.deployments
    assert (azure.base_url, azure.auth_header, azure.weight) == ("https://eu.openai.azure.com/openai/v1", "api-key", 2)
    assert (azure.priority, openai.priority) == (1, 0)  # LiteLLM's order: a tier
    assert (openai.base_url, openai.model, openai.rpm) == ("https://api.openai.com/v1", "gpt-4o", 480)
    assert gpt.pricing is not None and (gpt.pricing.input_per_1m, gpt.pricing.output_per_1m) == (2.5, 10.0)
    assert gpt.fallbacks == ("vllm-model",)
    assert config.model("vllm-model").deployments[0].model == "facebook/opt-125m"  # type: ignore[union-attr]
    assert config.routing.strategy == "latency-based"
    assert (config.retry.attempts, config.cooldown.seconds) == (2, 60)
    assert (config.limits.backend, config.limits.redis_url) == ("redis", "redis://:value-of-REDIS_PASSWORD@redis:6380/0")
    for carried_as_comment in ("api_version", "drop_params", "model_group_alias", "database_url"):
        assert f".{carried_as_comment}: " in text, carried_as_comment


@pytest.mark.parametrize("data", [None, {}, {"model_list": []}, ["x"]])
def test_anything_without_a_model_list_is_refused(data: Any) -> None:
    with pytest.raises(ValueError, match="no model_list"):
        import_litellm(data)


def test_the_command_prints_a_config_that_check_accepts(tmp_path: Path) -> None:
    source = tmp_path / "config.yaml"
    source.write_text(yaml.safe_dump(seed_shaped()))
    imported = subprocess.run([sys.executable, "-m", "proxykit", "import-litellm", str(source)],
                              capture_output=True, text=True, timeout=60)
    assert imported.returncode == 0, imported.stderr
    target = tmp_path / "proxykit.yaml"
    target.write_text(imported.stdout)
    checked = subprocess.run([sys.executable, "-m", "proxykit", "check", str(target)], capture_output=True,
                             text=True, timeout=60, env={**environment(imported.stdout), "PATH": "/usr/bin:/bin"})
    assert checked.returncode == 0, checked.stderr
    assert "8 models, 8 deployments, 800 upstream keys, 1 client keys (auth on)" in checked.stdout
    missing = subprocess.run([sys.executable, "-m", "proxykit", "import-litellm", str(tmp_path / "none.yaml")],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2
