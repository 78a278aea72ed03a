"""A raw-socket upstream for byte-level faults a real server would never send, and helpers to
read a process's memory.

    async with raw_upstream() as base:      # http://127.0.0.1:PORT
        ... base_url = f"{base}/huge-headers/v1" ...
"""

from __future__ import annotations

import asyncio
import contextlib
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import anyio

MiB = 1024 * 1024
OK_BODY = b'{"id": "x", "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}'

Behaviour = Callable[[asyncio.StreamWriter, bytes], Awaitable[None]]


def peak_rss_kib(pid: int) -> int:
    """The peak resident set size of a process (VmHWM), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM line")


async def _ok(writer: asyncio.StreamWriter, head: bytes) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                 % (len(OK_BODY), OK_BODY))


async def _huge_headers(writer: asyncio.StreamWriter, head: bytes) -> None:
    """64 MiB of response headers, a MiB at a time, until the proxy stops reading."""
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n")
    line = b"x-padding: " + b"a" * 1000 + b"\r\n"
    for _ in range(64):
        writer.write(line * 1024)
        await writer.drain()
    writer.write(b"content-length: 2\r\n\r\n{}")


async def _one_long_line(writer: asyncio.StreamWriter, head: bytes) -> None:
    """An event stream whose one line is 32 MiB long, ended by the connection's close."""
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\ndata: ")
    piece = b"a" * MiB
    for _ in range(32):
        writer.write(piece)
        await writer.drain()
    writer.write(b"\n\ndata: [DONE]\n\n")


def gzip_bomb(inflated: int) -> bytes:
    """A gzip body of a JSON string `inflated` bytes long: a few hundred KiB on the wire."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    parts = [compressor.compress(b'{"padding": "')]
    zeros = b"0" * MiB
    parts += [compressor.compress(zeros) for _ in range(inflated // MiB)]
    parts += [compressor.compress(b'"}'), compressor.flush()]
    return b"".join(parts)


_BOMB: list[bytes] = []


async def _gzip_bomb(writer: asyncio.StreamWriter, head: bytes) -> None:
    if not _BOMB:
        _BOMB.append(gzip_bomb(256 * MiB))
    body = _BOMB[0]
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-encoding: gzip\r\n"
                 b"content-length: %d\r\n\r\n" % len(body) + body)


async def _switching_protocols(writer: asyncio.StreamWriter, head: bytes) -> None:
    writer.write(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: something\r\nconnection: upgrade\r\n\r\n\x00\x01\x02")


BEHAVIOURS: dict[bytes, Behaviour] = {
    b"/ok": _ok,
    b"/huge-headers": _huge_headers,
    b"/long-line": _one_long_line,
    b"/gzip-bomb": _gzip_bomb,
    b"/switching": _switching_protocols,
}


async def _serve_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await reader.readexactly(length)
            path = head.split(b" ", 2)[1]
            behaviour = next((b for prefix, b in BEHAVIOURS.items() if path.startswith(prefix)), _ok)
            await behaviour(writer, head)
            await writer.drain()
            if behaviour is not _ok:
                break
    writer.close()


@asynccontextmanager
async def raw_upstream() -> AsyncIterator[str]:
    server = await asyncio.start_server(_serve_one, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()


async def raw_request(url: str, data: bytes, *, read_timeout: float = 10.0) -> bytes:
    """Sends `data` as it is, then reads until the server closes (or `read_timeout`)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    answer = b""
    try:
        writer.write(data)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
            with anyio.move_on_after(read_timeout):
                while chunk := await reader.read(65536):
                    answer += chunk
    finally:
        writer.close()
    return answer
