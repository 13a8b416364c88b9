"""RoadRunner's RPC endpoint through the front door: a real `mailpipe serve` with real PHP
workers and a PHP jobs consumer, called by a PHP Goridge RPC client (tests/php/, the frames
spiral/goridge sends with its JSON codec) and by Python over real sockets (protobuf jobs.v1).

- the frames are byte for byte the spec's (docs/protocols.md 1.9);
- PHP: smtp.WorkersList (RoadRunner's process.State fields), smtp.AddWorker, informer.List,
  informer.Workers, resetter.List, resetter.Reset; errors come back as the client's exception;
  the workers' RR_RPC is the endpoint;
- jobs: protobuf jobs.Push and jobs.PushBatch are consumed by the PHP consumer; an unknown
  pipeline and a job without id are refused with the error text; List, Stat, Pause, Resume,
  Declare, Destroy;
- hostile input: garbage, a frame with the wrong options, a truncated frame, a frame past
  max_frame_size, one left half-sent, an undecodable body, an unknown method: errors, the
  connection closed where the frame is malformed, and the server serves on after each.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest

from conftest import ROOT, MailpipeServer, free_port, require_tool
from mailpipe.rpc import RPCError
from mailpipe.rpc.client import RPCClient
from mailpipe.rpc.codec import (
    CODEC_JSON,
    CODEC_MSGPACK,
    CODEC_PROTO,
    CODEC_RAW,
    Call,
    encode_call,
)
from mailpipe.rpc.proto import jobs_pb2 as pb
from mailpipe.workers.goridge import ERROR, Frame, encode_frame, read_frame

PHP_WORKER = ROOT / "examples" / "php" / "goridge_worker.php"
PHP_CONSUMER = ROOT / "examples" / "php" / "goridge_consumer.php"
PHP_RPC = ROOT / "tests" / "php" / "rpc_calls.php"
STATE_FIELDS = {"pid", "status", "numExecs", "created", "memoryUsage", "CPUPercent", "command",
                "statusStr"}


def test_frames_are_the_specs() -> None:
    # docs/protocols.md 1.9: jobs.Push with an empty protobuf body, sequence id 1.
    expected = bytes.fromhex("15 80 09 00 00 00 93 cd 37 2e 00 00 01 00 00 00 09 00 00 00") \
        + b"jobs.Push"
    assert encode_call(Call(1, "jobs.Push", CODEC_PROTO, b"")) == expected


@pytest.fixture
def served(mailpipe_factory: Callable[..., MailpipeServer], tmp_path: Path) -> MailpipeServer:
    """mailpipe with the RPC endpoint on, two PHP SMTP workers and a PHP jobs consumer."""
    php = require_tool("php")
    port = free_port()
    server = mailpipe_factory({
        "rpc": {"listen": f"tcp://127.0.0.1:{port}", "read_timeout": "1s",
                "max_frame_size": "1MB"},
        "server": {"command": [php, str(PHP_WORKER)],
                   "env": {"MAILPIPE_TEST_LOG": str(tmp_path / "consumer.jsonl")}},
        "smtp": {"pool": {"num_workers": 2}},
        "jobs": {
            "pipelines": {
                "mail": {"driver": "sqlite", "config": {"path": str(tmp_path / "jobs.db"),
                                                        "poll_interval": "20ms"}},
                "other": {"driver": "memory"},
            },
            "consume": ["mail"],
            "pool": {"command": [php, str(PHP_CONSUMER)], "num_workers": 1},
        },
    })
    server.extra_ports["rpc"] = port
    return server


def rpc_address(server: MailpipeServer) -> str:
    return f"tcp://127.0.0.1:{server.extra_ports['rpc']}"


def php_calls(server: MailpipeServer, *calls: tuple[str, Any]) -> list[dict[str, Any]]:
    """The calls made by the PHP client over one connection: each {"method", "result"} or
    {"method", "error"}."""
    args = [a for method, arg in calls for a in (method, json.dumps(arg))]
    done = subprocess.run([shutil.which("php") or "php", str(PHP_RPC), rpc_address(server),
                           *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


# ---- PHP's client: the pool, the informer, the resetter ---------------------------------------


def test_php_client_manages_the_pool(served: MailpipeServer) -> None:
    http_pids = {w["pid"] for w in served.get_json("/api/v1/workers")["workers"]}
    out = php_calls(
        served,
        ("smtp.WorkersList", True), ("smtp.AddWorker", True), ("smtp.WorkersList", True),
        ("informer.List", True), ("informer.Workers", "smtp"), ("informer.Workers", "jobs"),
        ("resetter.List", True), ("resetter.Reset", "smtp"), ("smtp.WorkersList", True),
        ("smtp.Nope", True), ("informer.Workers", "http"), ("smtp.RemoveWorker", True),
    )
    before, added, after_add, plugins, informer, jobs, resettable, reset, after_reset, \
        unknown, no_plugin, removed = out
    assert {s["pid"] for s in before["result"]} == http_pids  # the same operation as HTTP
    for state in before["result"]:
        assert set(state) == STATE_FIELDS
        assert (state["status"], state["statusStr"]) == (1, "ready")
        assert state["numExecs"] == 0 and state["memoryUsage"] > 0
        assert abs(state["created"] / 1e9 - time.time()) < 120
        assert state["command"].endswith("goridge_worker.php")
    assert added["result"] is True and len(after_add["result"]) == 3
    assert sorted(plugins["result"]) == ["jobs", "smtp"] == sorted(resettable["result"])
    assert {s["pid"] for s in informer["result"]["workers"]} == {
        s["pid"] for s in after_add["result"]}
    assert [s["command"].endswith("goridge_consumer.php") for s in jobs["result"]["workers"]] \
        == [True]
    assert reset["result"] is True
    new_pids = {s["pid"] for s in after_reset["result"]}
    assert len(new_pids) == 3 and not new_pids & {s["pid"] for s in after_add["result"]}
    assert unknown["error"] == (f"Error 'rpc: can't find method smtp.Nope' on "
                                f"{rpc_address(served)}")
    assert "no plugin 'http' has workers" in no_plugin["error"]
    assert removed["result"] is True
    assert len(served.get_json("/api/v1/workers")["workers"]) == 2


def test_workers_get_the_endpoint_as_rr_rpc(served: MailpipeServer) -> None:
    for plugin in ("smtp", "jobs"):
        (answer,) = php_calls(served, ("informer.Workers", plugin))
        for state in answer["result"]["workers"]:
            environ = Path(f"/proc/{state['pid']}/environ").read_bytes().split(b"\0")
            assert f"RR_RPC={rpc_address(served)}".encode() in environ


async def test_connections_listed_and_closed(served: MailpipeServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", served.smtp_port)
    assert (await reader.readline()).startswith(b"220")
    client = RPCClient(rpc_address(served))
    try:
        (session,) = json.loads(await client.call("smtp.ListConnections", b"true", CODEC_JSON))
        assert session["remote_addr"].startswith("127.0.0.1:")
        closed = await client.call("smtp.CloseConnection",
                                   json.dumps(session["uuid"]).encode(), CODEC_JSON)
        assert closed == b"true"
        assert (await reader.readline()).startswith(b"421")
        with pytest.raises(RPCError, match="connection not found"):
            await client.call("smtp.CloseConnection", b'"nope"', CODEC_JSON)
    finally:
        writer.close()
        await client.close()


# ---- jobs.v1 over protobuf, consumed by the PHP consumer --------------------------------------


def job(subject: str, pipeline: str = "mail", **options: Any) -> Any:
    payload = json.dumps({"message": {"subject": subject}}).encode()
    return pb.Job(job="App\\Task", id=str(uuid.uuid4()), payload=payload,
                  headers={"x-from": pb.HeaderValue(value=["rpc"])},
                  options=pb.Options(pipeline=pipeline, **options))


def consumer_log(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (found := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)
    return found


async def test_protobuf_push_and_push_batch_are_consumed_by_php(
    served: MailpipeServer, tmp_path: Path
) -> None:
    client = RPCClient(rpc_address(served))
    one = job("pushed alone", priority=3)
    batch = [job(f"batched {i}") for i in range(3)]
    try:
        assert await client.call_proto("jobs.Push", pb.PushRequest(job=one), pb.Empty) \
            == pb.Empty()
        await client.call_proto("jobs.PushBatch", pb.PushBatchRequest(jobs=batch), pb.Empty)
        log = tmp_path / "consumer.jsonl"
        lines = await wait_for(lambda: len(consumer_log(log)) >= 4 and consumer_log(log), 20,
                               "the PHP consumer to take 4 jobs")
        assert sorted(line["id"] for line in lines) == sorted(j.id for j in [one, *batch])
        assert {line["answer"] for line in lines} == {"ack"}
        assert {line["subject"] for line in lines} == {"pushed alone", *(
            f"batched {i}" for i in range(3))}

        stats = await client.call_proto("jobs.Stat", pb.Empty(), pb.Stats)
        mail = next(s for s in stats.stats if s.pipeline == "mail")
        assert (mail.driver, mail.ready, mail.priority) == ("sqlite", True, 10)
        assert (mail.reserved, mail.delayed) == (0, 0)
    finally:
        await client.close()


async def test_jobs_refusals_carry_the_error_text(served: MailpipeServer) -> None:
    client = RPCClient(rpc_address(served))
    try:
        with pytest.raises(RPCError, match="no pipeline 'nope' is declared"):
            await client.call_proto("jobs.Push", pb.PushRequest(job=job("x", "nope")), pb.Empty)
        nameless = job("x")
        nameless.id = ""
        with pytest.raises(RPCError, match="empty ID field not allowed"):
            await client.call_proto("jobs.Push", pb.PushRequest(job=nameless), pb.Empty)
        with pytest.raises(RPCError, match="job is required"):
            await client.call_proto("jobs.Push", pb.PushRequest(), pb.Empty)
        with pytest.raises(RPCError, match="not consumed by this process"):
            await client.call_proto("jobs.Pause", pb.Pipelines(pipelines=["other"]), pb.Empty)
        # The connection carried every refusal and still serves.
        listed = await client.call_proto("jobs.List", pb.Empty(), pb.Pipelines)
        assert sorted(listed.pipelines) == ["mail", "other"]
    finally:
        await client.close()


async def test_pause_resume_declare_destroy(served: MailpipeServer) -> None:
    client = RPCClient(rpc_address(served))

    async def ready(name: str) -> bool:
        stats = await client.call_proto("jobs.Stat", pb.Empty(), pb.Stats)
        return next(s for s in stats.stats if s.pipeline == name).ready

    try:
        await client.call_proto("jobs.Pause", pb.Pipelines(pipelines=["mail"]), pb.Empty)
        assert not await ready("mail")
        await client.call_proto("jobs.Resume", pb.Pipelines(pipelines=["mail"]), pb.Empty)
        assert await ready("mail")

        declare = pb.DeclareRequest(pipeline={"name": "late", "driver": "memory",
                                              "priority": "4"})
        await client.call_proto("jobs.Declare", declare, pb.Empty)
        await client.call_proto("jobs.Push", pb.PushRequest(job=job("late one", "late")),
                                pb.Empty)
        stats = await client.call_proto("jobs.Stat", pb.Empty(), pb.Stats)
        late = next(s for s in stats.stats if s.pipeline == "late")
        assert (late.driver, late.active, late.priority, late.ready) == ("memory", 1, 4, False)
        with pytest.raises(RPCError, match="already declared"):
            await client.call_proto("jobs.Declare", declare, pb.Empty)
        with pytest.raises(RPCError, match="declared in the config file"):
            await client.call_proto("jobs.Destroy", pb.Pipelines(pipelines=["mail"]),
                                    pb.Pipelines)
        gone = await client.call_proto("jobs.Destroy", pb.Pipelines(pipelines=["late"]),
                                       pb.Pipelines)
        assert list(gone.pipelines) == ["late"]
        listed = await client.call_proto("jobs.List", pb.Empty(), pb.Pipelines)
        assert sorted(listed.pipelines) == ["mail", "other"]
    finally:
        await client.close()


async def test_json_and_msgpack_codecs(served: MailpipeServer) -> None:
    client = RPCClient(rpc_address(served))
    try:
        listed = await client.call("smtp.WorkersList", msgpack.packb(True), CODEC_MSGPACK)
        assert len(msgpack.unpackb(listed)) == 2
        # A protobuf method takes JSON too, as RoadRunner's Go server does.
        body = json.dumps({"pipelines": ["mail"]}).encode()
        assert await client.call("jobs.Pause", body, CODEC_JSON) == b"{}"
        await client.call("jobs.Resume", body, CODEC_JSON)
        with pytest.raises(RPCError, match="takes protobuf"):
            await client.call("jobs.List", msgpack.packb({}), CODEC_MSGPACK)
    finally:
        await client.close()


# ---- hostile input ------------------------------------------------------------------------------


class Raw:
    """A plain socket to the endpoint, for bytes no client would send."""

    def __init__(self, server: MailpipeServer) -> None:
        self.sock = socket.create_connection(("127.0.0.1", server.extra_ports["rpc"]), 5)
        self.sock.settimeout(10)

    def answer(self) -> Frame | None:
        """The next frame, None once the server closed the connection."""
        stream = self.sock.makefile("rb")
        from mailpipe.workers.goridge import read_frame_sync

        return read_frame_sync(stream)

    def closed(self) -> bool:
        return self.sock.recv(1) == b""


def error_text(frame: Frame | None) -> str:
    assert frame is not None and frame.flags & ERROR, frame
    _seq, size = frame.options
    return frame.payload[size:].decode()


async def still_serves(server: MailpipeServer) -> None:
    client = RPCClient(rpc_address(server))
    try:
        assert json.loads(await client.call("informer.List", b"true", CODEC_JSON))
    finally:
        await client.close()


def call_frame(method: str, body: bytes, codec: int = CODEC_JSON, seq: int = 7) -> bytes:
    return encode_call(Call(seq, method, codec, body))


async def test_hostile_input_gets_errors_and_never_a_crash(served: MailpipeServer) -> None:
    cases: list[tuple[bytes, str]] = [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "not a Goridge frame"),
        (encode_frame(Frame(CODEC_JSON, b"informer.List", (1,))), "has 1 options, expected 2"),
        (encode_frame(Frame(CODEC_JSON, b"x", (1, 50))), "does not fit"),
        (encode_frame(Frame(CODEC_JSON | CODEC_PROTO, b"informer.Listtrue", (1, 13))),
         "several codecs"),
        # Refused from its header: the 2 MB it announces are never read.
        (call_frame("informer.List", b"x" * (2 << 20))[:40], "exceeds the limit"),
        (call_frame("informer.List", b"true")[:15], "incomplete after 1.0s"),  # left half-sent
    ]
    for data, expected in cases:
        raw = Raw(served)
        raw.sock.sendall(data)
        assert expected in error_text(raw.answer()), expected
        assert raw.closed()
        await still_serves(served)

    # Truncated by the client going away: nothing to answer, the server carries on.
    raw = Raw(served)
    raw.sock.sendall(call_frame("informer.List", b"true")[:20])
    raw.sock.shutdown(socket.SHUT_WR)
    assert raw.answer() is None
    await still_serves(served)
    assert "ended inside a frame" in served.log()
    assert "RPC connection from" in served.log()


async def test_bad_calls_are_answered_and_the_connection_carries_on(
    served: MailpipeServer,
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", served.extra_ports["rpc"])
    calls = [
        (call_frame("nope.Method", b"true", seq=1), "rpc: can't find service nope.Method"),
        (call_frame("jobs.Push", b"\xff\xff\xff", CODEC_PROTO, seq=2), "not a jobs.v1.PushRequest"),
        (call_frame("informer.Workers", b"{not json", seq=3), "does not parse"),
        (call_frame("informer.Workers", b"42", seq=4), "expected a plugin name"),
        (call_frame("smtp.WorkersList", b"\xc1", CODEC_MSGPACK, seq=5), "msgpack body"),
        (call_frame("informer.Workers", b"smtp", CODEC_RAW, seq=6), "with the JSON codec"),
    ]
    try:
        for data, expected in calls:
            writer.write(data)
            answer = await read_frame(reader)
            assert answer.flags & ERROR and expected in error_text(answer), expected
        writer.write(call_frame("informer.List", b"true", seq=9))
        answer = await read_frame(reader)
        assert answer.options == (9, len("informer.List")) and not answer.flags & ERROR
        assert sorted(json.loads(answer.payload[13:])) == ["jobs", "smtp"]
    finally:
        writer.close()


# ---- where it listens -------------------------------------------------------------------------


def test_unix_socket_endpoint(mailpipe_factory: Callable[..., MailpipeServer],
                              tmp_path: Path) -> None:
    php = require_tool("php")
    path = tmp_path / "rr.sock"
    server = mailpipe_factory({"rpc": {"listen": f"unix://{path}"},
                               "server": {"command": [php, str(PHP_WORKER)]},
                               "smtp": {"pool": {"num_workers": 1}}})
    done = subprocess.run([php, str(PHP_RPC), f"unix://{path}", "smtp.WorkersList", "true"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    (answer,) = json.loads(done.stdout)
    assert [s["pid"] for s in answer["result"]] == [
        w["pid"] for w in server.get_json("/api/v1/workers")["workers"]]


async def test_loopback_only_unless_bound_elsewhere(caplog: pytest.LogCaptureFixture) -> None:
    from mailpipe.rpc import Registry
    from mailpipe.rpc.server import RPCServer

    for listen, warned in (("tcp://127.0.0.1:0", False), ("tcp://0.0.0.0:0", True)):
        caplog.clear()
        server = RPCServer(listen, Registry(), max_frame_size=1024, read_timeout=1.0)
        await server.start()
        try:
            assert server.bound_address().startswith(listen[:-1])
            assert ("reachable from other machines" in caplog.text) is warned
        finally:
            await server.close()
