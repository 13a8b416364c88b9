"""Browser safety of the HTTP API (issue 9: defects 1, 2, 5 and nosniff), through a real
`mailpipe serve` and raw HTTP requests whose Host, Origin, Referer and Content-Type are set by
hand, as a hostile page (or a DNS-rebound one) would make a browser send them."""

from __future__ import annotations

import http.client
import json
import os
import smtplib
import socket
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

from conftest import ROOT, MailpipeServer, free_port, wait_until_ready
from mailpipe.web.guard import BrowserGuard

Factory = Callable[..., MailpipeServer]
POOL_CONFIG = {
    "server": {"command": [sys.executable, str(ROOT / "examples" / "worker.py")]},
    "smtp": {"pool": {"num_workers": 2}},
}
EVIL = "http://evil.example"


class Answer:
    """One HTTP response: status, headers and the body (decoded when JSON)."""

    def __init__(self, response: http.client.HTTPResponse) -> None:
        self.status = response.status
        self.headers = response.headers
        data = response.read()
        is_json = response.headers.get_content_type() == "application/json"
        self.body: Any = json.loads(data) if is_json else data

    @property
    def error(self) -> str:
        assert isinstance(self.body, dict) and "error" in self.body, self.body
        return str(self.body["error"])


def call(port: int, method: str, path: str, headers: dict[str, str] | None = None,
         body: bytes | None = None) -> Answer:
    """A request with exactly these headers (http.client adds Host only when not given)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        return Answer(conn.getresponse())
    finally:
        conn.close()


def send(server: MailpipeServer, subject: str) -> None:
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=30) as client:
        client.sendmail("app@example.com", ["dev@example.test"],
                        f"Subject: {subject}\r\n\r\nHello.\r\n")


def cli(server: MailpipeServer, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILPIPE_")}
    return subprocess.run([sys.executable, "-m", "mailpipe", *args, "--api", server.api],
                          capture_output=True, text=True, timeout=60, env=env)


def assert_untouched(server: MailpipeServer, subjects: list[str], workers: int) -> None:
    assert server.process.poll() is None, server.log()
    assert sorted(m["subject"] for m in server.messages()) == sorted(subjects)
    assert len(server.get_json("/api/v1/workers")["workers"]) == workers


# ---- defect 1: a web page cannot write --------------------------------------------------------


def test_cross_origin_writes_are_refused_and_change_nothing(mailpipe_factory: Factory) -> None:
    server = mailpipe_factory(POOL_CONFIG)
    send(server, "keep me")
    uuid = server.messages()[0]["uuid"]
    port = server.http_port
    other_port = f"http://127.0.0.1:{free_port()}"
    # The first is the issue's: a no-cors fetch from any page, no preflight, mailpipe exited.
    attempts: list[tuple[str, str, dict[str, str], bytes | None]] = [
        ("POST", "/api/v1/stop", {"Origin": EVIL, "Content-Type": "text/plain"}, b"x"),
        ("POST", "/api/v1/stop", {"Origin": EVIL}, None),
        ("DELETE", "/api/v1/messages", {"Origin": EVIL}, None),
        ("DELETE", f"/api/v1/messages/{uuid}", {"Origin": f"{EVIL}:{port}"}, None),
        ("POST", "/api/v1/workers", {"Referer": f"{EVIL}/page.html"}, None),
        ("DELETE", "/api/v1/workers", {"Origin": "null"}, None),  # a sandboxed iframe
        ("POST", "/api/v1/workers/reset", {"Origin": other_port}, None),  # another local app
        ("POST", "/api/v1/stop", {"Origin": f"https://127.0.0.1:{port}"}, None),
        ("DELETE", "/api/v1/connections/any", {"Origin": EVIL}, None),
        ("POST", "/api/v1/jobs/pipelines/emails/pause", {"Origin": EVIL}, None),
        ("DELETE", "/api/v1/jobs/pipelines/emails/jobs", {"Referer": "garbage"}, None),
        ("PATCH", "/api/v1/messages", {"Origin": EVIL, "Content-Type": "application/json"},
         b"{}"),
    ]
    for method, path, headers, body in attempts:
        answer = call(port, method, path, headers, body)
        assert answer.status == 403, (method, path, headers, answer.body)
        assert "cross-origin request refused" in answer.error
        assert answer.headers["X-Content-Type-Options"] == "nosniff"
    assert_untouched(server, ["keep me"], workers=2)
    assert "Traceback" not in server.log()


def test_same_origin_and_origin_less_writes_are_served(mailpipe_factory: Factory) -> None:
    server = mailpipe_factory(POOL_CONFIG)
    for subject in ("one", "two"):
        send(server, subject)
    first, second = (m["uuid"] for m in server.messages())
    port = server.http_port
    own = f"http://127.0.0.1:{port}"

    assert call(port, "DELETE", f"/api/v1/messages/{first}", {"Origin": own}).status == 204
    # Own origin is the one the request came to: localhost is as good as 127.0.0.1.
    by_name = {"Host": f"localhost:{port}", "Referer": f"http://localhost:{port}/inbox?x=1"}
    answer = call(port, "DELETE", f"/api/v1/messages/{second}", by_name)
    assert answer.status == 204
    json_body = {"Origin": own, "Content-Type": "application/json; charset=utf-8"}
    answer = call(port, "POST", "/api/v1/workers", json_body, b"{}")
    assert answer.status == 201, answer.body
    # No Origin and no Referer: not a web page (curl, scripts): served, a body still JSON.
    answer = call(port, "DELETE", "/api/v1/workers")
    assert answer.status == 200, answer.body
    assert call(port, "POST", "/api/v1/workers/reset").status == 200
    assert_untouched(server, [], workers=2)


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", None])
def test_a_write_body_must_be_json(mailpipe_factory: Factory, content_type: str | None) -> None:
    server = mailpipe_factory(POOL_CONFIG)
    # Without a type the body is refused when a browser sent it (here its Sec-Fetch-Site).
    headers = {"Content-Type": content_type} if content_type else {"Sec-Fetch-Site": "none"}
    answer = call(server.http_port, "POST", "/api/v1/workers", headers, b"--x\r\n")
    assert answer.status == 415
    assert answer.error.startswith("a POST body must be application/json")
    assert_untouched(server, [], workers=2)


def test_the_cli_still_manages_the_server(mailpipe_factory: Factory) -> None:
    server = mailpipe_factory()
    send(server, "stays")
    listed = cli(server, "connections", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == {"connections": []}
    stopped = cli(server, "stop")
    assert stopped.returncode == 0, stopped.stderr
    assert "mailpipe is stopping" in stopped.stdout
    assert server.process.wait(20) == 0


# ---- defect 2: DNS rebinding --------------------------------------------------------------


def test_only_known_host_names_are_served(mailpipe_factory: Factory) -> None:
    server = mailpipe_factory({"http": {"allowed_hosts": ["mail.dev.test"]}})
    send(server, "secret")
    port = server.http_port
    for host in ("evil.example", f"evil.example:{port}", f"127.0.0.1.evil.example:{port}",
                 f"localhost.evil.example:{port}", f"192.0.2.1:{port}", "", "a@localhost"):
        answer = call(port, "GET", "/api/v1/messages", {"Host": host})
        assert answer.status == 403, (host, answer.body)
        assert "http.allowed_hosts" in answer.error
        answer = call(port, "DELETE", "/api/v1/messages", {"Host": host, "Origin": EVIL})
        assert answer.status == 403
    for host in (f"127.0.0.1:{port}", "localhost", f"LOCALHOST.:{port}", f"[::1]:{port}",
                 f"mail.dev.test:{port}", "Mail.Dev.Test"):
        answer = call(port, "GET", "/api/v1/messages", {"Host": host})
        assert answer.status == 200, (host, answer.body)
        assert answer.body["messages"][0]["subject"] == "secret"
    # The page on a listed name is same-origin, so it may write (the inbox of issue 12 will).
    allowed = {"Host": f"mail.dev.test:{port}", "Origin": f"http://mail.dev.test:{port}"}
    assert call(port, "DELETE", "/api/v1/messages", allowed).status == 200
    assert "no http.allowed_hosts" not in server.log()


def test_wildcard_bind_serves_ip_literals_and_warns(mailpipe_factory: Factory) -> None:
    port = free_port()
    server = mailpipe_factory({"http": {"addr": f"0.0.0.0:{port}"}}, wait=False)
    server.http_port = port
    wait_until_ready(server)
    # Any of the machine's addresses is an IP literal, which no rebinding page can be under.
    own_ips = {"192.0.2.10", "[2001:db8::1]", socket.gethostbyname(socket.gethostname())}
    for ip in own_ips:
        assert call(port, "GET", "/api/v1/messages", {"Host": f"{ip}:{port}"}).status == 200
    for name in ("evil.example", f"{socket.gethostname()}.invalid"):
        assert call(port, "GET", "/api/v1/messages", {"Host": f"{name}:{port}"}).status == 403
    log = server.log()
    assert log.count("no http.allowed_hosts") == 1, log


def test_any_host_is_served_with_a_warning(mailpipe_factory: Factory) -> None:
    server = mailpipe_factory({"http": {"allowed_hosts": ["*"]}})
    answer = call(server.http_port, "GET", "/api/v1/messages", {"Host": "evil.example"})
    assert answer.status == 200
    assert "any Host is served" in server.log()


def test_a_bad_allowed_hosts_entry_stops_startup(mailpipe_factory: Factory) -> None:
    server = mailpipe_factory({"http": {"allowed_hosts": ["http://mail.dev.test:8025"]}},
                              wait=False)
    assert server.process.wait(20) != 0
    assert "allowed_hosts" in server.log() + (server.workdir / "stdout.log").read_text()


# ---- defect 5: numeric parameters ---------------------------------------------------------

BAD_PARAMETERS = [
    ("offset=9223372036854775808", "offset must be an integer between 0 and 9223372036854775807"),
    ("offset=-1", "offset must be an integer between 0 and 9223372036854775807"),
    ("offset=ten", "offset must be an integer between 0 and 9223372036854775807"),
    ("offset=" + "9" * 5000, "offset must be an integer between 0 and 9223372036854775807"),
    ("limit=0", "limit must be an integer between 1 and 1000"),
    ("limit=99999999999999999999999", "limit must be an integer between 1 and 1000"),
    ("limit=1e3", "limit must be an integer between 1 and 1000"),
    ("limit=%EF%BC%95", "limit must be an integer between 1 and 1000"),  # a fullwidth 5
]


def test_numeric_parameters_are_bounded(mailpipe_factory: Factory) -> None:
    server = mailpipe_factory()
    send(server, "paged")
    uuid = server.messages()[0]["uuid"]
    port = server.http_port
    for query, reason in BAD_PARAMETERS:
        answer = call(port, "GET", f"/api/v1/messages?{query}")
        assert (answer.status, answer.error) == (400, reason), query
    for index in ("-1", "x", "99999999999999999999", "1" * 5000):
        answer = call(port, "GET", f"/api/v1/messages/{uuid}/attachments/{index}")
        assert answer.status == 400, (index, answer.body)
        assert answer.error == "index must be an integer between 0 and 1000000"
    # The largest offset SQLite takes is served: an empty page, not a 500.
    answer = call(port, "GET", "/api/v1/messages?offset=9223372036854775807&limit=1000")
    assert answer.status == 200
    assert (answer.body["total"], answer.body["messages"]) == (1, [])
    assert call(port, "GET", "/api/v1/messages?offset=0000&limit=001").body["count"] == 1
    answer = call(port, "GET", f"/api/v1/messages?limit={'0' * 5000}1")  # zeros: still 1
    assert (answer.status, answer.body["limit"]) == (200, 1)
    log = server.log()
    assert "Traceback" not in log and "OverflowError" not in log


# ---- defect 8: nosniff --------------------------------------------------------------------


def test_every_response_says_nosniff(mailpipe_factory: Factory) -> None:
    server = mailpipe_factory({"smtp": {"include_raw": True}})
    send(server, "sniff")
    uuid = server.messages()[0]["uuid"]
    port = server.http_port
    for method, path in [("GET", "/api/v1/messages"), ("GET", f"/api/v1/messages/{uuid}"),
                         ("GET", "/healthz"), ("GET", "/api/openapi.json"),
                         ("GET", "/api/v1/schema"), ("GET", "/metrics"),
                         ("GET", "/api/v1/nothing"), ("PUT", "/api/v1/messages"),
                         ("GET", "/api/v1/messages?limit=-1"), ("GET", "/api/v1/connections")]:
        answer = call(port, method, path)
        assert answer.headers.get_all("X-Content-Type-Options") == ["nosniff"], (method, path)
    answer = call(port, "GET", f"/api/v1/messages/{uuid}/raw")
    assert answer.status == 200
    assert answer.headers.get_all("X-Content-Type-Options") == ["nosniff"]
    assert answer.headers["Content-Security-Policy"] == "sandbox"


def test_nosniff_with_auth_refusals(mailpipe_factory: Factory) -> None:
    server = mailpipe_factory({"http": {"auth": {"type": "bearer", "token": "t0k"}}})
    answer = call(server.http_port, "GET", "/api/v1/messages")
    assert answer.status == 401
    assert answer.headers["X-Content-Type-Options"] == "nosniff"


def sign_in(port: int, token: str, headers: dict[str, str] | None = None) -> Answer:
    body = json.dumps({"token": token}).encode()
    return call(port, "POST", "/api/v1/session",
                {"Content-Type": "application/json", **(headers or {})}, body)


def session_cookie(answer: Answer) -> str:
    assert answer.status == 200, answer.body
    return answer.headers["Set-Cookie"].split(";", 1)[0]


def test_the_sign_in_refuses_other_sites(mailpipe_factory: Factory) -> None:
    """Login CSRF (signing a browser in to the attacker's choice) and cookie-riding: the
    guard refuses a cross-origin or non-JSON POST/DELETE, and SameSite=Strict keeps the
    cookie off other sites' requests."""
    server = mailpipe_factory({"http": {"auth": {"type": "bearer", "token": "t0k"}}})
    port = server.http_port
    own = f"http://127.0.0.1:{port}"
    for headers in ({"Origin": EVIL}, {"Referer": EVIL + "/login"}, {"Origin": "null"}):
        answer = sign_in(port, "t0k", headers)
        assert answer.status == 403 and "cross-origin" in answer.error, headers
        assert "Set-Cookie" not in answer.headers
    form = call(port, "POST", "/api/v1/session",
                {"Content-Type": "application/x-www-form-urlencoded"}, b"token=t0k")
    assert form.status == 415 and "Set-Cookie" not in form.headers
    cookie = session_cookie(sign_in(port, "t0k", {"Origin": own}))
    assert call(port, "GET", "/api/v1/messages", {"Cookie": cookie}).status == 200
    # Signing out from another site: refused too.
    answer = call(port, "DELETE", "/api/v1/session", {"Origin": EVIL, "Cookie": cookie})
    assert answer.status == 403 and "Set-Cookie" not in answer.headers
    answer = call(port, "DELETE", "/api/v1/session", {"Origin": own, "Cookie": cookie})
    assert answer.status == 204 and "Max-Age=0" in answer.headers["Set-Cookie"]


def test_a_session_cookie_works_in_its_own_process_only(mailpipe_factory: Factory) -> None:
    config = {"http": {"auth": {"type": "bearer", "token": "same-token"}}}
    first, second = mailpipe_factory(config), mailpipe_factory(config)
    cookie = session_cookie(sign_in(first.http_port, "same-token"))
    assert "same-token" not in cookie
    assert call(first.http_port, "GET", "/api/v1/messages", {"Cookie": cookie}).status == 200
    # Same token, another process: another key, so the cookie means nothing there.
    refused = call(second.http_port, "GET", "/api/v1/messages", {"Cookie": cookie})
    assert refused.status == 401 and refused.headers["WWW-Authenticate"].startswith("Bearer")
    assert call(second.http_port, "GET", "/api/v1/events", {"Cookie": cookie}).status == 401
    assert session_cookie(sign_in(second.http_port, "same-token")) != cookie


# ---- the guard's rules, one request each ---------------------------------------------------


@pytest.mark.parametrize(
    ("bind", "method", "headers", "verdict"),
    [
        ("127.0.0.1", "GET", {"Host": "[::1]"}, None),
        ("127.0.0.1", "GET", {}, None),  # HTTP/1.0 without Host: never a browser
        ("127.0.0.1", "GET", {"Host": "[::1"}, 403),
        ("127.0.0.1", "GET", {"Host": "127.0.0.2:8025"}, 403),
        ("192.168.7.7", "GET", {"Host": "192.168.7.7:8025"}, None),
        ("192.168.7.7", "GET", {"Host": "10.1.1.1:8025"}, 403),
        ("::", "GET", {"Host": "[fe80::1]:8025"}, None),
        ("devbox.lan", "GET", {"Host": "DevBox.lan"}, None),
        ("127.0.0.1", "POST", {"Host": "localhost", "Origin": "http://localhost:80"}, None),
        ("127.0.0.1", "POST", {"Host": "localhost:80", "Origin": "http://localhost"}, None),
        ("127.0.0.1", "POST", {"Host": "localhost", "Origin": "http://localhost:8080"}, 403),
        ("127.0.0.1", "POST", {"Origin": "http://localhost"}, 403),  # no Host to compare
        ("127.0.0.1", "GET", {"Host": "localhost", "Origin": EVIL}, None),  # reads: SOP
        ("127.0.0.1", "OPTIONS", {"Host": "localhost", "Origin": EVIL}, None),
        ("127.0.0.1", "PURGE", {"Host": "localhost", "Origin": EVIL}, 403),
        # A body without a type: a script's (npm's mailhog client's), unless a browser's.
        ("127.0.0.1", "PUT", {"Host": "localhost", "Transfer-Encoding": "chunked"}, None),
        ("127.0.0.1", "PUT", {"Host": "localhost", "Transfer-Encoding": "chunked",
                              "Sec-Fetch-Mode": "no-cors"}, 415),
        ("127.0.0.1", "POST", {"Host": "localhost", "Content-Length": "2",
                               "Origin": "http://localhost"}, 415),
        ("127.0.0.1", "POST", {"Host": "localhost", "Content-Length": "2",
                               "Referer": "http://localhost/"}, 415),
        ("127.0.0.1", "PUT", {"Host": "localhost", "Content-Length": "0",
                              "Content-Type": "text/plain"}, None),
        ("127.0.0.1", "PATCH", {"Host": "localhost", "Content-Length": "2",
                                "Content-Type": "application/merge-patch+json"}, None),
        ("127.0.0.1", "DELETE", {"Host": "localhost", "Content-Length": "2",
                                 "Content-Type": "text/plain"}, None),
    ],
)
def test_guard_rules(bind: str, method: str, headers: dict[str, str], verdict: int | None) -> None:
    refusal = BrowserGuard(bind).check(method, "http", headers)
    assert (refusal.status if refusal else None) == verdict, refusal
