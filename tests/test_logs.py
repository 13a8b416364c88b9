"""mailpipe's own log, as a real `mailpipe serve` writes it while real clients talk to it over
real sockets: client values cannot inject escape sequences or forged lines (issue 9, defect 6),
and a TLS handshake cut short says why (defect 8)."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable

from conftest import MailpipeServer
from test_server import RCPT, RawSMTP, message, wait_for

Factory = Callable[..., MailpipeServer]

# What a hostile client sends: an ANSI colour, a CR that forges an "ERROR" line, a terminal
# title (OSC ... BEL), a NUL, a C1 control, a Unicode line separator and a bidi override.
SENDER = "a\x1b[31mRED@x.test"
FORGED = "b\rFAKE 2026 ERROR injected@x.test"
HELO = "evil\x1b]0;pwned\x07\x00.test"
USER = "me\x1b[2J\u2028\u202e\x9bX"


def hostile_session(server: MailpipeServer) -> None:
    client = RawSMTP(server.smtp_port)
    client.expect(f"EHLO {HELO}", 250)
    plain = base64.b64encode(f"\0{USER}\0secret".encode()).decode()
    client.expect(f"AUTH PLAIN {plain}", 235)
    client.expect(f"MAIL FROM:<{SENDER}>", 250)
    client.expect(f"RCPT TO:<{FORGED}>", 250)
    client.expect(f"RCPT TO:<{RCPT}>", 250)
    client.expect("DATA", 354)
    client.send(message("hostile") + b".\r\n")
    assert client.reply()[0] == 250
    client.expect("QUIT", 221)
    client.close()


def test_console_log_escapes_control_characters_of_client_values(
    mailpipe_factory: Factory,
) -> None:
    # debug: every command line is logged too, not only the accepted email's envelope
    server = mailpipe_factory(args=["--log-level", "debug", "--log-format", "console"])
    hostile_session(server)
    assert wait_for(lambda: "email accepted" in server.log())
    raw = server.log_path.read_bytes()
    assert b"\n" in raw
    unsafe = sorted({chr(b) for b in raw if (b < 0x20 and b != 0x0A) or b == 0x7F})
    assert not unsafe, f"raw control bytes in the log: {unsafe}"
    text = raw.decode()
    assert not re.search("[\x80-\x9f\u2028\u2029\u202a-\u202e]", text)
    for line in text.splitlines():
        assert not line.startswith("FAKE"), f"a forged line: {line!r}"
    # each value is there, escaped, in the command lines and in the accepted email's envelope
    assert r"MAIL FROM:<a\x1b[31mRED@x.test>" in text
    assert r"RCPT TO:<b\rFAKE 2026 ERROR injected@x.test>" in text
    assert r"EHLO evil\x1b]0;pwned\x07\x00.test" in text
    accepted = next(line for line in text.splitlines() if "email accepted" in line)
    assert r"from=a\x1b[31mRED@x.test" in accepted
    assert r"to=b\rFAKE 2026 ERROR injected@x.test,dev@example.test" in accepted
    # the AUTH line is masked; the captured event keeps every value as the client sent it
    assert "secret" not in text
    event = server.event(server.messages()[0]["uuid"])
    assert event["envelope"]["from"] == SENDER
    assert event["envelope"]["to"] == [FORGED, RCPT]
    assert event["envelope"]["helo"] == HELO
    assert event["authentication"]["username"] == USER


def test_json_log_keeps_client_values_intact_and_on_one_line(mailpipe_factory: Factory) -> None:
    server = mailpipe_factory(args=["--log-level", "debug", "--log-format", "json"])
    hostile_session(server)
    assert wait_for(lambda: "email accepted" in server.log())
    records = [json.loads(line) for line in server.log_path.read_text().splitlines()]
    accepted = next(r for r in records if r["msg"] == "email accepted")
    assert (accepted["from"], accepted["to"]) == (SENDER, f"{FORGED},{RCPT}")


def test_tls_handshake_cut_short_is_logged_with_its_reason(mailpipe_factory: Factory) -> None:
    server = mailpipe_factory({"smtp": {"tls": "self-signed"}})
    client = RawSMTP(server.smtp_port)
    client.expect("EHLO client.test", 250)
    client.expect("STARTTLS", 220)
    client.close()  # before any handshake byte
    assert wait_for(lambda: "TLS handshake failed" in server.log())
    line = next(x for x in server.log().splitlines() if "TLS handshake failed" in x)
    reason = re.search(r"TLS handshake failed: (.*?) session=", line)
    assert reason, line
    assert "client closed the connection during the TLS handshake" in reason[1], line
