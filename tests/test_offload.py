"""EventBuilder: every message's event built in a helper process (python -m
mailpipe.capture.indexer), the same event as building in place, byte for byte (CPython's
email test corpus, in memory and spooled, in process and through a real server); close()
stops the helpers; a helper killed or hung loses no email; a mailpipe killed leaves none.

The helpers are real processes, found through EventBuilder.helper_pids() in process and
through /proc below a `mailpipe serve`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import smtplib
import threading
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
from mailpipe.store.sqlite import SQLiteStore

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


def inline_json(raw: bytes, options: EventOptions | None = None) -> bytes:
    """The event's JSON as build_event gives it in this process."""
    return build_event(raw, **build_kwargs(options)).json()


def over_threshold(raw: bytes) -> bytes:
    """The message with text lines appended until it is over OFFLOAD_ABOVE: the body of a
    single-part message, the epilogue of a multipart one."""
    line = b"padding to go over the offload threshold " + b"." * 33 + b"\n"
    return raw + b"\n" + line * (OFFLOAD_ABOVE // len(line) + 1)


def in_memory(raw: bytes) -> MessageBody:
    return MessageBody(data=raw, size=len(raw))


def spooled(raw: bytes, directory: Path, name: str) -> MessageBody:
    path = directory / name
    path.write_bytes(raw)
    return MessageBody(path=str(path), size=len(raw))


async def ready(builder: EventBuilder, count: int = 1) -> list[int]:
    """The builder's helper pids, once `count` of them answer (the first build starts one;
    until it is ready, messages are built in place)."""
    deadline = time.monotonic() + BOUND
    while len(pids := builder.helper_pids()) < count:
        assert time.monotonic() < deadline, "no helper process became ready"
        await builder.build(in_memory(b"Subject: warm-up\r\n\r\nhi\r\n"), **build_kwargs())
        await asyncio.sleep(0.02)
    return pids


async def assert_exited(pids: list[int]) -> None:
    """Gone, and reaped: no zombie either."""
    deadline = time.monotonic() + BOUND
    while [pid for pid in pids if Path(f"/proc/{pid}").exists()]:
        assert time.monotonic() < deadline, f"helpers still there: {pids}"
        await asyncio.sleep(0.02)


@pytest.fixture
async def builder() -> AsyncIterator[EventBuilder]:
    made = EventBuilder(workers=2)
    yield made
    made.close()


@pytest.fixture
def padded_corpus(cpython_email_files: list[Path]) -> Iterator[list[tuple[str, bytes]]]:
    yield [(path.name, over_threshold(path.read_bytes())) for path in cpython_email_files]


async def test_messages_are_built_by_the_helper_to_the_same_event(
    builder: EventBuilder, cpython_email_files: list[Path], tmp_path: Path
) -> None:
    await ready(builder)
    for path in cpython_email_files:
        raw = path.read_bytes()
        for body in (in_memory(raw), spooled(raw, tmp_path, path.name)):
            email = await asyncio.wait_for(builder.build(body, **build_kwargs()), BOUND)
            assert email.index is not None, "built in place, not by the helper"
            assert email.json() == inline_json(raw), path.name
            assert email.raw == raw
            assert email.uuid == EMAIL_UUID


async def test_big_messages_too_and_they_go_to_the_least_busy_helper(
    builder: EventBuilder, padded_corpus: list[tuple[str, bytes]], tmp_path: Path
) -> None:
    await ready(builder)
    built = await asyncio.wait_for(asyncio.gather(
        *(builder.build(in_memory(raw), **build_kwargs()) for _, raw in padded_corpus),
        *(builder.build(spooled(raw, tmp_path, name), **build_kwargs())
          for name, raw in padded_corpus[:8]),
    ), BOUND)
    sent = padded_corpus + padded_corpus[:8]
    for (name, raw), email in zip(sent, built, strict=True):
        assert email.raw == raw, name
        assert email.json() == inline_json(raw), name
    # The first helper was busy with big ones: the second was started for the rest.
    assert len(await ready(builder, 2)) == 2


async def test_attachments_written_by_a_helper_are_the_same(
    builder: EventBuilder, cpython_email_files: list[Path], tmp_path: Path
) -> None:
    """tempfile attachment storage: the helper writes the files; only their names differ."""
    options = EventOptions(attachments=AttachmentStorage(mode="tempfile", temp_dir=str(tmp_path)))
    with_parts = [p for p in cpython_email_files
                  if orjson.loads(inline_json(p.read_bytes()))["attachments"]]
    assert with_parts
    await ready(builder)
    for path in with_parts:
        raw = path.read_bytes()
        email = await asyncio.wait_for(builder.build(in_memory(raw), **build_kwargs(options)),
                                       BOUND)
        assert email.index is not None
        got, expected = email.event, orjson.loads(inline_json(raw, options))
        assert len(got["attachments"]) == len(expected["attachments"]), path.name
        for mine, theirs in zip(got["attachments"], expected["attachments"], strict=True):
            assert Path(mine.pop("path")).read_bytes() == Path(theirs.pop("path")).read_bytes()
            assert mine == theirs, path.name


async def test_an_event_changed_after_the_helper_built_it_is_indexed_afresh(
    builder: EventBuilder, store: SQLiteStore
) -> None:
    await ready(builder)
    raw = b"From: a@example.test\r\nSubject: as built\r\n\r\nhello\r\n"
    email = await builder.build(in_memory(raw), **build_kwargs())
    assert email.index is not None and email.index[6] == "as built"
    email.event["message"]["subject"] = "changed"
    email._json = None  # what CaptureServer does after adding tags
    await store.add(email)
    assert orjson.loads(email.json())["message"]["subject"] == "changed"
    summaries, _ = await store.list(q="subject:changed")
    assert [s["uuid"] for s in summaries] == [EMAIL_UUID]


async def test_close_stops_the_helpers(padded_corpus: list[tuple[str, bytes]]) -> None:
    builder = EventBuilder(workers=2)
    started = await ready(builder)

    builder.close()

    await assert_exited(started)
    assert builder.helper_pids() == []
    builder.close()  # twice is harmless
    # A builder closed while the server stops is not used again, but if it is, it still works.
    restarted = await ready(builder)
    name, raw = padded_corpus[0]
    again = await asyncio.wait_for(builder.build(in_memory(raw), **build_kwargs()), BOUND)
    assert again.json() == inline_json(raw), name
    builder.close()
    await assert_exited(restarted)


async def test_a_helper_killed_mid_parse_is_reported_and_the_email_still_built(
    builder: EventBuilder, padded_corpus: list[tuple[str, bytes]], caplog: pytest.LogCaptureFixture
) -> None:
    name, raw = padded_corpus[0]
    big = raw * 16  # long enough to parse that the helper is killed while it works on it
    victims = await ready(builder)
    with caplog.at_level(logging.WARNING, logger="mailpipe.capture"):
        task = asyncio.create_task(builder.build(in_memory(big), **build_kwargs()))
        await asyncio.sleep(0.05)
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        email = await asyncio.wait_for(task, BOUND)

    assert email.json() == inline_json(big), name
    await assert_exited(victims)
    assert any("event helper process" in r.getMessage() and r.levelno == logging.WARNING
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    # The next messages get a fresh helper.
    assert set(await ready(builder)).isdisjoint(victims)


async def test_a_hung_helper_is_given_up_and_its_emails_built_in_place(
    padded_corpus: list[tuple[str, bytes]], caplog: pytest.LogCaptureFixture
) -> None:
    builder = EventBuilder(workers=1, hang_after=0.5)
    try:
        (victim,) = await ready(builder)
        os.kill(victim, signal.SIGSTOP)  # alive, but answers nothing
        with caplog.at_level(logging.WARNING, logger="mailpipe.capture"):
            built = await asyncio.wait_for(asyncio.gather(
                *(builder.build(in_memory(raw), **build_kwargs()) for _, raw in padded_corpus[:4])
            ), BOUND)
        for (name, raw), email in zip(padded_corpus, built, strict=False):
            assert email.json() == inline_json(raw), name
        assert any("answered nothing" in r.getMessage() for r in caplog.records)
        await assert_exited([victim])  # killed, stopped as it was
    finally:
        builder.close()


async def test_an_idle_helper_is_stopped_and_started_again_when_needed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    builder = EventBuilder(workers=1, hang_after=0.4, idle_after=0.5)
    try:
        with caplog.at_level(logging.WARNING, logger="mailpipe.capture"):
            first = await ready(builder)
            await assert_exited(first)  # no message for idle_after
            assert builder.helper_pids() == []
            again = await ready(builder)
        assert set(again).isdisjoint(first)
        assert not caplog.records, [r.getMessage() for r in caplog.records]
    finally:
        builder.close()


# ---- through a real server -------------------------------------------------------------


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


def server_helpers(server: MailpipeServer) -> set[int]:
    """The server's helper processes, waiting for the first (one email starts it)."""
    deadline = time.monotonic() + BOUND
    while True:
        found = {pid for pid in descendants(server.process.pid) if alive(pid)
                 and b"mailpipe.capture.indexer" in Path(f"/proc/{pid}/cmdline").read_bytes()}
        if found:
            return found
        assert time.monotonic() < deadline, "the server started no helper process"
        send(server, b"Subject: warm-up\r\n\r\nhi\r\n")
        time.sleep(0.05)


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def send(server: MailpipeServer, raw: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=BOUND) as client:
        client.sendmail("from@example.test", ["to@example.test"], raw)


def rebuilt_in_place(server: MailpipeServer, uuid: str) -> tuple[bytes, bytes]:
    """(the stored event's JSON, the event build_event makes here from the same input)."""
    event = server.event(uuid)
    event.pop("mailpipe", None)  # the sinks' outcomes, stored beside the event
    status, raw, _ = server.request("GET", f"/api/v1/messages/{uuid}/raw")
    assert status == 200
    envelope, session = event["envelope"], event["session"]
    email = build_event(
        raw,
        envelope=Envelope(envelope["from"], envelope["mail_options"], envelope["to"],
                          envelope["rcpt_options"], envelope["helo"]),
        auth=AuthInfo(**event["authentication"]),
        session=SessionInfo(session["uuid"], event["remote_addr"], session["local_addr"],
                            session["server"], session["tls"]),
        received_at=datetime.fromisoformat(event["received_at"].replace("Z", "+00:00")),
        options=EventOptions(include_raw=True),
        violations=session["violations"],
        transcript=session.get("transcript"),
        email_uuid=uuid,
    )
    return orjson.dumps(event), email.json()


def test_a_server_stores_the_same_events_as_building_in_place(
    mailpipe_factory: Callable[..., MailpipeServer], cpython_email_files: list[Path]
) -> None:
    """Small messages and big spooled ones, through SMTP, stored, read back: byte for byte
    the JSON build_event makes in place from the same message and session."""
    server = mailpipe_factory({"smtp": {"include_raw": True, "transcript": True,
                                        "spool_threshold": 64 * 1024},
                               "store": {"max_messages": 100_000}})
    helpers = server_helpers(server)
    time.sleep(0.5)  # started is not ready: let it finish its imports
    before = sum(cpu_ticks(pid) for pid in helpers)
    sample = [p.read_bytes() for p in cpython_email_files]
    sample += [over_threshold(raw) for raw in sample[:6]]  # spooled: sent as a path
    for raw in sample:
        send(server, raw)
    stored = server.messages(limit=len(sample))
    assert len(stored) == len(sample)
    for summary in stored:
        got, expected = rebuilt_in_place(server, summary["uuid"])
        assert got == expected, summary["subject"]
    assert sum(cpu_ticks(pid) for pid in helpers) > before, "the helper built none of them"


def every_message(server: MailpipeServer) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    while page := server.messages(limit=1000, offset=len(found)):
        found += page
    return found


def test_a_helper_killed_under_load_loses_no_email(
    mailpipe_factory: Callable[..., MailpipeServer],
) -> None:
    """Every email that got its 250 is stored with its full event; the rest got a 4xx (none
    should: they are built in place)."""
    server = mailpipe_factory({"store": {"max_messages": 100_000}})
    victims = server_helpers(server)
    accepted: list[str] = []
    refused: list[int] = []
    stop = threading.Event()

    def client(n: int) -> None:
        with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=BOUND) as smtp:
            i = 0
            while not stop.is_set():
                subject = f"load {n}-{i}"
                i += 1
                raw = f"Subject: {subject}\r\nFrom: a@example.test\r\n\r\nbody\r\n".encode()
                try:
                    smtp.sendmail("a@example.test", ["b@example.test"], raw)
                    accepted.append(subject)
                except smtplib.SMTPResponseException as exc:
                    assert 400 <= exc.smtp_code < 500, exc
                    refused.append(exc.smtp_code)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    time.sleep(1.0)
    stop.set()
    for thread in threads:
        thread.join(BOUND)

    assert accepted
    stored = {m["subject"]: m for m in every_message(server)}
    assert set(accepted) <= set(stored)
    for subject in accepted[-20:]:
        event = server.event(stored[subject]["uuid"])
        assert event["message"]["subject"] == subject and event["message"]["body"] == "body\r\n"
    assert "event helper process" in server.log()
    assert set(server_helpers(server)).isdisjoint(victims), "no new helper was started"


def test_no_helper_outlives_its_server(mailpipe_factory: Callable[..., MailpipeServer]) -> None:
    """Stopped, the server closes its helpers; killed with SIGKILL, it cannot, and they see
    their stdin close and exit on their own."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        server = mailpipe_factory()
        helpers = server_helpers(server)
        big = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * (OFFLOAD_ABOVE // 1000 + 10)
        send(server, big)
        server.process.send_signal(sig)
        server.process.wait(BOUND)
        deadline = time.monotonic() + BOUND
        while any(alive(pid) for pid in helpers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [pid for pid in helpers if alive(pid)], f"helpers outlived a {sig.name}"
