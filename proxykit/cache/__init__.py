"""The exact-match response cache: what an entry and its key are, and the request's
`Cache-Control` (`base`); entries in this process, least recently used out first (`memory`), or
in Redis, shared by replicas (`redis`). Knows nothing of ASGI."""
