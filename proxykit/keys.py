"""The upstream keys of each model and the order in which they are handed out."""

from __future__ import annotations

from itertools import cycle

from proxykit.config import Config, Deployment, UpstreamKey

Route = tuple[Deployment, UpstreamKey]


class KeyPool:
    """Every upstream key of every model, each model's keys taken in turn across its deployments.

        pool = KeyPool(config)
        deployment, key = pool.next_route("deepseek-ai/DeepSeek-V3")
    """

    def __init__(self, config: Config) -> None:
        self._turns = {
            model.name: cycle(_interleaved(model.deployments)) for model in config.models
        }
        self._deployments = {
            deployment.name: deployment for model in config.models for deployment in model.deployments
        }

    def next_route(self, model: str) -> Route:
        return next(self._turns[model])

    def deployment(self, name: str) -> Deployment:
        return self._deployments[name]


def _interleaved(deployments: tuple[Deployment, ...]) -> list[Route]:
    """d0#0, d1#0, d0#1, d1#1, ...: consecutive requests alternate between deployments."""
    longest = max(len(deployment.api_keys) for deployment in deployments)
    return [
        (deployment, deployment.api_keys[i])
        for i in range(longest) for deployment in deployments if i < len(deployment.api_keys)
    ]
