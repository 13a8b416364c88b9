"""Fuzz over real sockets: a real `mailpipe serve` takes, for MAILPIPE_FUZZ_SECONDS (3 by
default, 60 under `make fuzz`), several concurrent connections at a time sending valid
sessions, the same sessions mutated, and random bytes, each split into random writes and
sometimes dropped half way. Afterwards the server must still serve a normal smtplib session,
every message it answered 250 must be stored byte for byte, and its log must hold no traceback.

The run is random; MAILPIPE_FUZZ_SEED replays the seed a failure names.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import smtplib
import time
from collections.abc import Callable
from email.message import EmailMessage

from conftest import MailpipeServer

from .strategies import EDGE_LINES, random_mutation, stuff

FUZZ_SECONDS = float(os.environ.get("MAILPIPE_FUZZ_SECONDS", "3"))
SEED = int(os.environ.get("MAILPIPE_FUZZ_SEED", str(random.randrange(2**32))))
CLIENTS = 8
QUEUED = b"250 2.0.0 Ok: queued"
FUZZ_ID = re.compile(rb"\AX-Fuzz-Id: (V\d+)\r\n")


def session(fuzz_id: str, rng: random.Random) -> tuple[bytes, bytes]:
    """(a whole valid session, the message it sends): the message starts with its id."""
    lines = [f"X-Fuzz-Id: {fuzz_id}".encode(), b"Subject: fuzz", b""]
    for _ in range(rng.randint(0, 12)):
        line = rng.choice(EDGE_LINES) if rng.random() < 0.5 else rng.randbytes(rng.randint(0, 60))
        lines.append(line.replace(b"\n", b"").rstrip(b"\r"))
    wire = (b"EHLO fuzz.test\r\nMAIL FROM:<fuzz@example.test>\r\nRCPT TO:<to@example.test>\r\n"
            b"DATA\r\n" + stuff(lines) + b".\r\nQUIT\r\n")
    return wire, b"".join(line + b"\r\n" for line in lines)


async def talk(port: int, wire: bytes, rng: random.Random, *, patience: float = 0.3,
               drop: bool = False) -> bytes:
    """Send `wire` in random writes, then read what comes back until the server closes or
    `patience` seconds pass. `drop`: reset the connection instead of closing it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answer = bytearray()
    try:
        at = 0
        while at < len(wire):
            step = rng.randint(1, max(1, len(wire) // 3))
            writer.write(wire[at:at + step])
            at += step
            await writer.drain()
            if rng.random() < 0.3:
                await asyncio.sleep(0.001)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(patience):
                while chunk := await reader.read(65536):
                    answer += chunk
    except ConnectionError:
        pass  # the server may close on garbage (QUIT inserted, too many errors...)
    finally:
        if drop:
            writer.transport.abort()
        else:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
    return bytes(answer)


async def client(port: int, rng: random.Random, deadline: float,
                 accepted: dict[str, bytes], number: Callable[[], int]) -> None:
    while time.monotonic() < deadline:
        n = number()
        kind = rng.random()
        if kind < 0.25:  # valid: its 250 is a promise the store must keep
            wire, message = session(f"V{n}", rng)
            if QUEUED in await talk(port, wire, rng, patience=10):
                accepted[f"V{n}"] = message
        elif kind < 0.85:
            wire, _ = session(f"M{n}", rng)
            for _ in range(rng.randint(1, 6)):
                wire = random_mutation(rng, wire)
            await talk(port, wire, rng, drop=rng.random() < 0.5)
        else:
            await talk(port, rng.randbytes(rng.randint(0, 3000)), rng, drop=rng.random() < 0.5)


async def fuzz(port: int, seconds: float) -> dict[str, bytes]:
    accepted: dict[str, bytes] = {}
    counter = iter(range(10**9))
    deadline = time.monotonic() + seconds
    await asyncio.gather(*(
        client(port, random.Random(SEED + i), deadline, accepted, lambda: next(counter))
        for i in range(CLIENTS)
    ))
    return accepted


def stored_fuzz_messages(server: MailpipeServer) -> dict[bytes, bytes]:
    """Every stored message that starts with a valid session's id, by id."""
    found: dict[bytes, bytes] = {}
    offset = 0
    while page := server.get_json(f"/api/v1/messages?limit=1000&offset={offset}")["messages"]:
        for summary in page:
            status, raw, _ = server.request("GET", f"/api/v1/messages/{summary['uuid']}/raw")
            assert status == 200
            if match := FUZZ_ID.match(raw):
                found[match.group(1)] = raw
        offset += len(page)
    return found


def test_random_and_mutated_sessions_then_a_normal_one(mailpipe_factory: Callable[
        ..., MailpipeServer]) -> None:
    server = mailpipe_factory({"store": {"max_messages": 1_000_000}})
    accepted = asyncio.run(fuzz(server.smtp_port, FUZZ_SECONDS))
    print(f"seed {SEED}: {len(accepted)} valid sessions answered 250")
    assert server.process.poll() is None, f"mailpipe died under the fuzz (seed {SEED})"

    message = EmailMessage()
    message["Subject"] = "after the fuzz"
    message["From"], message["To"] = "app@example.test", "user@example.test"
    message.set_content("still serving")
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=10) as smtp:
        assert smtp.send_message(message) == {}
        assert smtp.noop()[0] == 250

    assert any(m["subject"] == "after the fuzz" for m in server.wait_for_messages(1)), SEED
    stored = stored_fuzz_messages(server)
    for fuzz_id, raw in accepted.items():
        assert stored.get(fuzz_id.encode()) == raw, f"{fuzz_id} lost or changed (seed {SEED})"
    assert "Traceback" not in server.log(), f"seed {SEED}:\n{server.log()[-3000:]}"
