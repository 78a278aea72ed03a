"""The least any Python relay can do, for calibration: bytes from socket to socket on uvloop, no HTTP.

    python -m tests.benchmarks.splice_proxy --port 4003 --upstream 127.0.0.1:8001

Each client connection gets its own upstream connection, and whatever one side reads is written
to the other at once. It shows what the machine allows a proxy written in Python: in the
non-streaming table the most requests a second any relay on this core can pass, in the streaming
one whether its core can relay the load one event at a time, whatever a proxy's own code costs.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import cast

import uvloop


class _Side(asyncio.Protocol):
    """One end of a spliced connection: what it reads goes out of the other end."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.other: _Side | None = None
        self.early: list[bytes] = []  # read before the other end was connected

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no asyncio.Transport

    @property
    def other_end(self) -> asyncio.Transport | None:
        """The other end's transport, while it is connected."""
        return self.other.transport if self.other is not None else None

    def data_received(self, data: bytes) -> None:
        if (other_end := self.other_end) is not None:
            other_end.write(data)
        else:
            self.early.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if (other_end := self.other_end) is not None:
            other_end.close()

    # The other end reads no faster than this end can write.
    def pause_writing(self) -> None:
        if (other_end := self.other_end) is not None:
            other_end.pause_reading()

    def resume_writing(self) -> None:
        if (other_end := self.other_end) is not None:
            other_end.resume_reading()


class _ClientSide(_Side):
    def __init__(self, upstream: tuple[str, int]) -> None:
        super().__init__()
        self.upstream = upstream
        self.connecting: asyncio.Task[None] | None = None  # held: the loop keeps only a weak reference

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.connecting = asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        upstream = _Side()
        try:
            await asyncio.get_running_loop().create_connection(lambda: upstream, *self.upstream)
        except OSError:
            if self.transport is not None:
                self.transport.close()
            return
        assert upstream.transport is not None
        if self.transport is None:  # the client left meanwhile
            upstream.transport.close()
            return
        self.other, upstream.other = upstream, self
        upstream.transport.writelines(self.early)
        self.transport.writelines(upstream.early)
        self.early, upstream.early = [], []


async def serve(port: int, upstream: tuple[str, int]) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _ClientSide(upstream), "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="host:port")
    args = parser.parse_args()
    host, _, port = args.upstream.rpartition(":")
    uvloop.run(serve(args.port, (host, int(port))))


if __name__ == "__main__":
    main()
