"""Jobs consumer SDK and example consumers, driven as real processes by a test-side server.

The "server" is a few lines over mailpipe's frame codec doing what mailpipe's jobs consumer
does (mailpipe.jobs.consumer): pid handshake, then one request per delivery with flags
CODEC_RAW, context = `Delivery.context(driver)`, body = the job payload (the EMAIL_RECEIVED
event JSON). The answers are checked byte for byte and read back with `verdict_for`, so the SDK,
the PHP consumer and the server are checked against each other.
"""

from __future__ import annotations

import json
import smtplib
import socket
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import orjson
import pytest

from conftest import ROOT, require_tool
from goridge_peer import TIMEOUT, PeerProc, spawner
from mailpipe.jobs.base import Delivery, Job
from mailpipe.jobs.consumer import Verdict, verdict_for
from mailpipe.sdk import UNANSWERED, Consumer, WorkerProtocolError
from mailpipe.workers.goridge import (
    CODEC_RAW,
    Frame,
    FrameDecoder,
    encode_control,
    encode_payload,
)
from mailpipe.workers.process import WorkerResponse

EXAMPLES = ROOT / "examples"
UUID = "6f1c2b7e-3d4a-4c5b-9e8f-0a1b2c3d4e5f"
HEADERS = {"uuid": [UUID], "x-app": ["demo"]}
HEADERS_JSON = orjson.dumps(HEADERS).decode()

pytestmark = pytest.mark.timeout(60)


def make_event(subject: str, uuid: str = UUID) -> dict[str, Any]:
    """A realistic EMAIL_RECEIVED document (shape of mailpipe/schema/email-event.schema.json)."""
    return {
        "event": "EMAIL_RECEIVED",
        "uuid": uuid,
        "remote_addr": "127.0.0.1:54321",
        "received_at": "2026-11-25T08:30:00.123456Z",
        "envelope": {"from": "alice@example.com", "to": ["bob@example.org", "carol@example.net"],
                     "helo": "client.example.com", "mail_options": [], "rcpt_options": [[], []]},
        "authentication": {"attempted": True, "mechanism": "PLAIN", "username": "alice",
                           "password": "s3cret"},
        "message": {
            "headers": {"From": "Alice <alice@example.com>", "Subject": subject},
            "header_list": [["From", "Alice <alice@example.com>"], ["Subject", subject]],
            "text": "Hello Bob\r\n", "html": None, "subject": subject,
            "message_id": "<m1@example.com>", "size": 120, "defects": [],
        },
        "attachments": [],
        "session": {"uuid": "0d7c9a1e-1111-4222-8333-944455556666", "server": "default"},
    }


def make_delivery(subject: str, uuid: str = UUID, headers: dict[str, list[str]] | None = None,
                  ) -> Delivery:
    """A delivery as a driver hands it to mailpipe's consumer (jobs/sink.py's job format)."""
    job = Job(id=uuid, payload=orjson.dumps(make_event(subject, uuid)), pipeline="emails",
              headers=dict(HEADERS if headers is None else headers))
    return Delivery(job=job, attempt=1, ref=None)


def flag(value: bool) -> str:
    return "true" if value else "false"


def nack_body(message: str, requeue: bool, delay: int = 0) -> bytes:
    """Spelled out byte for byte, as PHP's nack() writes it."""
    return (f'{{"type":3,"data":{{"message":"{message}","requeue":{flag(requeue)},'
            f'"delay_seconds":{delay}}}}}').encode()


def fail_body(message: str, requeue: bool = True, delay: int = 0) -> bytes:
    """As PHP's fail(): type 1, and the job's headers when it has any."""
    return (f'{{"type":1,"data":{{"message":"{message}","requeue":{flag(requeue)},'
            f'"delay_seconds":{delay},"headers":{HEADERS_JSON}}}}}').encode()


# --------------------------------------------------------------------------- test-side server


def body_of(frame: Frame) -> bytes:
    """The jobs answer: flags 0, one option = 0 (empty context), JSON in the body."""
    assert not frame.is_error and not frame.is_control, frame
    assert frame.flags == 0 and frame.options == (0,), frame
    context, body = frame.split()
    assert context == b""
    return body


def verdict(frame: Frame) -> Verdict:
    """What mailpipe's consumer does with this answer."""
    if frame.is_error:
        return verdict_for(WorkerResponse(1, error=frame.payload.decode()))
    context, body = frame.split()
    return verdict_for(WorkerResponse(1, context, body))


ASYNC_CONSUMER = textwrap.dedent(
    """
    import asyncio
    import json
    import os
    import re

    from mailpipe.sdk import AsyncConsumer, AsyncReceivedJob

    LOG = os.environ.get("MAILPIPE_TEST_LOG")


    def record(job: AsyncReceivedJob, subject: str, answer: str) -> None:
        if LOG:
            line = {"pid": os.getpid(), "id": job.id, "subject": subject, "answer": answer}
            with open(LOG, "a") as fh:
                fh.write(json.dumps(line) + "\\n")


    async def handle(job: AsyncReceivedJob) -> None:
        subject = job.email.subject or ""
        if match := re.search(r"\\[sleep ([0-9.]+)\\]", subject):
            await asyncio.sleep(float(match[1]))
        if "[crash]" in subject:
            os._exit(1)
        if "[raise]" in subject:
            record(job, subject, "raise")
            raise RuntimeError(f"refused: {subject}")
        if "[fail]" in subject:
            record(job, subject, "nack-requeue")
            await job.nack(requeue=True, message=f"refused: {subject}")
        elif "[dead]" in subject:
            record(job, subject, "nack")
            await job.nack(message=f"refused for good: {subject}")
        elif "[error]" in subject:
            record(job, subject, "fail")
            await job.fail(f"refused: {subject}", requeue=True)
        else:
            record(job, subject, "ack")  # process() acks


    async def main() -> None:
        consumer = AsyncConsumer.create()
        await consumer.process(handle)
        await consumer.close()


    asyncio.run(main())
    """
)

# Answers each job as its "action" header says: {"method": ..., "args": [...], "kwargs": {...}}.
ACTION_CONSUMER = textwrap.dedent(
    """
    import json

    from mailpipe.sdk import Consumer

    consumer = Consumer.create()
    for job in consumer:
        print("stdout noise that must not reach the frame channel")
        action = json.loads(job.header("action") or '{"method": "ack"}')
        if action["method"] != "skip":
            getattr(job, action["method"])(*action.get("args", []), **action.get("kwargs", {}))
    """
)

ASYNC_ACTION_CONSUMER = textwrap.dedent(
    """
    import asyncio
    import json

    from mailpipe.sdk import AsyncConsumer


    async def main() -> None:
        consumer = AsyncConsumer.create()
        async for job in consumer:
            print("stdout noise that must not reach the frame channel")
            action = json.loads(job.header("action") or '{"method": "ack"}')
            if action["method"] != "skip":
                method = getattr(job, action["method"])
                await method(*action.get("args", []), **action.get("kwargs", {}))
        await consumer.close()


    asyncio.run(main())
    """
)

SCRIPTS = {"async": ASYNC_CONSUMER, "action": ACTION_CONSUMER,
           "async-action": ASYNC_ACTION_CONSUMER}


def consumer_command(kind: str, tmp_path: Path) -> list[str]:
    if kind == "python":
        return [sys.executable, str(EXAMPLES / "consumer.py")]
    if kind == "php":
        return [require_tool("php"), str(EXAMPLES / "php" / "goridge_consumer.php")]
    script = tmp_path / f"{kind}_consumer.py"
    script.write_text(SCRIPTS[kind])
    return [sys.executable, str(script)]


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., PeerProc]]:
    yield from spawner(tmp_path, lambda kind: consumer_command(kind, tmp_path), "jobs", "consumer")


def read_log(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# --------------------------------------------------------------------------- the example hooks

HOOK_KINDS = ["python", "async", "php"]
# What each kind sends for a plain success: the SDK's ACK, PHP's complete().
ACK_BODY = {"python": b'{"type":2,"data":{}}', "async": b'{"type":2,"data":{}}',
            "php": b'{"type":0,"data":[]}'}


@pytest.mark.parametrize("kind", HOOK_KINDS)
def test_hooks_answer_each_job(kind: str, spawn: Callable[..., PeerProc],
                               tmp_path: Path) -> None:
    log = tmp_path / "jobs.log"
    consumer = spawn(kind, MAILPIPE_TEST_LOG=str(log))
    pid = consumer.chan.handshake()
    assert pid == consumer.proc.pid

    ok = consumer.chan.deliver(make_delivery("hello", "00000000-0000-4000-8000-000000000001"))
    assert body_of(ok) == ACK_BODY[kind]
    assert verdict(ok) == Verdict("ack")

    fail = consumer.chan.deliver(make_delivery("x [fail]"))
    assert body_of(fail) == nack_body("refused: x [fail]", requeue=True)
    assert verdict(fail) == Verdict("requeue", 0.0, "refused: x [fail]")

    dead = consumer.chan.deliver(make_delivery("x [dead]"))
    assert body_of(dead) == nack_body("refused for good: x [dead]", requeue=False)
    assert verdict(dead) == Verdict("dead", 0.0, "refused for good: x [dead]")

    error = consumer.chan.deliver(make_delivery("x [error]"), driver="redis")
    assert body_of(error) == fail_body("refused: x [error]")  # type 1 with headers, as PHP
    assert verdict(error) == Verdict("requeue", 0.0, "refused: x [error]")

    assert consumer.stop() == 0
    entries = read_log(log)
    assert [e["answer"] for e in entries] == ["ack", "nack-requeue", "nack", "fail"]
    assert {e["pid"] for e in entries} == {pid}
    assert entries[0]["id"] == "00000000-0000-4000-8000-000000000001"
    assert entries[1].pop("attempt", 1) == 1  # logged by consumers that read it
    assert entries[1] == {"pid": pid, "id": UUID, "subject": "x [fail]",
                          "answer": "nack-requeue"}


@pytest.mark.parametrize("kind", HOOK_KINDS)
def test_crash_mid_job_exits_without_answer(kind: str, spawn: Callable[..., PeerProc],
                                            tmp_path: Path) -> None:
    log = tmp_path / "jobs.log"
    consumer = spawn(kind, MAILPIPE_TEST_LOG=str(log))
    consumer.chan.handshake()
    with pytest.raises(EOFError):
        consumer.chan.deliver(make_delivery("boom [crash]"))
    assert consumer.proc.wait(TIMEOUT) == 1
    assert read_log(log) == []  # mailpipe's pool sees a dead worker: the job is requeued


@pytest.mark.parametrize("kind", HOOK_KINDS)
def test_sleep_hook(kind: str, spawn: Callable[..., PeerProc]) -> None:
    consumer = spawn(kind)
    consumer.chan.handshake()
    started = time.monotonic()
    frame = consumer.chan.deliver(make_delivery("slow [sleep 0.3]"))
    assert time.monotonic() - started >= 0.3
    assert verdict(frame) == Verdict("ack")
    assert consumer.stop() == 0


@pytest.mark.parametrize("kind", ["python", "async"])
def test_process_fails_a_raising_handler_with_requeue(
        kind: str, spawn: Callable[..., PeerProc]) -> None:
    consumer = spawn(kind)
    consumer.chan.handshake()
    frame = consumer.chan.deliver(make_delivery("x [raise]"))
    message = "RuntimeError: refused: x [raise]"
    assert body_of(frame) == fail_body(message)
    assert verdict(frame) == Verdict("requeue", 0.0, message)
    # The consumer lives on and takes the next job.
    assert verdict(consumer.chan.deliver(make_delivery("after"))) == Verdict("ack")
    assert consumer.stop() == 0
    stderr = consumer.stderr
    assert "Traceback (most recent call last)" in stderr
    assert "RuntimeError: refused: x [raise]" in stderr


def test_python_example_requeue_hook_and_stderr(spawn: Callable[..., PeerProc]) -> None:
    consumer = spawn("python")
    consumer.chan.handshake()
    frame = consumer.chan.deliver(make_delivery("x [requeue]"))
    assert body_of(frame) == (
        b'{"type":4,"data":{"message":"again: x [requeue]","delay_seconds":0,"headers":'
        + HEADERS_JSON.encode() + b"}}"
    )
    assert verdict(frame) == Verdict("requeue", 0.0, "again: x [requeue]")
    assert consumer.stop() == 0
    assert f"job {UUID} (emails/sqlite): 'x [requeue]' from alice@example.com" in consumer.stderr


@pytest.mark.parametrize("kind", [*HOOK_KINDS, "action"])
def test_closed_relay_ends_the_consumer(kind: str, spawn: Callable[..., PeerProc]) -> None:
    consumer = spawn(kind)
    consumer.chan.handshake()
    assert consumer.proc.stdin is not None
    consumer.proc.stdin.close()
    assert consumer.proc.wait(TIMEOUT) == 0


# --------------------------------------------------------------------------- SDK ⇄ server


def action_delivery(method: str, *args: Any, **kwargs: Any) -> Delivery:
    action = json.dumps({"method": method, "args": list(args), "kwargs": kwargs})
    return make_delivery(f"action {method}", headers={**HEADERS, "action": [action]})


# (SDK call, exact response body, what mailpipe does with it)
ANSWERS: list[tuple[tuple[Any, ...], dict[str, Any], bytes | None, Verdict]] = [
    (("ack",), {}, b'{"type":2,"data":{}}', Verdict("ack")),
    (("nack",), {}, b'{"type":3,"data":{"message":"","requeue":false,"delay_seconds":0}}',
     Verdict("dead")),
    (("nack",), {"requeue": True, "delay": 5, "message": "later"},
     b'{"type":3,"data":{"message":"later","requeue":true,"delay_seconds":5}}',
     Verdict("requeue", 5.0, "later")),
    (("nack",), {"requeue": True, "delay": 0.2},
     b'{"type":3,"data":{"message":"","requeue":true,"delay_seconds":1}}',
     Verdict("requeue", 1.0)),
    (("requeue",), {"delay": 3, "message": "m"}, None, Verdict("requeue", 3.0, "m")),
    (("requeue",), {}, None, Verdict("requeue", 0.0, "requeued by the worker")),
    (("fail", "boom"), {}, None, Verdict("dead", 0.0, "boom")),
    (("fail", "boom"), {"requeue": True, "delay": 2}, None, Verdict("requeue", 2.0, "boom")),
]


def expected_body(call: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    """requeue/fail bodies carry the job's headers (with the action header itself)."""
    data: dict[str, Any]
    if call[0] == "requeue":
        data = {"message": kwargs.get("message", ""), "delay_seconds": kwargs.get("delay", 0)}
        kind = 4
    else:
        data = {"message": call[1], "requeue": kwargs.get("requeue", False),
                "delay_seconds": kwargs.get("delay", 0)}
        kind = 1
    action = json.dumps({"method": call[0], "args": list(call[1:]), "kwargs": kwargs})
    data["headers"] = {**HEADERS, "action": [action]}
    return orjson.dumps({"type": kind, "data": data})


@pytest.mark.parametrize("kind", ["action", "async-action"])
def test_sdk_answers_match_the_server(kind: str, spawn: Callable[..., PeerProc]) -> None:
    consumer = spawn(kind)
    consumer.chan.handshake()
    for call, kwargs, body, expected in ANSWERS:
        frame = consumer.chan.deliver(action_delivery(*call, **kwargs))
        assert body_of(frame) == (body or expected_body(call, kwargs)), (call, kwargs)
        assert verdict(frame) == expected, (call, kwargs)
    assert consumer.stop() == 0
    assert "stdout noise" in consumer.stderr  # print() went to stderr, not into the frames


@pytest.mark.parametrize("kind", ["action", "async-action"])
def test_unanswered_job_is_nacked_with_requeue(kind: str,
                                               spawn: Callable[..., PeerProc]) -> None:
    consumer = spawn(kind)
    consumer.chan.handshake()
    skipped = consumer.chan.deliver(action_delivery("skip"))
    assert body_of(skipped) == nack_body(UNANSWERED, requeue=True)
    assert verdict(skipped) == Verdict("requeue", 0.0, UNANSWERED)
    # The nack went out as soon as the loop asked for the next job; that one is answered.
    assert verdict(consumer.chan.deliver(make_delivery("next"))) == Verdict("ack")
    assert consumer.stop() == 0
    assert f"job {UUID} was not answered" in consumer.stderr


@pytest.mark.parametrize("kind", ["action", "python", "php"])
def test_bad_request_gets_an_error_frame(kind: str, spawn: Callable[..., PeerProc]) -> None:
    consumer = spawn(kind)
    consumer.chan.handshake()
    consumer.chan.send(encode_payload(b"not json", b"{}", flags=CODEC_RAW))
    frame = consumer.chan.recv()
    assert frame.is_error
    assert verdict(frame).action == "requeue"  # mailpipe nacks; dead after max_attempts
    assert verdict(consumer.chan.deliver(make_delivery("next"))) == Verdict("ack")
    assert consumer.stop() == 0


def test_consumer_warns_outside_jobs_mode(spawn: Callable[..., PeerProc]) -> None:
    consumer = spawn("action", RR_MODE="smtp")
    consumer.chan.handshake()
    assert consumer.stop() == 0
    assert "RR_MODE is 'smtp', not 'jobs'" in consumer.stderr


# --------------------------------------------------------------------------- in process


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[tuple[Consumer, socket.socket]]:
    """A Consumer in this process on a unix relay, and the server's end of it."""
    path = str(tmp_path / "relay.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(path)
        server.listen(1)
        consumer = Consumer(f"unix://{path}")
        conn, _ = server.accept()
        conn.settimeout(TIMEOUT)
        yield consumer, conn
        consumer.close()
        conn.close()


def read_frames(conn: socket.socket, count: int) -> list[Frame]:
    decoder, frames = FrameDecoder(), []
    while len(frames) < count:
        while (frame := decoder.next_frame()) is not None:
            frames.append(frame)
        if len(frames) < count:
            decoder.feed(conn.recv(65536))
    return frames


def test_received_job_fields_and_email(relay: tuple[Consumer, socket.socket]) -> None:
    consumer, conn = relay
    delivery = make_delivery("Fields")
    conn.sendall(encode_control({"pid": 1})
                 + encode_payload(delivery.context("amqp"), delivery.job.payload,
                                  flags=CODEC_RAW))
    job = consumer.wait_job()
    assert job is not None
    assert (job.id, job.name, job.pipeline, job.queue, job.driver) == (
        UUID, "smtp.email", "emails", "emails", "amqp")
    assert job.headers == HEADERS and job.header("x-app") == "demo" and job.header("no") is None
    assert job.payload == delivery.job.payload
    assert job.email.uuid == UUID and job.email.subject == "Fields"
    assert job.email.rcpt_to == ["bob@example.org", "carol@example.net"]
    assert job.email.auth.username == "alice"
    assert consumer.mode == "jobs"

    job.ack()
    with pytest.raises(WorkerProtocolError, match="already answered"):
        job.ack()
    pid_reply, ack = read_frames(conn, 2)
    assert pid_reply.is_control
    assert body_of(ack) == b'{"type":2,"data":{}}'


def test_misuse_is_reported(relay: tuple[Consumer, socket.socket]) -> None:
    consumer, conn = relay
    first = make_delivery("one")
    second = make_delivery("two", "00000000-0000-4000-8000-0000000000a2")
    conn.sendall(b"".join(encode_payload(d.context("sqlite"), d.job.payload, flags=CODEC_RAW)
                          for d in (first, second)) + encode_control({"stop": True}))
    job1 = consumer.wait_job()
    job2 = consumer.wait_job()  # job1 left unanswered: nacked with requeue first
    assert job1 is not None and job2 is not None and job2.id.endswith("a2")
    assert job1.answered and job1.nacked_for_you
    with pytest.raises(WorkerProtocolError, match="nacked with requeue when the next job"):
        job1.ack()
    with pytest.raises(ValueError, match="delay must be >= 0"):
        job2.nack(requeue=True, delay=-1)
    job2.requeue(delay=0.25, message="soon")  # whole seconds on the wire, rounded up
    assert consumer.wait_job() is None  # the stop frame
    assert list(consumer) == []
    nack, requeue = read_frames(conn, 2)
    assert body_of(nack) == nack_body(UNANSWERED, requeue=True)
    assert verdict(requeue) == Verdict("requeue", 1.0, "soon")


# --------------------------------------------------------------------------- through mailpipe


def wait_for_lines(path: Path, count: int, timeout: float = 20.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while len(entries := read_log(path)) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return entries


@pytest.mark.parametrize("kind", ["python", "php"])
def test_examples_in_a_real_jobs_pool(kind: str, mailpipe_factory: Callable[..., Any],
                                      tmp_path: Path) -> None:
    """`serve` pushes each email to a sqlite pipeline and consumes it with the example."""
    log = tmp_path / "jobs.log"
    command = consumer_command(kind, tmp_path)
    server = mailpipe_factory({
        "smtp": {"jobs": {"pipeline": "emails"}},
        "jobs": {"pipelines": {"emails": {"driver": "sqlite", "config": {
                     "max_attempts": 2, "poll_interval": "20ms"}}},
                 "consume": ["emails"], "pool": {"command": command, "num_workers": 2}},
    }, env={"MAILPIPE_TEST_LOG": str(log)})
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=TIMEOUT) as client:
        for subject in ("hello", "again [fail]"):
            message = EmailMessage()
            message["From"], message["To"] = "alice@example.com", "bob@example.org"
            message["Subject"] = subject
            message.set_content("hi")
            client.send_message(message)
    entries = wait_for_lines(log, 3)
    answers = sorted((e["subject"], e["answer"]) for e in entries)
    # [fail] is nacked with requeue, delivered again, then dead-lettered at max_attempts=2.
    assert answers == [("again [fail]", "nack-requeue"), ("again [fail]", "nack-requeue"),
                       ("hello", "ack")]
    uuids = {m["subject"]: m["uuid"] for m in server.messages()}
    assert {e["id"] for e in entries} == {uuids["hello"], uuids["again [fail]"]}
