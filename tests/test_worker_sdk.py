"""Worker SDK and example workers, driven over real pipes and sockets by a test-side server.

The "server" here is a few lines over mailpipe's frame codec: it spawns a worker process, does
RoadRunner's pid handshake, sends requests (event JSON in the context, raw message in the body)
and reads the answers, as mailpipe's pool does.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import ROOT, require_tool
from goridge_peer import TIMEOUT, PeerProc, accept_channel, spawner
from mailpipe.sdk import (
    Email,
    Worker,
    WorkerProtocolError,
    _parse_relay,
)
from mailpipe.workers.goridge import (
    BYTE10_PONG,
    BYTE10_STOP,
    CONTROL,
    Frame,
    FrameError,
    encode_control,
    encode_frame,
    encode_payload,
    read_frame_sync,
)

EXAMPLES = ROOT / "examples"

pytestmark = pytest.mark.timeout(60)

RAW = (
    b"From: Alice Example <alice@example.com>\r\n"
    b"To: bob@example.org, carol@example.net\r\n"
    b"Subject: =?utf-8?q?Caf=C3=A9?= report\r\n"
    b"Message-ID: <m1@example.com>\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="b1"\r\n'
    b"\r\n"
    b"--b1\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"Hello Bob\r\n"
    b"--b1\r\n"
    b'Content-Type: text/csv; name="r.csv"\r\n'
    b'Content-Disposition: attachment; filename="r.csv"\r\n'
    b"\r\n"
    b"a,b\r\n"
    b"--b1--\r\n"
)


def make_event(subject: str | None = "hello", **overrides: Any) -> dict[str, Any]:
    """A realistic EMAIL_RECEIVED document (shape of mailpipe/schema/email-event.schema.json)."""
    attachment = b"a,b\r\n"
    event: dict[str, Any] = {
        "event": "EMAIL_RECEIVED",
        "uuid": "6f1c2b7e-3d4a-4c5b-9e8f-0a1b2c3d4e5f",
        "remote_addr": "127.0.0.1:54321",
        "received_at": "2026-11-25T08:30:00.123456Z",
        "envelope": {
            "from": "alice@example.com",
            "to": ["bob@example.org", "carol@example.net"],
            "helo": "client.example.com",
            "mail_options": ["SIZE=512"],
            "rcpt_options": [[], []],
        },
        "authentication": {
            "attempted": True,
            "mechanism": "PLAIN",
            "username": "alice",
            "password": "s3cret",
        },
        "message": {
            "headers": {
                "From": "Alice Example <alice@example.com>",
                "To": "bob@example.org, carol@example.net",
                "Subject": subject or "",
                "Message-ID": "<m1@example.com>",
            },
            "header_list": [
                ["From", "Alice Example <alice@example.com>"],
                ["To", "bob@example.org, carol@example.net"],
                ["Subject", subject or ""],
                ["Message-ID", "<m1@example.com>"],
            ],
            "body": "Hello Bob\r\n",
            "text": "Hello Bob\r\n",
            "html": None,
            "subject": subject,
            "message_id": "<m1@example.com>",
            "size": len(RAW),
            "defects": [],
        },
        "attachments": [
            {
                "filename": "r.csv",
                "content_type": "text/csv",
                "size": len(attachment),
                "disposition": "attachment",
                "content_id": None,
                "sha256": hashlib.sha256(attachment).hexdigest(),
                "content": base64.b64encode(attachment).decode(),
            }
        ],
        "session": {"uuid": "0d7c9a1e-1111-4222-8333-944455556666", "server": "smtp"},
    }
    event.update(overrides)
    return event


# --------------------------------------------------------------------------- test-side server


def answer(frame: Frame) -> bytes:
    """The response context (CONTINUE/CLOSE), checking the response layout on the way."""
    assert not frame.is_error and not frame.is_control, frame
    assert frame.flags == 0 and len(frame.options) == 1
    return frame.split()[0]


ASYNC_WORKER = textwrap.dedent(
    """
    import asyncio
    import os

    from mailpipe.sdk import AsyncWorker


    async def main() -> None:
        worker = AsyncWorker.create()
        async for email in worker:
            subject = email.subject or ""
            if "[print]" in subject:
                print("async garbage on stdout")
                os.write(1, b"raw fd garbage")
            if "[stop]" in subject:
                await worker.stop()
                break
            if "[error]" in subject:
                await worker.error("refused: " + subject)
            elif "[close]" in subject:
                await worker.respond_close()
            else:
                await worker.respond_continue()
        await worker.close()


    asyncio.run(main())
    """
)

# Echoes the typed view of each email back in the response body.
ECHO_WORKER = textwrap.dedent(
    """
    import json

    from mailpipe.sdk import Worker

    worker = Worker.create()
    for email in worker:
        msg = email.message
        worker.respond("CONTINUE", json.dumps({
            "uuid": email.uuid, "mail_from": email.mail_from, "rcpt_to": email.rcpt_to,
            "helo": email.helo, "subject": email.subject, "text": email.text,
            "headers": email.headers, "raw": email.raw.decode(),
            "auth": [email.auth.username, email.auth.password, email.auth.mechanism,
                     email.auth.attempted],
            "attachments": [[a.filename, a.content_type, a.read().decode()]
                            for a in email.attachments],
            "received_at": email.received_at, "remote_addr": email.remote_addr,
            "msg_subject": str(msg["Subject"]), "msg_to": str(msg["To"]),
            "msg_text": msg.get_body(("plain",)).get_content(),
            "mode": worker.mode,
        }))
    """
)


def worker_command(kind: str, tmp_path: Path) -> list[str]:
    if kind == "python":
        return [sys.executable, str(EXAMPLES / "worker.py")]
    if kind == "php":
        return [require_tool("php"), str(EXAMPLES / "php" / "goridge_worker.php")]
    if kind == "async":
        script = tmp_path / "async_worker.py"
        script.write_text(ASYNC_WORKER)
        return [sys.executable, str(script)]
    if kind == "echo":
        script = tmp_path / "echo_worker.py"
        script.write_text(ECHO_WORKER)
        return [sys.executable, str(script)]
    raise AssertionError(kind)


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., PeerProc]]:
    yield from spawner(tmp_path, lambda kind: worker_command(kind, tmp_path), "smtp", "worker")


WORKERS = ["python", "php", "async"]


# --------------------------------------------------------------------------- over pipes


@pytest.mark.parametrize("kind", WORKERS)
def test_handshake_and_answers(kind: str, spawn: Callable[..., PeerProc]) -> None:
    worker = spawn(kind)
    worker.chan.handshake(worker.proc.pid)

    assert answer(worker.chan.request(make_event("hello"))) == b"CONTINUE"
    assert answer(worker.chan.request(make_event("bye [close]"))) == b"CLOSE"
    error = worker.chan.request(make_event("bad [error]"))
    assert error.is_error and error.options == ()
    assert error.payload.decode() == "refused: bad [error]"
    # The worker lives on after an error and a CLOSE: several requests in a row.
    for i in range(20):
        subject = f"mail {i} [close]" if i % 3 == 0 else f"mail {i} é"
        expected = b"CLOSE" if i % 3 == 0 else b"CONTINUE"
        assert answer(worker.chan.request(make_event(subject), RAW)) == expected
    # A null subject, an empty body.
    assert answer(worker.chan.request(make_event(None))) == b"CONTINUE"

    worker.chan.send(encode_control({"stop": True}))
    started = time.monotonic()
    assert worker.wait() == 0
    assert time.monotonic() - started < 3
    worker.chan.expect_eof()


@pytest.mark.parametrize("kind", WORKERS)
def test_print_does_not_corrupt_frames(kind: str, spawn: Callable[..., PeerProc]) -> None:
    worker = spawn(kind)
    worker.chan.handshake(worker.proc.pid)
    assert answer(worker.chan.request(make_event("noisy [print]"))) == b"CONTINUE"
    assert answer(worker.chan.request(make_event("after [print] [close]"))) == b"CLOSE"
    assert worker.chan.decoder.buffered == 0  # nothing but frames on stdout
    worker.chan.send(encode_control({"stop": True}))
    assert worker.wait() == 0
    assert "garbage" in worker.stderr


@pytest.mark.parametrize("kind", WORKERS)
def test_worker_initiated_stop(kind: str, spawn: Callable[..., PeerProc]) -> None:
    worker = spawn(kind)
    worker.chan.handshake(worker.proc.pid)
    assert answer(worker.chan.request(make_event("first"))) == b"CONTINUE"
    worker.chan.send(encode_payload(json.dumps(make_event("[stop]")).encode(), b"", flags=8))
    frame = worker.chan.recv()
    # Spec 2.7: a plain data frame, one option = 13, context exactly {"stop":true}, no body.
    assert frame.flags == 0 and frame.options == (13,) and frame.byte10 == 0
    assert frame.payload == b'{"stop":true}'
    assert encode_frame(frame) == encode_payload(b'{"stop":true}', b"")
    assert worker.wait() == 0


@pytest.mark.parametrize("kind", WORKERS)
def test_pid_again_and_stray_stream_frames(kind: str, spawn: Callable[..., PeerProc]) -> None:
    worker = spawn(kind)
    pid = worker.chan.handshake(worker.proc.pid)
    assert answer(worker.chan.request(make_event("one"))) == b"CONTINUE"
    # A later pid request is answered again, the same way.
    assert worker.chan.handshake(pid) == pid
    # PONG and stream-STOP frames between requests are ignored.
    worker.chan.send(encode_frame(Frame(0, byte10=BYTE10_PONG)))
    worker.chan.send(encode_frame(Frame(0, byte10=BYTE10_STOP)))
    assert answer(worker.chan.request(make_event("two [close]"))) == b"CLOSE"
    assert worker.chan.decoder.buffered == 0
    worker.chan.send(encode_control({"stop": True}))
    assert worker.wait() == 0


@pytest.mark.parametrize("kind", WORKERS)
def test_eof_on_stdin_ends_the_worker(kind: str, spawn: Callable[..., PeerProc]) -> None:
    worker = spawn(kind)
    worker.chan.handshake(worker.proc.pid)
    assert worker.proc.stdin is not None
    worker.proc.stdin.close()
    assert worker.wait() == 0


@pytest.mark.parametrize("kind", ["python", "php"])
def test_crash_and_test_log(kind: str, spawn: Callable[..., PeerProc], tmp_path: Path) -> None:
    log = tmp_path / "emails.jsonl"
    worker = spawn(kind, MAILPIPE_TEST_LOG=str(log), MAILPIPE_TEST_SLEEP_MS="20")
    worker.chan.handshake(worker.proc.pid)
    started = time.monotonic()
    assert answer(worker.chan.request(make_event("a", uuid="u-1"))) == b"CONTINUE"
    assert time.monotonic() - started >= 0.02
    assert answer(worker.chan.request(make_event("b [close]", uuid="u-2"))) == b"CLOSE"
    assert worker.chan.request(make_event("c [error]", uuid="u-3")).is_error
    started = time.monotonic()
    assert answer(worker.chan.request(make_event("d [sleep 0.3]", uuid="u-4"))) == b"CONTINUE"
    assert time.monotonic() - started >= 0.3
    worker.chan.send(encode_payload(json.dumps(make_event("[crash]")).encode(), b""))
    worker.chan.expect_eof()
    assert worker.wait() == 1
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(x["uuid"], x["answer"]) for x in lines] == [
        ("u-1", "CONTINUE"),
        ("u-2", "CLOSE"),
        ("u-3", "error"),
        ("u-4", "CONTINUE"),
    ]
    assert {x["pid"] for x in lines} == {worker.proc.pid}
    assert lines[1]["subject"] == "b [close]"


def test_typed_email_view(spawn: Callable[..., PeerProc]) -> None:
    worker = spawn("echo")
    worker.chan.handshake(worker.proc.pid)
    frame = worker.chan.request(make_event("Café report"), RAW)
    assert answer(frame) == b"CONTINUE"
    seen = json.loads(frame.split()[1])
    assert seen["uuid"] == "6f1c2b7e-3d4a-4c5b-9e8f-0a1b2c3d4e5f"
    assert seen["mail_from"] == "alice@example.com"
    assert seen["rcpt_to"] == ["bob@example.org", "carol@example.net"]
    assert seen["helo"] == "client.example.com"
    assert seen["subject"] == "Café report"
    assert seen["text"] == "Hello Bob\r\n"
    assert seen["headers"]["Message-ID"] == "<m1@example.com>"
    assert seen["raw"] == RAW.decode()
    assert seen["auth"] == ["alice", "s3cret", "PLAIN", True]
    assert seen["attachments"] == [["r.csv", "text/csv", "a,b\r\n"]]
    assert seen["received_at"] == "2026-11-25T08:30:00.123456Z"
    assert seen["remote_addr"] == "127.0.0.1:54321"
    assert seen["msg_subject"] == "Café report"  # parsed from the raw bytes (RFC 2047)
    assert seen["msg_to"] == "bob@example.org, carol@example.net"
    assert seen["msg_text"].strip() == "Hello Bob"
    assert seen["mode"] == "smtp"

    # Without the raw body, the message is rebuilt from the event.
    frame = worker.chan.request(make_event("No raw"))
    seen = json.loads(frame.split()[1])
    assert seen["raw"] == ""
    assert seen["msg_subject"] == "No raw"
    assert seen["msg_text"].strip() == "Hello Bob"
    worker.chan.send(encode_control({"stop": True}))
    assert worker.wait() == 0


# --------------------------------------------------------------------------- socket relays


@pytest.mark.parametrize("kind", ["python", "async", "echo"])
@pytest.mark.parametrize("family", ["tcp", "unix"])
def test_socket_relay(
    kind: str, family: str, tmp_path: Path, spawn: Callable[..., PeerProc]
) -> None:
    if family == "tcp":
        server = socket.create_server(("127.0.0.1", 0))
        relay = f"tcp://127.0.0.1:{server.getsockname()[1]}"
    else:
        path = tmp_path / "relay.sock"
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(path))
        server.listen()
        relay = f"unix://{path}"
    with server:
        worker = spawn(kind, relay=relay)
        conn, chan = accept_channel(server)
        with conn:
            chan.handshake(worker.proc.pid)  # the pid attaches the socket to the process
            assert answer(chan.request(make_event("over a socket"), RAW)) == b"CONTINUE"
            if kind != "echo":
                assert answer(chan.request(make_event("[close]"))) == b"CLOSE"
            chan.send(encode_control({"stop": True}))
            assert worker.wait() == 0
            chan.expect_eof()
    # Nothing at all on the worker's stdout with a socket relay.
    assert worker.proc.stdout is not None
    assert worker.proc.stdout.read() == b""


# --------------------------------------------------------------------------- in-process SDK


def test_in_process_worker_over_tcp() -> None:
    """The blocking SDK in this process (a socket relay leaves pytest's stdout alone)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        worker = Worker(f"tcp://127.0.0.1:{server.getsockname()[1]}")
        conn, chan = accept_channel(server)
        with conn:
            with pytest.raises(WorkerProtocolError, match="no email"):
                worker.respond_continue()
            chan.send(encode_control({"pid": 1}))
            chan.send(encode_payload(json.dumps(make_event("first")).encode(), RAW))
            email = worker.wait_email()
            assert isinstance(email, Email) and email.subject == "first"
            assert email.raw == RAW
            pid_reply = chan.recv()
            assert pid_reply == Frame(CONTROL, b'{"pid":%d}' % os.getpid())  # flags as PHP
            # An email left unanswered is answered CONTINUE before the next one is read.
            chan.send(encode_payload(json.dumps(make_event("second")).encode(), b""))
            email = worker.wait_email()
            assert email is not None and email.subject == "second"
            assert answer(chan.recv()) == b"CONTINUE"
            worker.respond("CLOSE", b"body")
            assert chan.recv().split() == (b"CLOSE", b"body")
            # A malformed request gets an error frame instead of killing the worker.
            chan.send(encode_payload(b"not json", b""))
            chan.send(encode_frame(Frame(0, b"no options")))
            chan.send(encode_payload(json.dumps(make_event("third")).encode(), b""))
            email = worker.wait_email()
            assert email is not None and email.subject == "third"
            assert chan.recv().is_error and chan.recv().is_error
            worker.error("nope")
            assert chan.recv() == Frame(0x40, b"nope")
            chan.send(encode_control({"stop": True}))
            assert worker.wait_email() is None
            assert list(worker) == []
        worker.close()


def test_in_process_worker_end_of_stream() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        worker = Worker(f"tcp://127.0.0.1:{server.getsockname()[1]}")
        conn, _chan = accept_channel(server)
        conn.close()
        assert worker.wait_email() is None
        worker.close()


def test_email_from_event_without_raw(tmp_path: Path) -> None:
    attachment_file = tmp_path / "att.bin"
    attachment_file.write_bytes(b"\x00\x01binary")
    event = make_event(
        "Report",
        attachments=[
            {
                "filename": None,
                "content_type": "application/octet-stream",
                "size": 8,
                "path": str(attachment_file),
            }
        ],
    )
    event["message"]["raw"] = RAW.decode()
    email = Email.from_event(event)
    assert email.raw == RAW  # from message.raw when the body is empty
    assert email.attachments[0].read() == b"\x00\x01binary"
    assert email.attachments[0].content is None
    bare = Email.from_event({"uuid": "x"})
    assert bare.mail_from == "" and bare.rcpt_to == [] and bare.subject is None
    assert bare.auth.attempted is False and bare.attachments == []
    assert bare.message["Subject"] is None


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("pipes", ("pipes", None, None)),
        ("pipes://stdin:stdout", ("pipes", None, None)),
        ("tcp://127.0.0.1:6001", ("tcp", "127.0.0.1", "6001")),
        ("unix:///tmp/rr.sock", ("unix", "/tmp/rr.sock", None)),
    ],
)
def test_relay_addresses(address: str, expected: tuple[str, str | None, str | None]) -> None:
    assert _parse_relay(address) == expected


@pytest.mark.parametrize("address", ["", "tcp://host", "http://x:1", "nonsense", "pipes://a:b"])
def test_bad_relay_addresses(address: str) -> None:
    with pytest.raises(WorkerProtocolError):
        _parse_relay(address)


def test_php_example_is_valid_php() -> None:
    php = require_tool("php")
    for path in (EXAMPLES / "worker.php", EXAMPLES / "php" / "goridge_worker.php"):
        result = subprocess.run([php, "-l", str(path)], capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stdout + result.stderr
    text = (EXAMPLES / "worker.php").read_text()
    # RoadRunner's Payload is (body, header): the answer goes in the header.
    assert "new Payload('', $answer)" in text


def test_php_worker_script_not_found(tmp_path: Path) -> None:
    """PHP prints 'Could not open input file' on stdout: the codec names the problem."""
    php = require_tool("php")
    proc = subprocess.run(
        [php, str(tmp_path / "missing.php")], capture_output=True, check=False, timeout=TIMEOUT
    )
    with pytest.raises(FrameError, match="not found") as info:
        read_frame_sync(io.BytesIO(proc.stdout))
    assert "missing.php" in str(info.value)


def test_old_sdk_import_name_is_the_same_module() -> None:
    """`mailpipe.worker` was the SDK's first name; code written against it keeps working."""
    import mailpipe.sdk
    import mailpipe.worker

    assert mailpipe.worker is mailpipe.sdk
    from mailpipe.worker import Consumer, Worker

    assert Worker is mailpipe.sdk.Worker and Consumer is mailpipe.sdk.Consumer
