"""The baseline for benchmarks/ingest.py: a bare aiosmtpd server on uvloop that stores nothing.

    python benchmarks/aiosmtpd_sink.py HOST PORT

Its handler's handle_DATA returns "250 OK" and nothing else: what an SMTP server in Python costs
before parsing or storing anything. It runs aiosmtpd's `SMTP` protocol on the main thread's
uvloop loop (what `aiosmtpd.controller.Controller` does in a thread), with the same listen
backlog as mailpipe (1024) and a data size limit that lets the 20 MB messages through.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import signal
import sys

import uvloop
from aiosmtpd.smtp import SMTP, Envelope, Session

DATA_SIZE_LIMIT = 64 * 1024 * 1024


class SinkHandler:
    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return "250 OK"


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    handler = SinkHandler()
    server = await loop.create_server(
        lambda: SMTP(handler, data_size_limit=DATA_SIZE_LIMIT, enable_SMTPUTF8=True, loop=loop),
        host,
        port,
        reuse_address=True,
        backlog=1024,
    )
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


def main() -> None:
    host, port = sys.argv[1], int(sys.argv[2])
    logging.basicConfig(level=logging.WARNING)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(host, port))


if __name__ == "__main__":
    main()
