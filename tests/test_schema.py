"""The event's JSON Schema ships in the package and a running mailpipe serves it.

`GET /api/v1/schema` is asked of a real `mailpipe serve` with HTTP auth on, and the event of
an email sent over SMTP is validated against what it served.
"""

from __future__ import annotations

import json
import smtplib
from collections.abc import Callable
from email.message import EmailMessage
from importlib import resources
from typing import Any

from jsonschema import Draft202012Validator

from conftest import MailpipeServer
from mailpipe.schema import SCHEMA_FILE, event_schema, event_schema_bytes

TOKEN = {"Authorization": "Bearer sch3ma-t0ken"}


def test_schema_file_is_in_the_package_and_a_valid_2020_12_schema() -> None:
    shipped = resources.files("mailpipe.schema").joinpath(SCHEMA_FILE).read_bytes()
    assert event_schema_bytes() == shipped
    schema = event_schema()
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["required"] == [
        "event",
        "uuid",
        "remote_addr",
        "received_at",
        "envelope",
        "authentication",
        "message",
        "attachments",
    ]


def test_schema_served_over_http_with_the_api_auth(
    mailpipe_factory: Callable[..., MailpipeServer],
) -> None:
    auth = {"type": "bearer", "token": "sch3ma-t0ken"}
    server = mailpipe_factory({"http": {"auth": auth}, "smtp": {"transcript": True}})
    status, body, headers = server.request("GET", "/api/v1/schema")
    assert status == 401
    assert json.loads(body) == {"error": "authentication required"}
    assert headers["WWW-Authenticate"].startswith("Bearer ")

    status, body, headers = server.request("GET", "/api/v1/schema", TOKEN)
    assert status == 200
    assert headers["Content-Type"].split(";")[0] == "application/schema+json"
    assert body == event_schema_bytes()

    served = Draft202012Validator(json.loads(body))
    event = send_and_fetch(server)
    assert [error.message for error in served.iter_errors(event)] == []
    assert event["session"]["transcript"]  # an optional field, present and described


def send_and_fetch(server: MailpipeServer) -> dict[str, Any]:
    message = EmailMessage()
    message["Subject"] = "schema check"
    message.set_content("body")
    message.add_attachment(
        b"\x00\x01", maintype="application", subtype="octet-stream", filename="a.bin"
    )
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=15) as client:
        client.login("user", "pass")
        client.send_message(message, "from@example.test", ["to@example.test"])
    status, body, _ = server.request("GET", "/api/v1/messages?limit=1", TOKEN)
    assert status == 200
    (summary,) = json.loads(body)["messages"]
    status, body, _ = server.request("GET", f"/api/v1/messages/{summary['uuid']}", TOKEN)
    assert status == 200
    return json.loads(body)
