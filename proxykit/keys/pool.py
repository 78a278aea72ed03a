"""The key pool: every upstream key of every model, the choice of one for each attempt, and what
each answer does to its key (cooldowns, rate-limit headers, latency).

Each model keeps its keys in a lazy min-heap ordered by the routing strategy's priority, so a
choice costs O(log n) in the number of keys. A key that rests leaves the heap and comes back
when its time is up; a set-aside key comes back only after a successful probe.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Iterable, Mapping, Set
from dataclasses import replace

from proxykit.config import Config, CooldownConfig, ModelConfig, UpstreamKey
from proxykit.durations import number, reset_duration, retry_after
from proxykit.keys.state import KeyState, KeyStatus, NoKey, interval, room_in
from proxykit.keys.strategies import PRIORITIES, RANK_ON_RELEASE, Priority
from proxykit.outcomes import Outcome, RestReason

Clock = Callable[[], float]
_FAILURES = frozenset({Outcome.HTTP_5XX, Outcome.CONNECT_ERROR, Outcome.TIMEOUT})  # count towards a rest
_LATENCY_ALPHA = 0.3  # weight of the newest TTFB in the moving average


class ModelKeys:
    """The keys of one model entry, with the heap that orders them."""

    def __init__(
        self, model: ModelConfig, priority: Priority, clock: Clock,
        existing: Mapping[tuple[str, str], KeyState] | None = None,
    ) -> None:
        """`existing`: states by (deployment name, secret) that carry over, as they are."""
        self.model = model
        tiers = {deployment.priority for deployment in model.deployments}
        # Tiers come first in the heap's order: a key of a higher tier is popped only when no
        # key of a lower tier is available (resting keys are not in the heap at all).
        self.priority = priority if len(tiers) == 1 else _tiered(priority)
        self.clock = clock
        self._sequence = 0
        self._pushes = 0
        existing = existing or {}
        by_deployment: dict[str, list[KeyState]] = {}
        for deployment in model.deployments:
            states = by_deployment.setdefault(deployment.name, [])
            for key in deployment.api_keys:
                state = existing.get((deployment.name, key.secret))
                if state is None:
                    state = KeyState(deployment, key)
                else:
                    state.deployment, state.key, state.retired = deployment, key, False
                    state.version += 1  # entries in the old heap are stale
                    state.in_heap = False
                states.append(state)
        # Least recently used first, across the swap: the sequence goes on from the keys that stay.
        self._sequence = max((state.last_used for states in by_deployment.values() for state in states), default=0)
        self._build(by_deployment)

    def _build(self, by_deployment: dict[str, list[KeyState]]) -> None:
        # Interleaved (d0#0, d1#0, d0#1, ...), so that among equals consecutive choices alternate
        # between deployments.
        groups = list(by_deployment.values())
        longest = max(map(len, groups), default=0)
        self.keys = [group[i] for i in range(longest) for group in groups if i < len(group)]
        self._weights = {
            name: group[0].deployment.weight / len(group) for name, group in by_deployment.items() if group
        }
        # (priority, last_used, push number, version, key): the push number keeps entries unique,
        # so the key itself is never compared.
        self._heap: list[tuple[tuple[float, ...], int, int, int, KeyState]] = []
        self._resting: list[tuple[float, int, KeyState]] = []  # by `until`
        for state in self.keys:
            self.changed(state)

    def replace_keys(self, deployment_name: str, keys: list[UpstreamKey]) -> tuple[list[KeyState], list[KeyState]]:
        """Swap one deployment's keys; a key that stays (same secret) keeps its state.
        Returns the states added and the states retired."""
        by_deployment: dict[str, list[KeyState]] = {}
        for state in self.keys:
            by_deployment.setdefault(state.deployment.name, []).append(state)
        old = by_deployment.get(deployment_name, [])
        deployment = replace(old[0].deployment, api_keys=tuple(keys))
        kept: dict[str, KeyState | None] = {state.secret: state for state in old}
        states = []
        for key in keys:
            state = kept.pop(key.secret, None) or KeyState(deployment, key)
            state.deployment, state.key = deployment, key
            states.append(state)
        retired = [state for state in kept.values() if state is not None]
        for state in retired:
            state.retired = True
        by_deployment[deployment_name] = states
        added = [state for state in states if state not in old]
        self._build(by_deployment)
        return added, retired

    def choose(self, exclude: Iterable[KeyState] = (), skip_deployments: Set[str] = frozenset()) -> KeyState | None:
        now = self.clock()
        self._wake(now)
        skipped = []
        excluded = set(map(id, exclude)) if exclude else ()
        chosen = None
        while self._heap:
            _, _, _, version, state = heapq.heappop(self._heap)
            if version != state.version:
                continue  # stale: the key was pushed again with a newer priority
            state.in_heap = False
            if state.status(now) is not KeyStatus.AVAILABLE:
                continue  # back in the heap when it wakes
            if id(state) in excluded or state.deployment.name in skip_deployments or not state.has_room(now):
                skipped.append(state)
                continue
            chosen = state
            break
        for state in skipped:
            self._push(state)
        if chosen is not None:
            self._use(chosen, now)
        return chosen

    def why_none(self) -> NoKey:
        now = self.clock()
        waits = [state.until - now for state in self.keys if not state.set_aside and state.until > now]
        full = [room_in(state, now) for state in self.keys if state.status(now) is KeyStatus.AVAILABLE]
        reasons = {
            state.reason or RestReason.RESTING for state in self.keys if state.status(now) is not KeyStatus.AVAILABLE
        }
        if full:
            reasons.add(RestReason.FULL)
        return NoKey(self.model.name, len(self.keys), tuple(sorted(reasons)), min(waits + full, default=60.0))

    def _use(self, state: KeyState, now: float) -> None:
        self._sequence += 1
        state.last_used = self._sequence
        state.in_flight += 1
        state.request_tat = max(state.request_tat, now) + interval(state.deployment.rpm)
        state.stride_pass += 1.0 / max(self._weights[state.deployment.name], 1e-9)
        self._push(state)

    def _push(self, state: KeyState) -> None:
        state.version += 1
        state.in_heap = True
        self._pushes += 1
        heapq.heappush(self._heap, (self.priority(state), state.last_used, self._pushes, state.version, state))
        if len(self._heap) > 4 * len(self.keys) + 64:  # drop stale entries now and then
            self._heap = [entry for entry in self._heap if entry[3] == entry[4].version]
            heapq.heapify(self._heap)

    def changed(self, state: KeyState) -> None:
        """Re-rank a key after its priority inputs changed; a resting key waits for its wake-up."""
        if state.retired:
            return
        now = self.clock()
        status = state.status(now)
        if status is KeyStatus.AVAILABLE:
            self._push(state)
        elif status is KeyStatus.RESTING:
            state.version += 1  # its heap entries are stale now
            state.in_heap = False
            heapq.heappush(self._resting, (state.until, id(state), state))

    def _wake(self, now: float) -> None:
        while self._resting and self._resting[0][0] <= now:
            _, _, state = heapq.heappop(self._resting)
            if state.status(now) is KeyStatus.AVAILABLE and not state.in_heap:
                state.reason = None
                self._push(state)


class KeyPool:
    """Every upstream key of every model, and what happens to a key after each attempt.

        pool = KeyPool(config)
        state = pool.choose("deepseek-ai/DeepSeek-V3", exclude=tried)
        pool.record(state, status=429, headers=response_headers)
    """

    def __init__(self, config: Config, *, clock: Clock = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self.models: dict[str, ModelKeys] = {}
        self._owner: dict[int, ModelKeys] = {}
        self.on_rest: Callable[[KeyState], None] | None = None  # told when a key rests or is set aside
        self.unhealthy: set[str] = set()  # deployments active health checks failed (keys/health.py)
        self.update(config)

    def update(self, config: Config) -> tuple[int, int]:
        """Takes a new config: a key that stays (same deployment name, same secret) keeps its
        state (a rest, its usage, requests in flight), wherever it moved in its list; a key that
        goes is retired and finishes what it does. Returns (added, retired)."""
        existing = {(state.deployment.name, state.secret): state for state in self.all_keys()}
        priority = PRIORITIES[config.routing.strategy]
        models = {model.name: ModelKeys(model, priority, self.clock, existing) for model in config.models}
        kept = {id(state) for keys in models.values() for state in keys.keys}
        retired = [state for state in existing.values() if id(state) not in kept]
        for state in retired:
            state.retired = True
        self.config, self.models = config, models
        self._rank_on_release = config.routing.strategy in RANK_ON_RELEASE
        self._owner = {id(state): keys for keys in models.values() for state in keys.keys}
        return len(kept) - (len(existing) - len(retired)), len(retired)

    def disable(self, state: KeyState, disabled: bool) -> None:
        """Takes a key out of rotation (an operator's choice), or puts it back."""
        if state.disabled == disabled:
            return
        state.disabled = disabled
        state.reason = RestReason.DISABLED if disabled else None
        self._changed(state)

    def choose(
        self, model: str, exclude: Iterable[KeyState] = (), skip_deployments: Set[str] = frozenset()
    ) -> KeyState | None:
        """A key of `model`'s own deployments, or None when none is available. A deployment that
        failed its health checks is skipped while the model has a healthy one."""
        keys = self.models[model]
        if self.unhealthy:
            sick = {d.name for d in keys.model.deployments if d.name in self.unhealthy}
            if sick and len(sick) < len(keys.model.deployments):
                skip_deployments = {*skip_deployments, *sick}
        return keys.choose(exclude, skip_deployments)

    def why_none(self, model: str) -> NoKey:
        return self.models[model].why_none()

    def release(self, state: KeyState) -> None:
        """The attempt that `choose` started has ended."""
        state.in_flight -= 1
        if self._rank_on_release:
            self._changed(state)

    def record(self, state: KeyState, outcome: Outcome, headers: Mapping[str, str] | None = None,
               ttfb: float | None = None) -> RestReason | None:
        """Apply an attempt's outcome to its key; returns the new rest reason, if it was put to rest."""
        cooldown: CooldownConfig = self.config.cooldown
        now = self.clock()
        headers = headers or {}
        reason = None
        if outcome == Outcome.HTTP_429:
            reason = RestReason.RATE_LIMITED
            state.until = now + (retry_after(headers) or cooldown.on_429)
        elif outcome == Outcome.AUTH_ERROR:
            reason = RestReason.AUTH_ERROR
            state.until, state.set_aside = now + cooldown.on_auth_error, True
        elif outcome in _FAILURES:
            state.failures += 1
            if state.failures >= cooldown.after_failures:
                reason, state.failures = RestReason.FAILURES, 0
                state.until = now + cooldown.seconds
        else:
            state.failures = 0
            if ttfb is not None:
                state.ttfb = ttfb if state.ttfb is None else (1 - _LATENCY_ALPHA) * state.ttfb + _LATENCY_ALPHA * ttfb
            if headers:
                reason = _apply_rate_limit_headers(state, headers, now)
                if not reason:
                    self._changed(state)  # the usage they report may rank it lower
        if reason:
            state.reason = reason
            self._changed(state)
            if self.on_rest is not None:
                self.on_rest(state)
        return reason

    def mark_full(self, state: KeyState, seconds: float) -> None:
        """The key's shared bucket is full for `seconds`: no choice here until then either."""
        now = self.clock()
        state.request_tat = max(state.request_tat, now + seconds + 60.0 - interval(state.deployment.rpm))
        self._changed(state)

    def rest_until(self, state: KeyState, until: float, *, reason: RestReason | None, set_aside: bool) -> None:
        """A rest decided elsewhere (another replica): applied when it ends later than ours."""
        if until <= state.until and (state.set_aside or not set_aside):
            return
        state.until, state.reason = max(until, state.until), reason or state.reason
        state.set_aside = state.set_aside or set_aside
        self._changed(state)

    def replace_keys(self, deployment_name: str, secrets: list[str]) -> tuple[int, int]:
        """New keys for a deployment (a re-read key file); returns (added, removed)."""
        for keys in self.models.values():
            if any(state.deployment.name == deployment_name for state in keys.keys):
                upstream_keys = [UpstreamKey(f"{deployment_name}#{i}", secret) for i, secret in enumerate(secrets)]
                added, retired = keys.replace_keys(deployment_name, upstream_keys)
                for state in added:
                    self._owner[id(state)] = keys
                return len(added), len(retired)
        raise KeyError(deployment_name)

    def recovered(self, state: KeyState) -> None:
        """A set-aside key passed its probe: back into rotation."""
        state.set_aside, state.until, state.failures = False, 0.0, 0
        state.reason = RestReason.DISABLED if state.disabled else None
        self._changed(state)

    def _changed(self, state: KeyState) -> None:
        owner = self._owner.get(id(state))
        if owner is not None:  # a retired key (its config changed under a request) ranks nowhere
            owner.changed(state)

    def postpone(self, state: KeyState, seconds: float) -> None:
        """A set-aside key whose probe could not run: probe it again later."""
        state.until = self.clock() + seconds

    def due_for_probe(self) -> list[KeyState]:
        now = self.clock()
        return [state for keys in self.models.values() for state in keys.keys
                if state.set_aside and not state.disabled and state.until <= now]

    def all_keys(self) -> Iterable[KeyState]:
        for keys in self.models.values():
            yield from keys.keys


def _tiered(priority: Priority) -> Priority:
    def tiered(state: KeyState) -> tuple[float, ...]:
        return (state.deployment.priority, *priority(state))

    return tiered


def _apply_rate_limit_headers(state: KeyState, headers: Mapping[str, str], now: float) -> RestReason | None:
    """Read the upstream's `x-ratelimit-*` headers, so a key about to run dry is avoided before it 429s."""
    for kind in ("requests", "tokens"):
        remaining = number(headers.get(f"x-ratelimit-remaining-{kind}"))
        if remaining is None:
            continue
        if remaining <= 0:
            state.until = now + (reset_duration(headers.get(f"x-ratelimit-reset-{kind}")) or 1.0)
            return RestReason.EXHAUSTED
        limit = number(headers.get(f"x-ratelimit-limit-{kind}"))
        if limit:
            used_share = max(0.0, 1.0 - remaining / limit)
            if kind == "requests":
                state.request_tat = max(state.request_tat, now + 60.0 * used_share - 60.0 / max(limit, 1))
            else:
                state.token_tat = max(state.token_tat, now + 60.0 * used_share)
    return None
