"""Rate limits: the `RateLimiter` protocol and its in-memory GCRA buckets (`base`), and the Redis
backend shared by replicas, which also shares key rests (`redis`). Knows nothing of ASGI."""
