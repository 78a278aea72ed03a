"""The cost of one key choice (choose + release) per routing strategy, among 10 and 1,000 keys.

    python -m tests.benchmarks.key_choice
"""

from __future__ import annotations

import time

from proxykit import KeyPool, config_from_dict
from proxykit.config import ROUTING_STRATEGIES
from proxykit.outcomes import Outcome

ROUNDS = 100_000


def pool(strategy: str, keys: int) -> KeyPool:
    deployments = [
        {"base_url": f"http://d{d}/v1", "name": f"d{d}", "rpm": 10**9,
         "api_keys": [f"sk-{d}-{i}" for i in range(keys // 10 or 1)]}
        for d in range(min(keys, 10))
    ]
    return KeyPool(config_from_dict({"models": [{"name": "m", "deployments": deployments}],
                                     "routing": {"strategy": strategy}}))


def microseconds_per_choice(strategy: str, keys: int) -> float:
    key_pool = pool(strategy, keys)
    start = time.perf_counter()
    for _ in range(ROUNDS):
        state = key_pool.choose("m")
        assert state is not None
        key_pool.record(state, Outcome.OK, ttfb=0.01)
        key_pool.release(state)
    return (time.perf_counter() - start) / ROUNDS * 1e6


def main() -> None:
    print("| strategy | 10 keys (µs) | 1,000 keys (µs) |")
    print("|---|---|---|")
    for strategy in ROUTING_STRATEGIES:
        small, large = microseconds_per_choice(strategy, 10), microseconds_per_choice(strategy, 1000)
        print(f"| {strategy} | {small:.2f} | {large:.2f} |")


if __name__ == "__main__":
    main()
