"""A FastAPI app that serves its own routes and mounts proxykit at /llm.

Run the demo upstream, then this app:

    python -m uvicorn proxykit.demo:DemoUpstream --factory --port 8001 &
    python -m uvicorn examples.fastapi_app:app --port 8000
    curl localhost:8000/llm/v1/chat/completions -H 'content-type: application/json' \
        -d '{"model": "demo-chat", "messages": [{"role": "user", "content": "hi"}]}'

PROXYKIT_CONFIG names another config file.
"""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import FastAPI

import proxykit

DEFAULT_CONFIG = Path(__file__).with_name("local.yaml")


def build_app(config_path: str | os.PathLike[str]) -> FastAPI:
    llm = proxykit.create_app(config_path)
    # Starlette and FastAPI do not run a mounted app's lifespan: hand proxykit's to the host, so
    # its HTTP client opens at start and closes at shutdown (without this, the first request
    # opens it and logs a warning).
    app = FastAPI(lifespan=llm.router.lifespan_context)

    @app.get("/hello")
    async def hello() -> dict[str, str]:
        return {"hello": "from the host app"}

    app.mount("/llm", llm)
    return app


app = build_app(os.environ.get("PROXYKIT_CONFIG", DEFAULT_CONFIG))
