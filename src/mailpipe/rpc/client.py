"""A Goridge RPC client: what the `roadrunner` jobs driver pushes with, and what a Python
program can call mailpipe's (or RoadRunner's) RPC endpoint with."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from mailpipe.config import parse_listen
from mailpipe.rpc.codec import CODEC_PROTO, Call, encode_call, parse_call
from mailpipe.rpc.registry import RPCError
from mailpipe.workers.goridge import FrameError, read_frame


class RPCClient:
    """One connection; calls go one at a time, in order (as PHP's client sends them)."""

    def __init__(self, address: str, *, timeout: float = 10.0) -> None:
        self.address = address
        self.timeout = timeout
        self._seq = 0
        self._lock = asyncio.Lock()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    @property
    def connected(self) -> bool:
        return self._writer is not None and not self._writer.is_closing()

    async def connect(self) -> None:
        if self.connected:
            return
        host, port = parse_listen(self.address)
        opening = (asyncio.open_unix_connection(str(port)) if host == "unix"
                   else asyncio.open_connection(host, int(port)))
        self._reader, self._writer = await asyncio.wait_for(opening, self.timeout)

    async def call(self, method: str, body: bytes, codec: int = CODEC_PROTO) -> bytes:
        """The result body; RPCError with the server's text for an error answer. A broken
        connection (OSError, FrameError, TimeoutError) is closed, the next call reconnects."""
        async with self._lock:
            try:
                await self.connect()
                return await asyncio.wait_for(self._exchange(method, body, codec), self.timeout)
            except (OSError, FrameError, TimeoutError, EOFError):
                await self.close()
                raise

    async def call_proto(self, method: str, request: Any, response: type) -> Any:
        reply = response()
        reply.ParseFromString(await self.call(method, request.SerializeToString()))
        return reply

    async def _exchange(self, method: str, body: bytes, codec: int) -> bytes:
        assert self._reader is not None and self._writer is not None
        self._seq = self._seq % 0xFFFFFFFF + 1
        self._writer.write(encode_call(Call(self._seq, method, codec, body)))
        await self._writer.drain()
        answer = parse_call(await read_frame(self._reader))
        if answer.seq != self._seq:
            raise FrameError(f"RPC answer to call {answer.seq}, expected {self._seq}")
        if answer.error:
            raise RPCError(answer.error_text)
        return answer.body

    async def close(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
