"""POST /api/v1/send through the front door: a real `mailpipe serve`, a real HTTP client, and
what the message meets on its way (plugins, worker pool, jobs pipeline, store) running for
real. The sent email must be stored as an SMTP one is, and a refusal anywhere must reach the
caller as an error carrying the SMTP reply, with nothing stored."""

from __future__ import annotations

import base64
import email
import json
import random
import smtplib
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from email import policy
from email.message import EmailMessage
from typing import Any

import pytest

from conftest import ROOT, MailpipeServer, free_port
from mailpipe.web.compose import SendError, build_message, from_mailpit, parse_send, submission
from test_workers import in_thread, wait_until

Factory = Callable[..., MailpipeServer]
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)
PDF = b"%PDF-1.4\n" + bytes(range(256)) + b"\n%%EOF\n"
BIG = random.Random(15).randbytes(1_500_000)


def post(server: MailpipeServer, body: Any, *, content_type: str = "application/json",
         raw: bytes | None = None, headers: dict[str, str] | None = None,
         ) -> tuple[int, dict[str, Any]]:
    """POST /api/v1/send with urllib: the status and the JSON answer."""
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(server.api + "/api/v1/send", data=data, method="POST",
                                     headers={"Content-Type": content_type, **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def sent(server: MailpipeServer, body: Any) -> dict[str, Any]:
    """Send, expect 200, and return the stored event."""
    status, answer = post(server, body)
    assert status == 200, answer
    assert answer["smtp"]["code"] == 250 and answer["smtp"]["stage"] == "message"
    return server.event(answer["uuid"])


def raw_of(server: MailpipeServer, uuid: str) -> bytes:
    status, body, _ = server.request("GET", f"/api/v1/messages/{uuid}/raw")
    assert status == 200
    return body


def parsed(server: MailpipeServer, uuid: str) -> EmailMessage:
    message = email.message_from_bytes(raw_of(server, uuid), policy=policy.default)
    assert isinstance(message, EmailMessage)
    return message


@pytest.fixture
def server(mailpipe_factory: Factory) -> MailpipeServer:
    return mailpipe_factory({"smtp": {"include_raw": True, "transcript": True}})


# ---- accepted: the event an SMTP client's email gets ---------------------------------------


def test_structured_send_is_stored_like_an_smtp_email(
    server: MailpipeServer, validate_event: Callable[[dict[str, Any]], None]
) -> None:
    event = sent(server, {
        "from": {"email": "app@example.com", "name": "The App"},
        "to": ["dev@example.test", "Second <second@example.test>"],
        "cc": {"email": "cc@example.test", "name": "Carbon"},
        "bcc": ["hidden@example.test"],
        "reply_to": "support@example.com",
        "subject": "Welcome",
        "text": "Hello in text.\n.A line that starts with a dot\n",
        "headers": {"X-Campaign": "spring", "Message-ID": "<fixed-id@example.com>"},
        "tags": ["welcome", "api"],
    })
    validate_event(event)
    assert event["session"]["server"] == "api"
    assert event["remote_addr"].startswith("127.0.0.1:")
    assert event["session"]["local_addr"] == f"127.0.0.1:{server.http_port}"
    assert event["envelope"]["from"] == "app@example.com"
    assert event["envelope"]["to"] == ["dev@example.test", "second@example.test",
                                       "cc@example.test", "hidden@example.test"]
    assert event["tags"] == ["welcome", "api"]
    message = event["message"]
    assert message["subject"] == "Welcome"
    assert message["message_id"] == "<fixed-id@example.com>"
    assert message["headers"]["X-Campaign"] == "spring"
    assert message["headers"]["Reply-To"] == "support@example.com"
    assert "Bcc" not in message["headers"]  # in the envelope only, as a mailer leaves it
    assert message["text"].replace("\r\n", "\n") == (
        "Hello in text.\n.A line that starts with a dot\n")
    # The transcript is the SMTP conversation the session had.
    transcript = event["session"]["transcript"]
    assert "C: EHLO [127.0.0.1]" in transcript
    assert "C: RCPT TO:<hidden@example.test>" in transcript
    assert "C: DATA" in transcript

    # The same message from a real SMTP client: the same event shape.
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=10) as client:
        client.send_message(parsed(server, event["uuid"]), from_addr="app@example.com",
                            to_addrs=["dev@example.test"])
    smtp_event = next(server.event(item["uuid"]) for item in server.messages()
                      if item["uuid"] != event["uuid"])
    validate_event(smtp_event)
    assert smtp_event["session"]["server"] == "default"
    assert shape(smtp_event) == shape(event)


def shape(value: Any) -> Any:
    """The keys of a JSON value, nested, without the values (lists by their first item)."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items() if key != "tags"}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    return type(value).__name__


def test_attachments_and_inline_parts_round_trip(server: MailpipeServer) -> None:
    event = sent(server, {
        "from": "app@example.com",
        "to": "dev@example.test",
        "subject": "Your invoice",
        "text": "See the attached invoice.",
        "html": '<p>Invoice <img src="cid:logo@app"></p>',
        "attachments": [
            {"filename": "invoice.pdf", "content": base64.b64encode(PDF).decode()},
            # Past smtp.spool_threshold (1 MiB): the body is spooled to a file on its way.
            {"filename": "big.bin", "content": base64.b64encode(BIG).decode()},
            {"content_id": "logo@app", "filename": "logo.png", "content_type": "image/png",
             # line-wrapped base64, as many encoders write it
             "content": "\n".join(base64.encodebytes(PNG).decode().split())},
        ],
    })
    attachments = {item["filename"]: (index, item)
                   for index, item in enumerate(event["attachments"])}
    index, pdf = attachments["invoice.pdf"]
    assert pdf["content_type"] == "application/pdf"  # from the file name
    assert pdf["disposition"] == "attachment" and pdf["size"] == len(PDF)
    status, body, _ = server.request("GET", f"/api/v1/messages/{event['uuid']}/attachments/{index}")
    assert status == 200 and body == PDF
    index, big = attachments["big.bin"]
    assert big["content_type"] == "application/octet-stream" and big["size"] == len(BIG)
    status, body, _ = server.request("GET", f"/api/v1/messages/{event['uuid']}/attachments/{index}")
    assert status == 200 and body == BIG
    index, logo = attachments["logo.png"]
    assert logo["content_id"] == "logo@app" and logo["disposition"] == "inline"
    status, body, _ = server.request("GET", f"/api/v1/messages/{event['uuid']}/attachments/{index}")
    assert status == 200 and body == PNG
    # The inline image belongs with the HTML: multipart/related inside the alternative.
    message = parsed(server, event["uuid"])
    html = message.get_body(("html",))
    assert html is not None and 'cid:logo@app' in html.get_content()
    related = [part for part in message.walk() if part.get_content_type() == "multipart/related"]
    assert len(related) == 1
    assert any(part.get("Content-ID") == "<logo@app>" for part in related[0].iter_parts())
    assert event["message"]["text"].strip() == "See the attached invoice."


def test_utf8_subject_names_and_addresses(server: MailpipeServer) -> None:
    event = sent(server, {
        "from": {"email": "anmeldung@bücher.example", "name": "Bücherei Zoë"},
        "to": ["jürgen@example.test"],
        "subject": "Grüße aus Köln ✓ — 日本語",
        "text": "Schöne Grüße!",
        "html": "<p>Schöne Grüße!</p>",
    })
    assert event["message"]["subject"] == "Grüße aus Köln ✓ — 日本語"
    assert event["envelope"]["to"] == ["jürgen@example.test"]
    assert "SMTPUTF8" in event["envelope"]["mail_options"]
    assert "Bücherei Zoë" in event["message"]["headers"]["From"]
    assert event["message"]["text"].strip() == "Schöne Grüße!"
    assert event["session"]["violations"] == []  # BODY=8BITMIME / SMTPUTF8 were declared


def test_raw_message_with_the_envelope_from_its_headers(server: MailpipeServer) -> None:
    raw = ("From: App <app@example.com>\nTo: a@example.test, B <b@example.test>\n"
           "Cc: c@example.test\nBcc: d@example.test\nSubject: raw one\n\n"
           "Body line\n.leading dot\n")
    status, answer = post(server, {"raw": raw, "tags": ["raw"]})
    assert status == 200, answer
    assert answer["envelope"] == {"from": "app@example.com", "to": [
        "a@example.test", "b@example.test", "c@example.test", "d@example.test"]}
    event = server.event(answer["uuid"])
    assert event["tags"] == ["raw"]
    # CRLF line ends, as SMTP carries them; a leading dot survives DATA's dot-stuffing.
    assert raw_of(server, answer["uuid"]) == raw.replace("\n", "\r\n").encode()


def test_raw_base64_keeps_8bit_bytes_and_takes_an_explicit_envelope(
        server: MailpipeServer) -> None:
    raw = ("From: a@example.com\r\nTo: header@example.test\r\nSubject: latin-1\r\n"
           "Content-Type: text/plain; charset=iso-8859-1\r\n"
           "Content-Transfer-Encoding: 8bit\r\n\r\nCaf\xe9 cr\xe8me\r\n").encode("latin-1")
    status, answer = post(server, {"raw_base64": base64.b64encode(raw).decode(),
                                   "from": "bounce@example.com",
                                   "to": ["envelope@example.test"]})
    assert status == 200, answer
    event = server.event(answer["uuid"])
    assert event["envelope"]["from"] == "bounce@example.com"
    assert event["envelope"]["to"] == ["envelope@example.test"]
    assert "BODY=8BITMIME" in event["envelope"]["mail_options"]
    assert raw_of(server, answer["uuid"]) == raw
    assert event["message"]["text"].strip() == "Café crème"


# ---- refused: the SMTP reply comes back as the error ---------------------------------------


def test_a_plugin_rejection_or_tempfail_is_the_callers_error(mailpipe_factory: Factory) -> None:
    server = mailpipe_factory({"plugins": {
        "plugins": ["policy", "header_stamp"],
        "plugin_config": {
            "policy": {
                "senders": {"deny": ["*@spam.test"]},
                "recipients": {"deny": ["busy@example.test"], "code": 451, "enhanced": "4.2.1",
                               "message": "Mailbox busy, try later"}},
            "header_stamp": {"tags": ["stamped"]}}}})
    status, answer = post(server, {"from": "x@spam.test", "to": "dev@example.test",
                                   "text": "no"})
    assert status == 422, answer
    assert answer["smtp"] == {"code": 550, "text": "5.7.1 Sender address rejected by policy",
                              "stage": "mail"}
    assert "550 5.7.1 Sender address rejected by policy" in answer["error"]

    status, answer = post(server, {"from": "ok@example.com",
                                   "to": ["dev@example.test", "busy@example.test"]})
    assert status == 503, answer
    assert answer["smtp"] == {"code": 451, "text": "4.2.1 Mailbox busy, try later",
                              "stage": "rcpt", "recipient": "busy@example.test"}
    assert server.get_json("/api/v1/messages")["total"] == 0  # all or nothing

    # The plugins let this one through, and their MODIFY changes apply: headers, tags.
    status, answer = post(server, {"from": "ok@example.com", "to": "dev@example.test",
                                   "tags": ["mine"]})
    assert status == 200, answer
    event = server.event(answer["uuid"])
    assert event["message"]["headers"]["X-Mailpipe-Server"] == "api"
    assert event["message"]["headers"]["X-Mailpipe-Remote"] == event["remote_addr"]
    assert event["tags"] == ["mine", "stamped"]


def test_a_worker_receives_the_sent_email_and_its_failure_is_an_error(
        mailpipe_factory: Factory, tmp_path: Any) -> None:
    log = tmp_path / "worker.jsonl"
    server = mailpipe_factory({
        "server": {"command": [sys.executable, str(ROOT / "examples" / "worker.py")],
                   "env": {"MAILPIPE_TEST_LOG": str(log)}},
        "smtp": {"pool": {"num_workers": 1, "max_retries_per_email": 1},
                 "max_connections_per_ip": 1},
    })
    status, answer = post(server, {"from": "app@example.com", "to": "dev@example.test",
                                   "subject": "to the worker"})
    assert status == 200, answer
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert lines == [{"pid": lines[0]["pid"], "uuid": answer["uuid"],
                      "subject": "to the worker", "answer": "CONTINUE"}]
    assert server.event(answer["uuid"])["mailpipe"]["outcomes"]["worker"]

    # A worker that dies on the email: 451 from the pool, 503 here, nothing kept.
    status, answer = post(server, {"from": "app@example.com", "to": "dev@example.test",
                                   "subject": "[crash]"})
    assert status == 503, answer
    assert answer["smtp"]["code"] == 451 and answer["smtp"]["stage"] == "message"
    assert server.get_json("/api/v1/messages")["total"] == 1

    # The smtp limits hold for the API's sessions: while one email from this address is
    # with the worker, a second connection from it is refused (421) before its greeting.
    slow = in_thread(post, server, {"from": "app@example.com", "to": "dev@example.test",
                                    "subject": "[sleep 4] slow"})
    wait_until(lambda: "[sleep 4] slow" in server.log(), 20, "the worker to take the email")
    status, answer = post(server, {"from": "app@example.com", "to": "dev@example.test"})
    assert status == 503, answer
    assert answer["smtp"]["code"] == 421 and answer["smtp"]["stage"] == "connect"
    assert slow.result(timeout=30)[0] == 200


def test_jobs_pipeline_gets_the_email_and_a_broker_down_is_an_error(
        mailpipe_factory: Factory) -> None:
    server = mailpipe_factory({
        "smtp": {"jobs": {"pipeline": "emails"}},
        "jobs": {"pipelines": {"emails": {"driver": "sqlite"}}},
    })
    status, answer = post(server, {"from": "app@example.com", "to": "dev@example.test"})
    assert status == 200, answer
    job = server.event(answer["uuid"])["mailpipe"]["outcomes"]["job"]
    assert job["pipeline"] == "emails" and job["driver"] == "sqlite"

    closed = free_port()  # nothing listens there: the broker is down
    down = mailpipe_factory({
        "smtp": {"jobs": {"pipeline": "emails"}},
        "jobs": {"pipelines": {"emails": {"driver": "redis", "config": {
            "addr": f"redis://127.0.0.1:{closed}/0"}}}},
    }, wait=False)
    wait_until(lambda: answers(down), 20, "the API of the server with its broker down")
    status, answer = post(down, {"from": "app@example.com", "to": "dev@example.test"})
    assert status == 503, answer
    assert answer["smtp"]["code"] == 451 and answer["smtp"]["stage"] == "message"
    assert down.get_json("/api/v1/messages")["total"] == 0


def answers(server: MailpipeServer) -> bool:
    """The API is up (/healthz says degraded while the broker is down)."""
    try:
        return server.request("GET", "/healthz")[0] in (200, 503)
    except OSError:
        return False


# ---- bad input -----------------------------------------------------------------------------


BAD_INPUT = [
    (b"{not json", 400, "body: not valid JSON"),
    (b"", 400, "body: expected a JSON object"),
    (b"[1, 2]", 400, "body: expected a JSON object"),
    (b'{"from": "a@example.com", "subject": "x"}', 400, "to: at least one recipient"),
    (b'{"to": "a@example.com"}', 400, "from: required"),
    (b'{"from": "not an address", "to": "b@example.test"}', 400, "from: 'not an address' is"),
    (b'{"from": "a@example.com", "to": ["b@example.test", "c@"]}', 400, "to[1]: 'c@' is not"),
    (b'{"from": {"email": "a@example.com", "name": "A\\r\\nBcc: x@evil.test"}, "to": "b@x.test"}',
     400, "from.name: control characters"),
    (b'{"from": "a@example.com", "to": "b@x.test", "subject": "Hi\\nBcc: x@evil.test"}',
     400, "subject: control characters"),
    (b'{"from": "a@example.com", "to": "b@x.test", "headers": {"Content-Type": "text/html"}}',
     400, "headers.Content-Type: the MIME structure"),
    (b'{"from": "a@example.com", "to": "b@x.test", "headers": {"Bad Name": "x"}}',
     400, "headers.Bad Name: not a header name"),
    (b'{"from": "a@example.com", "to": "b@x.test", "attachments": [{"content": "%%%"}]}',
     400, "attachments[0].content: not valid base64"),
    (b'{"from": "a@example.com", "to": "b@x.test", "attachments": [{"content": "QQ=="}]}',
     400, "attachments[0].filename: required"),
    (b'{"from": "a@example.com", "to": "b@x.test", "bodyy": "typo"}', 400, "bodyy: unknown"),
    (b'{"raw": "Subject: none\\n\\nno addresses"}', 400, "from: not given"),
    (b'{"raw": "From: a@example.com\\n\\nno recipients"}', 400, "to: not given"),
    (b'{"raw": "x", "raw_base64": "eA=="}', 400, "raw: give raw or raw_base64"),
    (b'{"raw_base64": "@@@"}', 400, "raw_base64: not valid base64"),
    (b'{"from": "a@example.com", "to": "b@x.test", "tags": ["ok", ""]}', 400, "tags[1]:"),
    (b'{"from": "a@example.com", "to": "b@x.test", "tags": "one"}', 400, "tags: expected a list"),
]


def test_bad_input_is_a_400_naming_the_field(server: MailpipeServer) -> None:
    # One server for every case: each is refused before anything is sent.
    for body, status, error in BAD_INPUT:
        got, answer = post(server, None, raw=body)
        assert (got, answer["error"][:len(error)]) == (status, error), body
    assert server.get_json("/api/v1/messages")["total"] == 0


def test_web_pages_cannot_send(server: MailpipeServer) -> None:
    """The API's browser guard keeps the route: no form post, no cross-origin write."""
    status, answer = post(server, None, raw=b"from=a@example.com", content_type="text/plain")
    assert status == 415 and "application/json" in answer["error"]
    body = {"from": "a@example.com", "to": "b@example.test"}
    status, answer = post(server, body, headers={"Origin": "http://evil.example"})
    assert status == 403 and "cross-origin" in answer["error"]
    assert server.get_json("/api/v1/messages")["total"] == 0
    status, answer = post(server, body, headers={"Origin": server.api})  # the inbox page's own
    assert status == 200, answer


def test_limits_are_the_smtp_sections(mailpipe_factory: Factory) -> None:
    server = mailpipe_factory({"smtp": {"max_message_size": 4096, "max_recipients": 2}})
    status, answer = post(server, {"from": "a@example.com", "to": "b@example.test",
                                   "text": "x" * 5000})
    assert status == 413, answer
    assert "smtp.max_message_size (4096 bytes)" in answer["error"]
    # A body far past what any message within the limit can take is not even read.
    status, answer = post(server, None, raw=b'{"raw": "' + b"y" * 20_000_000 + b'"}')
    assert status == 413, answer
    status, answer = post(server, {"from": "a@example.com",
                                   "to": ["b@example.test", "c@example.test"],
                                   "cc": "d@example.test"})
    assert status == 400, answer
    assert answer["error"].startswith("to: 3 recipients") and "smtp.max_recipients (2)" in \
        answer["error"]
    status, answer = post(server, {"from": "a@example.com", "to": "b@example.test",
                                   "text": "small"})
    assert status == 200, answer


# ---- Mailpit's send JSON onto the same builder ---------------------------------------------

# Mailpit's own example request (its swagger and TestAPIv1Send), the logo shortened.
MAILPIT_EXAMPLE = {
    "From": {"Email": "john@example.com", "Name": "John Doe"},
    "To": [{"Email": "jane@example.com", "Name": "Jane Doe"}],
    "Cc": [{"Email": "manager@example.com", "Name": "Manager"}],
    "Bcc": ["jack@example.com"],
    "ReplyTo": [{"Email": "secretary@example.com", "Name": "Secretary"}],
    "Subject": "Mailpit message via the HTTP API",
    "Text": "Mailpit is awesome!",
    "HTML": '<div style="text-align:center"><p>Mailpit is <b>awesome</b>!</p>'
            '<p><img src="cid:mailpit-logo" /></p></div>',
    "Attachments": [
        {"Content": "VGhpcyBpcyBhIHBsYWluIHRleHQgYXR0YWNobWVudA==",
         "Filename": "AttachedFile.txt"},
        {"Content": base64.b64encode(PNG).decode(), "Filename": "mailpit.png",
         "ContentID": "mailpit-logo", "ContentType": "image/png"},
    ],
    "Headers": {"X-IP": "1.2.3.4"},
    "Tags": ["Tag 1", "Tag 2"],
}


def test_from_mailpit_maps_mailpits_example_onto_the_builder() -> None:
    request = from_mailpit(MAILPIT_EXAMPLE)
    out = submission(request)
    assert out.mail_from == "john@example.com"
    assert out.rcpt_to == ["jane@example.com", "manager@example.com", "jack@example.com"]
    assert out.tags == ["Tag 1", "Tag 2"]
    message = email.message_from_bytes(out.raw, policy=policy.default)
    assert message["From"] == "John Doe <john@example.com>"
    assert message["To"] == "Jane Doe <jane@example.com>"
    assert message["Reply-To"] == "Secretary <secretary@example.com>"
    assert message["X-IP"] == "1.2.3.4" and message["Bcc"] is None
    assert message["Subject"] == "Mailpit message via the HTTP API"
    parts = {part.get_filename(): part for part in message.walk() if part.get_filename()}
    assert parts["AttachedFile.txt"].get_content() == "This is a plain text attachment"
    assert parts["mailpit.png"]["Content-ID"] == "<mailpit-logo>"
    assert parts["mailpit.png"].get_content() == PNG
    # Go's JSON decoding: any case, unknown fields ignored, "" as absent.
    loose = from_mailpit({"from": {"email": "a@example.com"}, "to": [{"email": "b@x.test"}],
                          "HTML": "", "Text": "hi", "Extra": 1})
    assert loose.html is None and loose.text == "hi" and loose.to[0].email == "b@x.test"


@pytest.mark.parametrize(("body", "error"), [
    ({"To": [{"Email": "b@x.test"}]}, "From: required"),
    ({"From": {"Name": "x"}, "To": ["b@x.test"]}, "From.Email: expected a string"),
    ({"From": {"Email": "a@x.test"}, "To": [{"Email": "b@x.test"}, {"Email": "nope"}]},
     "To[1].Email: 'nope' is not an email address"),
    ({"From": "a@x.test", "To": ["b@x.test"], "Attachments": [{"Content": "QQ==",
                                                               "Filename": "a",
                                                               "ContentType": "bad"}]},
     "Attachments[0].ContentType: 'bad' is not a media type"),
    ({"From": "a@x.test", "To": ["b@x.test"], "Headers": {"X-A": "1\r\n2"}},
     "Headers.X-A: control characters"),
])
def test_from_mailpit_names_mailpits_fields_in_errors(body: dict[str, Any], error: str) -> None:
    with pytest.raises(SendError) as caught:
        submission(from_mailpit(body))
    assert str(caught.value).startswith(error)


def test_the_builder_takes_what_parse_send_takes() -> None:
    """The structured JSON and the SendRequest the Mailpit mapping makes meet in one builder."""
    ours = parse_send({"from": {"email": "john@example.com", "name": "John Doe"},
                       "to": [{"email": "jane@example.com", "name": "Jane Doe"}],
                       "subject": "same", "text": "Mailpit is awesome!"})
    theirs = build_message(from_mailpit({"From": {"Email": "john@example.com",
                                                  "Name": "John Doe"},
                                         "To": [{"Email": "jane@example.com",
                                                 "Name": "Jane Doe"}],
                                         "Subject": "same", "Text": "Mailpit is awesome!"}))
    strip = {"Date", "Message-ID"}

    def headers(raw: bytes) -> list[tuple[str, str]]:
        message = email.message_from_bytes(raw, policy=policy.default)
        return [(k, str(v)) for k, v in message.items() if k not in strip]

    assert headers(ours.raw) == headers(theirs)
