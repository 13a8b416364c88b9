"""A tiny jobs consumer for the end-to-end tests, on mailpipe's own Goridge codec only (no SDK).

It speaks RoadRunner's jobs worker protocol like spiral/roadrunner-jobs (docs/protocols.md 3.3-3.4):
the request's context is the job's metadata JSON, its body the payload (the EMAIL_RECEIVED
event); the answer is a response frame with an EMPTY context and the JSON answer in the body.

Hooks, by the email's subject:

- ``[crash-once]``: exit mid-job (no answer) the first time this job id is seen, then ack;
- ``[crash]``: exit mid-job every time;
- ``[hang-once]``: the first time this job id is seen, log answer "hang" and sleep for an hour
  (the test kills the process); then ack;
- ``[fail]``: nack with requeue (type 3, requeue true); ``[dead]``: nack without requeue;
- ``[sleep N]``: sleep N seconds before answering;
- anything else: ack (type 2).

Environment:

- ``MAILPIPE_TEST_LOG=/path``: one JSON line per delivery: pid, id, uuid (from the payload),
  subject, answer, attempt (deliveries of this id seen so far, this one included), mp_attempt
  (the attempt mailpipe's context says), and the context (driver, pipeline, queue, job,
  headers);
- ``E2E_STATE_DIR=/dir``: where deliveries are counted per job id (required for attempts and
  ``[crash-once]``; shared by every worker process of the pool).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import sys
import time
from pathlib import Path

from mailpipe.workers.goridge import CONTROL, encode_control, encode_payload, read_frame_sync

SLEEP = re.compile(r"\[sleep (\d+(?:\.\d+)?)\]")
ACK = b'{"type":2,"data":{}}'


def nack(requeue: bool, message: str) -> bytes:
    return json.dumps(
        {"type": 3, "data": {"message": message, "requeue": requeue, "delay_seconds": 0}}
    ).encode()


def count_delivery(job_id: str) -> int:
    """This delivery's number for the job id, counted in a file shared by the pool."""
    state = os.environ.get("E2E_STATE_DIR")
    if not state:
        return 0
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", job_id)
    with open(Path(state) / f"{safe}.deliveries", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        fh.seek(0)
        number = len(fh.read().split()) + 1
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        return number


def record(line: dict[str, object]) -> None:
    log = os.environ.get("MAILPIPE_TEST_LOG")
    if log:
        with open(log, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            fh.write(json.dumps(line) + "\n")


def main() -> None:
    reader, writer = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing but frames on the protocol channel

    def send(data: bytes) -> None:
        writer.write(data)
        writer.flush()

    while True:
        frame = read_frame_sync(reader)
        if frame is None:
            return
        if frame.flags & CONTROL:
            doc = json.loads(frame.payload)
            if doc.get("stop"):
                return
            if "pid" in doc:
                send(encode_control({"pid": os.getpid()}))
            continue
        context_bytes, body = frame.split()
        context = json.loads(context_bytes)
        event = json.loads(body)
        subject = event["message"].get("subject") or ""
        job_id = str(context.get("id"))
        attempt = count_delivery(job_id)
        line: dict[str, object] = {
            "pid": os.getpid(),
            "id": job_id,
            "uuid": event.get("uuid"),
            "subject": subject,
            "attempt": attempt,
            "mp_attempt": context.get("attempt"),  # mailpipe's own count of this delivery
            "context": {
                k: context.get(k) for k in ("job", "driver", "pipeline", "queue", "headers")
            },
        }
        if "[hang-once]" in subject and attempt <= 1:
            record({**line, "answer": "hang"})
            time.sleep(3600)
        if match := SLEEP.search(subject):
            time.sleep(float(match.group(1)))
        if "[crash]" in subject or ("[crash-once]" in subject and attempt <= 1):
            record({**line, "answer": "crash"})
            os._exit(7)
        if "[fail]" in subject:
            answer, data = "nack-requeue", nack(True, f"refused: {subject}")
        elif "[dead]" in subject:
            answer, data = "nack", nack(False, f"refused for good: {subject}")
        else:
            answer, data = "ack", ACK
        record({**line, "answer": answer})
        send(encode_payload(b"", data))


if __name__ == "__main__":
    main()
