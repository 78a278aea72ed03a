"""Upstream keys: the state of each (`state`), the pool that chooses one per attempt and learns
from the answer (`pool`, `choice`), the routing strategies as heap priorities (`strategies`), and
the background upkeep that probes set-aside keys and re-reads key files (`upkeep`). Knows nothing
of ASGI."""
