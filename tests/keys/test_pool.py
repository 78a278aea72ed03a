"""The key pool on its own: strategies, cooldowns and rate-limit headers, with an injected clock."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from proxykit import KeyPool, config_from_dict
from proxykit.durations import reset_duration
from proxykit.keys.state import KeyState, KeyStatus
from proxykit.outcomes import Outcome


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def pool(strategy: str = "round-robin", *, deployments: list[dict[str, Any]] | None = None,
         **overrides: Any) -> tuple[KeyPool, Clock]:
    deployments = deployments or [{"base_url": "http://x/v1", "api_keys": ["a", "b", "c", "d"]}]
    config = config_from_dict({"models": [{"name": "m", "deployments": deployments}],
                               "routing": {"strategy": strategy}, **overrides})
    clock = Clock()
    return KeyPool(config, clock=clock), clock


def take(keys: KeyPool, n: int, *, release: bool = True) -> Counter[str]:
    used: Counter[str] = Counter()
    for _ in range(n):
        state = keys.choose("m")
        assert state is not None
        used[state.alias] += 1
        if release:
            keys.release(state)
    return used


def test_round_robin_cycles_in_order() -> None:
    keys, _ = pool()
    order = []
    for _ in range(8):
        state = keys.choose("m")
        assert state is not None
        order.append(state.alias)
        keys.release(state)
    assert order == ["m#0", "m#1", "m#2", "m#3"] * 2


def test_weighted_follows_deployment_weights() -> None:
    deployments = [
        {"base_url": "http://a/v1", "name": "heavy", "api_keys": ["a1", "a2"], "weight": 3},
        {"base_url": "http://b/v1", "name": "light", "api_keys": ["b1"], "weight": 1},
    ]
    keys, _ = pool("weighted", deployments=deployments)
    used = take(keys, 400)
    assert used["heavy#0"] + used["heavy#1"] == 300
    assert used["light#0"] == 100
    assert used["heavy#0"] == used["heavy#1"]


def test_least_busy_prefers_the_key_with_fewest_requests_in_flight() -> None:
    keys, _ = pool("least-busy")
    held = [keys.choose("m") for _ in range(4)]  # one in flight on each key
    busy = held[0]
    assert busy is not None
    extra = keys.choose("m")  # now m#0 has two
    assert extra is busy
    for state in held[1:]:
        assert state is not None
        keys.release(state)
    assert {keys.choose("m") for _ in range(3)} & {busy} == set()


def test_latency_based_prefers_the_fast_band_and_spreads_within_it() -> None:
    keys, _ = pool("latency-based")
    for state, ttfb in zip(list(keys.all_keys()), [0.050, 0.052, 0.400, 0.900], strict=True):
        keys.record(state, Outcome.OK, ttfb=ttfb)
        keys.release(_acquired(state))  # as after a real attempt: the key is ranked anew
    used = take(keys, 20)
    assert set(used) == {"m#0", "m#1"}
    assert used["m#0"] == used["m#1"] == 10


def _acquired(state: KeyState) -> KeyState:
    """Pretend `state` was chosen, so that `release` can rank it anew."""
    state.in_flight += 1
    return state


def test_usage_based_spreads_by_share_of_rpm() -> None:
    deployments = [
        {"base_url": "http://a/v1", "name": "big", "api_keys": ["a"], "rpm": 300},
        {"base_url": "http://b/v1", "name": "small", "api_keys": ["b"], "rpm": 100},
    ]
    keys, _ = pool("usage-based", deployments=deployments)
    used = take(keys, 200)
    assert used == {"big#0": 150, "small#0": 50}


def test_429_rests_for_retry_after_then_the_key_comes_back() -> None:
    keys, clock = pool()
    first = keys.choose("m")
    assert first is not None
    assert keys.record(first, Outcome.HTTP_429, {"retry-after": "12"}) == "429"
    keys.release(first)
    assert first.status(clock.now) is KeyStatus.RESTING
    assert first.alias not in take(keys, 6)
    clock.now += 12.5
    assert first.alias in take(keys, 4)


def test_429_without_retry_after_rests_for_on_429() -> None:
    keys, clock = pool(cooldown={"on_429": 5})
    first = keys.choose("m")
    assert first is not None
    keys.record(first, Outcome.HTTP_429, {})
    assert first.until == pytest.approx(clock.now + 5)


def test_repeated_failures_rest_a_key_and_success_resets_the_count() -> None:
    keys, clock = pool(cooldown={"after_failures": 2, "seconds": 7})
    state = next(iter(keys.all_keys()))
    assert keys.record(state, Outcome.HTTP_5XX) is None
    keys.record(state, Outcome.OK)
    assert keys.record(state, Outcome.CONNECT_ERROR) is None  # the count started again
    assert keys.record(state, Outcome.TIMEOUT) == "failures"
    assert state.until == pytest.approx(clock.now + 7)


def test_auth_error_sets_a_key_aside_until_it_is_probed() -> None:
    keys, clock = pool(cooldown={"on_auth_error": 100})
    state = next(iter(keys.all_keys()))
    keys.record(state, Outcome.AUTH_ERROR)
    clock.now += 101
    assert state.status(clock.now) is KeyStatus.SET_ASIDE  # time alone does not bring it back
    assert keys.due_for_probe() == [state]
    keys.recovered(state)
    assert state.status(clock.now) is KeyStatus.AVAILABLE
    assert state.alias in take(keys, 4)


def test_no_key_explains_why_and_when() -> None:
    keys, _ = pool(deployments=[{"base_url": "http://x/v1", "api_keys": ["a", "b"]}])
    for state, wait in zip(list(keys.all_keys()), ["20", "8"], strict=True):
        keys.record(state, Outcome.HTTP_429, {"retry-after": wait})
    assert keys.choose("m") is None
    why = keys.why_none("m")
    assert (why.total, why.reasons) == (2, ("429",))
    assert why.retry_after == pytest.approx(8)


def test_excluded_keys_and_deployments_are_skipped_but_kept() -> None:
    deployments = [{"base_url": "http://a/v1", "name": "a", "api_keys": ["a1", "a2"]},
                   {"base_url": "http://b/v1", "name": "b", "api_keys": ["b1"]}]
    keys, _ = pool(deployments=deployments)
    tried = keys.choose("m")
    assert tried is not None and tried.alias == "a#0"
    other = keys.choose("m", exclude=[tried], skip_deployments={"b"})
    assert other is not None and other.alias == "a#1"
    assert keys.choose("m", exclude=[tried, other], skip_deployments={"b"}) is None
    assert tried.alias in take(keys, 3)  # skipping did not drop it from rotation


@pytest.mark.parametrize(
    ("headers", "rests_for"),
    [
        pytest.param({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "6m0s"}, 360, id="requests"),
        pytest.param({"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "250ms"}, 0.25, id="tokens"),
        pytest.param({"x-ratelimit-remaining-requests": "3"}, None, id="not-dry"),
    ],
)
def test_rate_limit_headers_rest_a_dry_key(headers: dict[str, str], rests_for: float | None) -> None:
    keys, clock = pool()
    state = next(iter(keys.all_keys()))
    reason = keys.record(state, Outcome.OK, headers)
    if rests_for is None:
        assert reason is None and state.status(clock.now) is KeyStatus.AVAILABLE
    else:
        assert reason == "exhausted"
        assert state.until == pytest.approx(clock.now + rests_for)


def test_low_remaining_share_ranks_a_key_behind_fresh_ones() -> None:
    keys, _ = pool("usage-based")
    state = next(iter(keys.all_keys()))
    keys.record(state, Outcome.OK, {"x-ratelimit-remaining-requests": "1", "x-ratelimit-limit-requests": "100"})
    keys.release(_acquired(state))
    assert state.alias not in take(keys, 3)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1s", 1.0), ("6m0s", 360.0), ("20ms", 0.02), ("1h2m3.5s", 3723.5), ("17", 17.0), ("soon", None), ("5x", None)],
)
def test_reset_durations(text: str, seconds: float | None) -> None:
    assert reset_duration(text) == (pytest.approx(seconds) if seconds is not None else None)


@pytest.mark.parametrize("headers", [
    pytest.param({"retry-after": "1e300"}, id="retry-after-1e300"),
    pytest.param({"retry-after-ms": "9" * 400}, id="retry-after-ms-400-digits"),
    pytest.param({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "9" * 400 + "s"}, id="reset"),
    pytest.param({"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "1e300m"}, id="reset-units"),
])
def test_a_rest_from_an_upstream_header_lasts_a_day_at_most(headers: dict[str, str]) -> None:
    keys, clock = pool()
    state = keys.choose("m")
    assert state is not None
    outcome = Outcome.HTTP_429 if "retry-after" in next(iter(headers)) else Outcome.OK
    keys.record(state, outcome, headers)
    assert clock.now < state.until <= clock.now + 86_400


def test_a_new_config_keeps_the_state_of_keys_that_stay_wherever_they_moved() -> None:
    keys, clock = pool("round-robin")
    resting = keys.choose("m")
    assert resting is not None and resting.alias == "m#0"
    keys.record(resting, Outcome.HTTP_429, {"retry-after": "30"})
    busy = keys.choose("m")
    assert busy is not None and busy.alias == "m#1"  # in flight across the swap
    gone = next(state for state in keys.all_keys() if state.secret == "d")
    new = config_from_dict({"models": [{"name": "m", "deployments": [
        {"base_url": "http://x/v1", "api_keys": ["e", "c", "b", "a"]}]}], "routing": {"strategy": "least-busy"}})
    assert keys.update(new) == (1, 1)
    moved = {state.secret: state for state in keys.all_keys()}
    assert moved["a"] is resting and moved["a"].alias == "m#3"  # the secret's state, at its new index
    assert moved["a"].status(clock.now) is KeyStatus.RESTING and moved["b"].in_flight == 1
    assert gone.retired and "d" not in moved
    keys.release(busy)  # the request that started before the swap ends after it
    keys.release(gone)  # a retired key's request ends too: no error, it ranks nowhere
    chosen = {keys.choose("m").alias for _ in range(3)}  # type: ignore[union-attr]
    assert chosen == {"m#0", "m#1", "m#2"}  # the resting key stays out
    clock.now += 31
    assert "m#3" in {keys.choose("m").alias for _ in range(4)}  # type: ignore[union-attr]


def test_a_higher_tier_serves_only_while_no_lower_tier_key_is_available() -> None:
    keys, clock = pool("round-robin", deployments=[
        {"base_url": "http://backup/v1", "name": "backup", "api_keys": ["z"], "priority": 1},
        {"base_url": "http://main/v1", "name": "main", "api_keys": ["a", "b"]},
    ])
    assert set(take(keys, 6)) == {"main#0", "main#1"}
    for _ in range(2):
        state = keys.choose("m")
        assert state is not None and state.deployment.name == "main"
        keys.record(state, Outcome.HTTP_429, {"retry-after": "10"})
        keys.release(state)
    assert take(keys, 3) == Counter({"backup#0": 3})
    clock.now += 11
    assert set(take(keys, 4)) == {"main#0", "main#1"}


def test_a_disabled_key_is_never_chosen_until_enabled() -> None:
    keys, _ = pool("round-robin")
    state = next(iter(keys.all_keys()))
    keys.disable(state, True)
    assert state.status(0) is KeyStatus.SET_ASIDE and "m#0" not in take(keys, 8)
    assert state not in keys.due_for_probe()  # not probed back in: an operator put it aside
    keys.disable(state, False)
    assert "m#0" in take(keys, 4)
