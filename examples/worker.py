"""A mailpipe worker in Python: logs each email to stderr and answers CONTINUE.

Run it from mailpipe, in this repository, with the Python mailpipe is installed in
(``server.command: ".venv/bin/python examples/worker.py"``; a bare ``python3`` finds
``mailpipe.sdk`` only when ``.venv/bin`` comes first on the PATH). mailpipe starts a pool of
these and sends each captured email to one of them. It answers CLOSE when the subject contains
``[close]`` (mailpipe then ends the SMTP session with 221 after the 250).

Test hooks, driven by the subject or the environment:

- ``[error]``: answer with an error frame (mailpipe logs it and still answers 250);
- ``[sleep N]``: sleep N seconds (fractions allowed) before answering;
- ``[crash]``: exit at once with status 1 without answering (mailpipe answers 451);
- ``[print]``: print() garbage, which the SDK sends to stderr instead of the frame channel;
- ``[stop]``: ask to be replaced (worker-initiated stop: the email goes to another worker);
- ``MAILPIPE_TEST_LOG=/path``: append one JSON line per answered email (pid, uuid, subject, answer);
- ``MAILPIPE_TEST_SLEEP_MS=N``: sleep N ms on every email.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time

from mailpipe.sdk import Worker

LOG = os.environ.get("MAILPIPE_TEST_LOG")
SLEEP_MS = float(os.environ.get("MAILPIPE_TEST_SLEEP_MS") or 0)


def record(uuid: str, subject: str, answer: str) -> None:
    if LOG:
        line = json.dumps({"pid": os.getpid(), "uuid": uuid, "subject": subject, "answer": answer})
        with open(LOG, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")


def main() -> None:
    worker = Worker.create()
    for email in worker:
        subject = email.subject or ""
        to = ", ".join(email.rcpt_to)
        line = f"[worker {os.getpid()}] {subject!r} from {email.mail_from} to {to}"
        print(line, file=sys.stderr, flush=True)
        if SLEEP_MS:
            time.sleep(SLEEP_MS / 1000)
        if match := re.search(r"\[sleep ([0-9.]+)\]", subject):
            time.sleep(float(match[1]))
        if "[crash]" in subject:
            os._exit(1)
        if "[print]" in subject:
            print("garbage that must not reach the frame channel")
            sys.stdout.write("more garbage\n")
            os.write(1, b"even raw fd 1 garbage\n")
        if "[stop]" in subject:
            worker.stop()
            break
        if "[error]" in subject:
            record(email.uuid, subject, "error")
            worker.error(f"refused: {subject}")
        elif "[close]" in subject:
            record(email.uuid, subject, "CLOSE")
            worker.respond_close()
        else:
            record(email.uuid, subject, "CONTINUE")
            worker.respond_continue()


if __name__ == "__main__":
    main()
