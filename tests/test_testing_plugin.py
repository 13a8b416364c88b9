"""mailpipe.testing as a user meets it: a test module of "their" project, run by pytest in a
separate process that finds the plugin through its pytest11 entry point, sending over SMTP
with smtplib as an application would."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mailpipe.testing import start_mailpipe

USER_TESTS = '''
import smtplib
import threading
import time
from email.message import EmailMessage

import pytest


def send(server, to, subject, html=None, text="Your code is 384912."):
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "app@example.test", to, subject
    msg.set_content(text)
    if html:
        msg.add_alternative(html, subtype="html")
    with smtplib.SMTP(server.smtp_host, server.smtp_port) as smtp:
        smtp.send_message(msg)


def test_sign_up_flow(mailpipe_server):
    send(mailpipe_server, "someone@example.test", "Welcome")
    html = '<p>Hi</p><a href="https://app.test/confirm?t=abc">Confirm</a>'
    later = threading.Timer(0.5, send, (mailpipe_server, "ann@example.test", "Confirm", html))
    later.start()
    email = mailpipe_server.wait_for_email(to="ann@", subject="confirm", timeout=10)
    assert email["message"]["subject"] == "Confirm"
    assert mailpipe_server.codes(email["uuid"]) == ["384912"]
    urls = [link["url"] for link in mailpipe_server.links(email["uuid"])]
    assert urls == ["https://app.test/confirm?t=abc"]
    assert len(mailpipe_server.messages()) == 2


def test_timeout_says_what_arrived(mailpipe_server):
    send(mailpipe_server, "bob@example.test", "Something else")
    start = time.monotonic()
    with pytest.raises(AssertionError, match="Something else"):
        mailpipe_server.wait_for_email(subject="Reset", timeout=1)
    assert time.monotonic() - start < 5


@pytest.fixture
def mailpipe_config():
    return {"http": {"base_path": "/mail", "auth": {"type": "bearer", "token": "t"}}}


def test_own_config(mailpipe_server):
    assert mailpipe_server.http_url.endswith("/mail")
    send(mailpipe_server, "c@example.test", "Prefixed")
    assert mailpipe_server.wait_for_email(timeout=5)["message"]["subject"] == "Prefixed"
    mailpipe_server.clear()
    assert mailpipe_server.messages() == []
'''


def test_a_users_test_module(tmp_path: Path) -> None:
    (tmp_path / "test_user_app.py").write_text(textwrap.dedent(USER_TESTS))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_user_app.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 passed" in result.stdout


def test_start_mailpipe_directly(tmp_path: Path) -> None:
    import smtplib

    with start_mailpipe(data_dir=tmp_path) as server:
        with smtplib.SMTP(server.smtp_host, server.smtp_port) as smtp:
            smtp.sendmail("a@x.test", ["b@x.test"], b"Subject: direct\r\n\r\ncode 1234\r\n")
        email = server.wait_for_email(to="b@x.test", timeout=5)
        assert server.codes(email["uuid"]) == ["1234"]
    with pytest.raises(OSError):  # stopped: nothing listens any more
        socket.create_connection((server.smtp_host, server.smtp_port), timeout=2).close()
