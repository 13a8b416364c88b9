"""A mailpipe jobs consumer in Python: logs each email job to stderr and acks it.

With jobs delivery, mailpipe answers the SMTP client as soon as the broker has the email, and
consumers like this one take the jobs later, at their own pace, on any machine that reaches the
broker. Run it from mailpipe:

    jobs:
      pipelines:
        emails: {driver: sqlite}
      pool:
        command: "python3 examples/consumer.py"
        num_workers: 4

then ``mailpipe jobs consume emails`` (or ``mailpipe serve`` with ``jobs.consume: [emails]``).

Test hooks, driven by the subject or the environment:

- ``[fail]``: nack with requeue (the job comes back; dead-lettered after ``max_attempts``);
- ``[dead]``: nack without requeue (dead-lettered at once);
- ``[requeue]``: requeue (type 4);
- ``[error]``: fail() with requeue (type 1, PHP's ``fail()``);
- ``[raise]``: raise inside the handler (``process()`` logs it and fails the job with requeue);
- ``[sleep N]``: sleep N seconds (fractions allowed) before answering;
- ``[crash]``: exit at once with status 1 without answering (the job comes back);
- ``MAILPIPE_TEST_LOG=/path``: append one JSON line per job: pid, id, subject, answer (and
  ``attempt`` when the job's context carries one);
- ``MAILPIPE_TEST_SLEEP_MS=N``: sleep N ms on every job.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time

from mailpipe.sdk import Consumer, ReceivedJob

LOG = os.environ.get("MAILPIPE_TEST_LOG")
SLEEP_MS = float(os.environ.get("MAILPIPE_TEST_SLEEP_MS") or 0)


def record(job: ReceivedJob, subject: str, answer: str) -> None:
    if not LOG:
        return
    line: dict[str, object] = {"pid": os.getpid(), "id": job.id, "subject": subject,
                               "answer": answer}
    if "attempt" in job.context:
        line["attempt"] = job.context["attempt"]
    with open(LOG, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(line) + "\n")


def pause(subject: str) -> None:
    if SLEEP_MS:
        time.sleep(SLEEP_MS / 1000)
    if match := re.search(r"\[sleep ([0-9.]+)\]", subject):
        time.sleep(float(match[1]))


def handle(job: ReceivedJob) -> None:
    email = job.email
    subject = email.subject or ""
    to = ", ".join(email.rcpt_to)
    print(f"[consumer {os.getpid()}] job {job.id} ({job.pipeline}/{job.driver}): "
          f"{subject!r} from {email.mail_from} to {to}", file=sys.stderr, flush=True)
    pause(subject)
    if "[crash]" in subject:
        os._exit(1)
    if "[raise]" in subject:
        record(job, subject, "raise")
        raise RuntimeError(f"refused: {subject}")
    if "[fail]" in subject:
        record(job, subject, "nack-requeue")
        job.nack(requeue=True, message=f"refused: {subject}")
    elif "[dead]" in subject:
        record(job, subject, "nack")
        job.nack(message=f"refused for good: {subject}")
    elif "[requeue]" in subject:
        record(job, subject, "requeue")
        job.requeue(message=f"again: {subject}")
    elif "[error]" in subject:
        record(job, subject, "fail")
        job.fail(f"refused: {subject}", requeue=True)
    else:
        record(job, subject, "ack")
        job.ack()


def main() -> None:
    # process() acks what handle() leaves unanswered and fails (requeue) what raises.
    Consumer.create().process(handle)


if __name__ == "__main__":
    main()
