"""EventBuilder: small messages parsed in place, big ones in helper processes, the same event
either way (CPython's email test corpus, in memory and spooled); close() stops the helpers, and
a helper killed mid-parse is reported while the email still gets its event.

The helpers are real forkserver processes, seen through `multiprocessing.active_children()`.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import smtplib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from conftest import MailpipeServer
from mailpipe.capture.attachments import AttachmentStorage
from mailpipe.capture.message import EventOptions, SessionInfo, build_event
from mailpipe.capture.offload import OFFLOAD_ABOVE, EventBuilder
from mailpipe.capture.types import AuthInfo, Envelope, MessageBody

BOUND = 60.0  # every build and every helper exit ends well within this, or something hangs
EMAIL_UUID = "5f0c2b8e-1d2a-4c3b-9e8f-7a6b5c4d3e2f"


def build_kwargs(options: EventOptions | None = None) -> dict[str, Any]:
    """What CaptureServer passes for one message: the same for both ways of building."""
    return {
        "envelope": Envelope(mail_from="from@example.test", rcpt_to=["to@example.test"],
                             helo="client.test"),
        "auth": AuthInfo(attempted=True, mechanism="PLAIN", username="app", password="secret"),
        "session": SessionInfo(uuid="0b6f9d2e-8f43-4c4b-9a53-1f0e2d3c4b5a",
                               remote_addr="192.0.2.7:40000", local_addr="127.0.0.1:1025",
                               server="default", tls=False),
        "received_at": datetime(2026, 11, 25, 8, 0, 0, tzinfo=UTC),
        "options": options or EventOptions(include_raw=True),
        "violations": ["bare LF in DATA"],
        "transcript": ["C: EHLO client.test", "S: 250 OK"],
        "email_uuid": EMAIL_UUID,
    }


def inline_event(raw: bytes, options: EventOptions | None = None) -> dict[str, Any]:
    """The event as build_event gives it in this process, as sinks see it (JSON)."""
    return orjson.loads(build_event(raw, **build_kwargs(options)).json())


def over_threshold(raw: bytes) -> bytes:
    """The message with text lines appended until it is over OFFLOAD_ABOVE: the body of a
    single-part message, the epilogue of a multipart one."""
    line = b"padding to go over the offload threshold " + b"." * 33 + b"\n"
    return raw + b"\n" + line * (OFFLOAD_ABOVE // len(line) + 1)


def spooled(raw: bytes, directory: Path, name: str) -> MessageBody:
    path = directory / name
    path.write_bytes(raw)
    return MessageBody(path=str(path), size=len(raw))


def helpers() -> set[multiprocessing.Process]:
    return set(multiprocessing.active_children())


async def helpers_started(before: set[multiprocessing.Process]) -> set[multiprocessing.Process]:
    """The helper processes started since `before` (waiting for the first one to show)."""
    deadline = time.monotonic() + BOUND
    while not (new := helpers() - before):
        assert time.monotonic() < deadline, "no helper process was started"
        await asyncio.sleep(0.01)
    return new


def assert_exited(processes: set[multiprocessing.Process]) -> None:
    for process in processes:
        process.join(BOUND)
        assert not process.is_alive(), f"helper {process.pid} still running"


@pytest.fixture
async def builder() -> AsyncIterator[EventBuilder]:
    made = EventBuilder(workers=2)
    yield made
    made.close()


@pytest.fixture
def padded_corpus(cpython_email_files: list[Path]) -> Iterator[list[tuple[str, bytes]]]:
    yield [(path.name, over_threshold(path.read_bytes())) for path in cpython_email_files]


async def test_small_messages_are_parsed_in_place(
    builder: EventBuilder, cpython_email_files: list[Path], tmp_path: Path
) -> None:
    before = helpers()
    for path in cpython_email_files:
        raw = path.read_bytes()
        assert len(raw) <= OFFLOAD_ABOVE
        in_memory = await builder.build(MessageBody(data=raw, size=len(raw)), **build_kwargs())
        on_disk = await builder.build(spooled(raw, tmp_path, path.name), **build_kwargs())
        expected = inline_event(raw)
        assert orjson.loads(in_memory.json()) == expected, path.name
        assert orjson.loads(on_disk.json()) == expected, path.name
        assert in_memory.raw == on_disk.raw == raw
    assert not helpers() - before, "a small message was sent to a helper process"


async def test_big_messages_are_parsed_in_helpers_to_the_same_event(
    builder: EventBuilder, padded_corpus: list[tuple[str, bytes]]
) -> None:
    before = helpers()
    built = await asyncio.wait_for(
        asyncio.gather(
            *(builder.build(MessageBody(data=raw, size=len(raw)), **build_kwargs())
              for _, raw in padded_corpus)
        ),
        BOUND,
    )
    assert helpers() - before, "no helper process parsed the big messages"
    for (name, raw), email in zip(padded_corpus, built, strict=True):
        assert email.raw == raw, name
        assert orjson.loads(email.json()) == inline_event(raw), name


async def test_big_spooled_bodies_are_read_by_the_helper(
    builder: EventBuilder, padded_corpus: list[tuple[str, bytes]], tmp_path: Path
) -> None:
    before = helpers()
    for name, raw in padded_corpus[:8]:
        email = await asyncio.wait_for(
            builder.build(spooled(raw, tmp_path, name), **build_kwargs()), BOUND
        )
        assert email.raw == raw, name
        assert orjson.loads(email.json()) == inline_event(raw), name
    assert helpers() - before


async def test_attachments_written_by_a_helper_are_the_same(
    builder: EventBuilder, cpython_email_files: list[Path], tmp_path: Path
) -> None:
    """tempfile attachment storage: the helper writes the files; only their names differ."""
    options = EventOptions(attachments=AttachmentStorage(mode="tempfile", temp_dir=str(tmp_path)))
    with_parts = [p for p in cpython_email_files if inline_event(p.read_bytes())["attachments"]]
    assert with_parts
    for path in with_parts:
        raw = over_threshold(path.read_bytes())
        email = await asyncio.wait_for(
            builder.build(MessageBody(data=raw, size=len(raw)), **build_kwargs(options)), BOUND
        )
        got, expected = orjson.loads(email.json()), inline_event(raw, options)
        assert len(got["attachments"]) == len(expected["attachments"]), path.name
        for mine, theirs in zip(got["attachments"], expected["attachments"], strict=True):
            assert Path(mine.pop("path")).read_bytes() == Path(theirs.pop("path")).read_bytes()
            assert mine == theirs, path.name


async def test_close_stops_the_helpers(padded_corpus: list[tuple[str, bytes]]) -> None:
    builder = EventBuilder(workers=2)
    before = helpers()
    name, raw = padded_corpus[0]
    await asyncio.wait_for(builder.build(MessageBody(data=raw, size=len(raw)),
                                         **build_kwargs()), BOUND)
    started = helpers() - before
    assert started

    builder.close()

    assert_exited(started)
    builder.close()  # twice is harmless
    # A builder closed while the server stops is not used again, but if it is, it still works.
    again = await asyncio.wait_for(
        builder.build(MessageBody(data=raw, size=len(raw)), **build_kwargs()), BOUND
    )
    assert orjson.loads(again.json()) == inline_event(raw), name
    restarted = helpers() - before - started
    builder.close()
    assert_exited(restarted)


async def test_a_helper_killed_mid_parse_is_reported_and_the_email_still_built(
    builder: EventBuilder, padded_corpus: list[tuple[str, bytes]], caplog: pytest.LogCaptureFixture
) -> None:
    name, raw = padded_corpus[0]
    # Long enough to parse that the helper is killed while it works on it.
    big = raw * 16
    before = helpers()
    task = asyncio.create_task(builder.build(MessageBody(data=big, size=len(big)),
                                             **build_kwargs()))
    with caplog.at_level(logging.WARNING, logger="mailpipe.capture"):
        victims = await helpers_started(before)
        for process in victims:
            os.kill(process.pid, signal.SIGKILL)
        email = await asyncio.wait_for(task, BOUND)

    assert orjson.loads(email.json()) == inline_event(big), name
    assert_exited(victims)
    assert any(
        "helper process" in r.getMessage() and r.levelno == logging.WARNING
        for r in caplog.records
    ), [r.getMessage() for r in caplog.records]

    # The next big message gets fresh helpers.
    email = await asyncio.wait_for(
        builder.build(MessageBody(data=raw, size=len(raw)), **build_kwargs()), BOUND
    )
    assert orjson.loads(email.json()) == inline_event(raw), name
    assert helpers() - before - victims


# ---- helpers of a killed mailpipe -----------------------------------------------------------


def descendants(pid: int) -> set[int]:
    """Every live process below `pid`, from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status  # a zombie has exited


def test_helpers_of_a_killed_mailpipe_exit_too(
    mailpipe_factory: Callable[..., MailpipeServer],
) -> None:
    """A mailpipe killed with SIGKILL cannot stop its helpers: they notice and exit, and the
    forkserver with them, instead of waiting for ever."""
    server = mailpipe_factory()
    big = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * (OFFLOAD_ABOVE // 1000 + 10)
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=30) as client:
        client.sendmail("a@example.test", ["b@example.test"], big)
    helpers = descendants(server.process.pid)
    assert helpers, "the big message was not parsed in a helper process"
    server.process.kill()
    server.process.wait()
    deadline = time.monotonic() + BOUND
    while any(alive(pid) for pid in helpers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in helpers if alive(pid)], "helpers outlived their mailpipe"
