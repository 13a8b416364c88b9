"""A tiny RoadRunner-protocol worker built on mailpipe's own frame codec, for the tests.

Same test hooks as examples/worker.py, plus what some tests need beyond them:

- env MAILPIPE_TEST_LOG=/path: one JSON line per email (pid, uuid, subject, body_len, body_sha256);
- subject markers: ``[close]`` -> CLOSE, ``[error]`` -> error frame, ``[sleep N]`` -> sleep N s
  before answering, ``[crash]`` -> exit mid-request, ``[print]`` -> garbage on stdout (through
  sys.stdout, which this worker points at stderr, so frames stay intact);
- ``[answer X]`` -> answer with context X (anything but CONTINUE/CLOSE);
- ``[stop]`` with env HOOKS_STOP_MARK=/path -> worker-initiated stop (context ``{"stop":true}``)
  if that file does not exist yet, creating it: only the first worker to get the email stops;
- ``[stop-always]`` -> every worker that gets the email asks to stop (a poison email);
- ``[stderr-flood]`` -> write 3 MB on stderr without a newline before answering;
- ``[stdout-garbage]`` -> write text on the frame channel instead of a frame (a broken worker);
- env HOOKS_ENV_LOG=/path: at start, append one JSON line with the pid and the RR_* and TEST_*
  environment;
- env HOOKS_CRASH_IF=/path: exit with status 3 at start while that file exists;
- env HOOKS_START_COUNTER=/path and HOOKS_CRASH_STARTS=2,3: count launches in that file and
  exit with status 3 at start on the listed launch numbers (1-based);
- env HOOKS_STUBBORN=1: ignore the stop control frame and SIGTERM (only SIGKILL ends it);
- env HOOKS_BALLAST_MB=N: hold N MB of memory (for max_worker_memory).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import signal
import socket
import sys
import time

from mailpipe.workers.goridge import (
    CONTROL,
    encode_control,
    encode_error,
    encode_payload,
    read_frame_sync,
)

SLEEP = re.compile(r"\[sleep (\d+(?:\.\d+)?)\]")
ANSWER = re.compile(r"\[answer ([^\]]*)\]")


def channel() -> tuple[object, object]:
    relay = os.environ.get("RR_RELAY", "pipes")
    if relay == "pipes":
        return sys.stdin.buffer, sys.stdout.buffer
    if relay.startswith("tcp://"):
        host, _, port = relay[len("tcp://") :].rpartition(":")
        sock = socket.create_connection((host or "127.0.0.1", int(port)))
    elif relay.startswith("unix://"):
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(relay[len("unix://") :])
    else:
        raise SystemExit(f"unsupported RR_RELAY {relay!r}")
    return sock.makefile("rb"), sock.makefile("wb")


def launch_number(path: str) -> int:
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        fh.seek(0)
        number = len(fh.read().split()) + 1
        fh.write(f"{os.getpid()}\n")
        return number


def main() -> None:
    counter = os.environ.get("HOOKS_START_COUNTER")
    if counter:
        number = launch_number(counter)
        crash_on = {int(n) for n in os.environ.get("HOOKS_CRASH_STARTS", "").split(",") if n}
        if number in crash_on:
            print(
                f"hooks_worker {os.getpid()}: crashing at start (launch {number})", file=sys.stderr
            )
            raise SystemExit(3)
    crash_if = os.environ.get("HOOKS_CRASH_IF")
    if crash_if and os.path.exists(crash_if):
        print(f"hooks_worker {os.getpid()}: crashing at start ({crash_if} exists)", file=sys.stderr)
        raise SystemExit(3)
    ballast = bytearray(int(os.environ.get("HOOKS_BALLAST_MB", "0")) * 1024 * 1024)
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1  # touch every page so it counts in RSS
    env_log = os.environ.get("HOOKS_ENV_LOG")
    if env_log:
        env = {k: v for k, v in os.environ.items() if k.startswith(("RR_", "TEST_"))}
        with open(env_log, "a") as fh:
            fh.write(json.dumps({"pid": os.getpid(), "env": env}) + "\n")
    stubborn = os.environ.get("HOOKS_STUBBORN") == "1"
    if stubborn:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    reader, writer = channel()
    real_stdout = writer
    sys.stdout = sys.stderr  # print() must never reach the frame channel

    def send(data: bytes) -> None:
        real_stdout.write(data)
        real_stdout.flush()

    test_log = os.environ.get("MAILPIPE_TEST_LOG")
    while True:
        frame = read_frame_sync(reader)
        if frame is None:
            return
        if frame.flags & CONTROL:
            doc = json.loads(frame.payload)
            if doc.get("stop"):
                if stubborn:
                    continue
                return
            if "pid" in doc:
                send(encode_control({"pid": os.getpid()}))
            continue
        context, body = frame.split()
        event = json.loads(context)
        subject = event["message"].get("subject") or ""
        if test_log:
            line = {
                "pid": os.getpid(),
                "uuid": event["uuid"],
                "subject": subject,
                "body_len": len(body),
                "body_sha256": hashlib.sha256(body).hexdigest(),
            }
            with open(test_log, "a") as fh:
                fh.write(json.dumps(line) + "\n")
        if "[print]" in subject:
            print("garbage printed by the worker")
        if match := SLEEP.search(subject):
            time.sleep(float(match.group(1)))
        if "[crash]" in subject:
            os._exit(7)
        stop_mark = os.environ.get("HOOKS_STOP_MARK")
        if "[stop]" in subject and stop_mark and not os.path.exists(stop_mark):
            open(stop_mark, "w").close()
            send(encode_payload(b'{"stop":true}', b""))
            return
        if "[stop-always]" in subject:
            send(encode_payload(b'{"stop":true}', b""))
            return
        if "[stderr-flood]" in subject:
            sys.stderr.write("x" * (3 << 20))
            sys.stderr.flush()
        if "[stdout-garbage]" in subject:
            send(b"Warning: this worker printed text where a frame belongs\n")
            continue
        if match := ANSWER.search(subject):
            send(encode_payload(match.group(1).encode(), b""))
        elif "[error]" in subject:
            send(encode_error("hooks_worker: failed on purpose"))
        elif "[close]" in subject:
            send(encode_payload(b"CLOSE", b""))
        else:
            send(encode_payload(b"CONTINUE", b""))


if __name__ == "__main__":
    main()
