"""Slow and greedy SMTP clients (issue 9, defect 4) against a real `mailpipe serve` over real
sockets: a command line trickled a byte at a time, a body trickled below `min_data_rate`,
slots held by slow clients, and `max_connections_per_ip`.

Every client here comes from the loopback: Linux routes all of 127/8 to `lo`, so a socket
bound to 127.0.0.2 or 127.0.0.3 is a client of another address on the same machine.

The limits are small (read_timeout 1s, data_timeout 2s). No test times the server: a cut is
shown by the server answering 421 before the trickled line or body was complete, which the
unfixed server never did (each byte restarted its idle timer)."""

from __future__ import annotations

import select
import smtplib
import socket
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from conftest import ROOT, MailpipeServer, free_port
from test_server import RCPT, SENDER, RawSMTP, by_subject, message, metric, wait_for

Factory = Callable[..., MailpipeServer]

LIMITS: dict[str, Any] = {
    "read_timeout": "1s",
    "data_timeout": "2s",
    "min_data_rate": "1KB",
    "max_connections_per_ip": 3,
}
TRICKLE = 0.1  # seconds between two bytes of a trickling client: well inside read_timeout
# A command line that takes 25 s to trickle out, and a body that takes 30 s.
SLOW_LINE = b"EHLO " + b"slow" * 60 + b".test\r\n"
SLOW_BODY = b"x" * 295 + b"\r\n.\r\n"


class Client(RawSMTP):
    """RawSMTP from a chosen source address, able to trickle."""

    def __init__(self, port: int, source: str = "127.0.0.1", *, greet: bool = True) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10,
                                             source_address=(source, 0))
        self.buf = b""
        if greet:
            code, text = self.reply()
            assert code == 220, text

    def trickle(self, data: bytes, interval: float = TRICKLE) -> int:
        """Send `data` one byte at a time, `interval` apart, until the server says something
        or closes; the number of bytes that went out."""
        for sent, byte in enumerate(data):
            try:
                self.send(bytes([byte]))
            except OSError:  # reset by the server
                return sent
            readable, _, _ = select.select([self.sock], [], [], interval)
            if readable:
                return sent + 1
        return len(data)

    def cut_off(self, data: bytes) -> tuple[int, str]:
        """Trickle `data`: the server must answer before it is all out, and close; its reply."""
        sent = self.trickle(data)
        assert sent < len(data), "it all trickled out, and the server kept waiting"
        reply = self.reply()
        assert self.wait_closed()
        self.close()
        return reply

    def start_body(self, subject: str) -> None:
        self.expect("EHLO client.test", 250)
        self.expect(f"MAIL FROM:<{SENDER}>", 250)
        self.expect(f"RCPT TO:<{RCPT}>", 250)
        self.expect("DATA", 354)
        self.send(f"Subject: {subject}\r\n\r\n".encode())


def sent_from(server: MailpipeServer, source: str, subject: str) -> bool:
    """One email from `source` via smtplib; False if the server refused the connection."""
    try:
        with smtplib.SMTP("127.0.0.1", server.smtp_port, source_address=(source, 0),
                          timeout=15) as client:
            client.sendmail(SENDER, [RCPT], message(subject))
    except smtplib.SMTPConnectError:
        return False
    return True


def timed_out(server: MailpipeServer, reason: str, listener: str = "default") -> float:
    return metric(server, "mailpipe_connections_timed_out_total", server=listener, reason=reason)


def refused(server: MailpipeServer, reason: str, listener: str = "default") -> float:
    return metric(server, "mailpipe_connections_refused_total", server=listener, reason=reason)


# ---- too slow -----------------------------------------------------------------------------


def test_command_line_trickled_a_byte_at_a_time_is_cut(mailpipe_factory: Factory) -> None:
    server = mailpipe_factory({"smtp": LIMITS})
    client = Client(server.smtp_port)
    assert client.cut_off(SLOW_LINE) == (421, "4.4.2 localhost Error: timeout exceeded")
    assert timed_out(server, "read_timeout") == 1
    assert "read timeout, closing" in server.log()


def test_body_trickled_below_min_data_rate_is_cut(mailpipe_factory: Factory) -> None:
    server = mailpipe_factory({"smtp": LIMITS})
    client = Client(server.smtp_port)
    client.start_body("trickled")
    # 10 bytes a second against a minimum of 1 KB a second
    assert client.cut_off(SLOW_BODY) == (421, "4.4.2 localhost Error: data rate too low")
    assert timed_out(server, "data_rate") == 1
    assert "data rate too low, closing" in server.log()
    assert server.get_json("/api/v1/messages")["total"] == 0  # nothing half-received is kept


def test_slow_body_done_within_data_timeout_is_taken(mailpipe_factory: Factory) -> None:
    # min_data_rate is an average that only a body lasting longer than data_timeout must keep
    server = mailpipe_factory({"smtp": LIMITS})
    client = Client(server.smtp_port)
    client.start_body("slow but short")
    assert client.trickle(b"hi\r\n") == 4  # 4 bytes in 0.4 s: far below 1 KB/s
    code, text = client.command(".")
    assert code == 250, text
    client.expect("QUIT", 221)
    client.close()
    assert by_subject(server, "slow but short")["message"]["text"] == "hi\r\n"
    assert timed_out(server, "data_rate") == 0


def test_time_waiting_for_a_worker_is_not_the_clients(mailpipe_factory: Factory) -> None:
    worker = [sys.executable, str(ROOT / "examples" / "worker.py")]
    server = mailpipe_factory(
        {"server": {"command": worker}, "smtp": {**LIMITS, "pool": {"num_workers": 1}}}
    )
    client = Client(server.smtp_port)
    client.expect("EHLO client.test", 250)
    # The worker takes 2.5 s, past read_timeout and data_timeout: that wait is ours.
    for subject in ("first [sleep 2.5]", "second [sleep 2.5]"):
        client.expect(f"MAIL FROM:<{SENDER}>", 250)
        client.expect(f"RCPT TO:<{RCPT}>", 250)
        client.expect("DATA", 354)
        client.send(message(subject) + b".\r\n")
        client.sock.settimeout(30)
        code, text = client.reply()
        assert code == 250, text
    client.expect("QUIT", 221)
    client.close()
    assert timed_out(server, "read_timeout") + timed_out(server, "data_rate") == 0


# ---- slots --------------------------------------------------------------------------------


def test_trickling_clients_do_not_keep_every_slot(mailpipe_factory: Factory) -> None:
    server = mailpipe_factory({"smtp": {**LIMITS, "max_connections": 3}})
    slow = [Client(server.smtp_port, "127.0.0.2") for _ in range(3)]
    with ThreadPoolExecutor(len(slow)) as pool:
        cuts = [pool.submit(client.cut_off, SLOW_LINE) for client in slow]
        # every slot is taken for now...
        code, text = Client(server.smtp_port, greet=False).reply()
        assert (code, text) == (421, "4.7.0 Too many connections, try again later")
        # ...but a slow client cannot keep its slot by trickling: a real client soon gets in,
        # long before the trickled lines (25 s each) could be done
        assert wait_for(lambda: sent_from(server, "127.0.0.1", "got a slot"), timeout=15)
        for cut in cuts:
            assert cut.result() == (421, "4.4.2 localhost Error: timeout exceeded")
    assert by_subject(server, "got a slot")["envelope"]["to"] == [RCPT]
    assert timed_out(server, "read_timeout") == 3


def test_one_address_cannot_take_every_slot(mailpipe_factory: Factory) -> None:
    # read_timeout 30s: the three connections from 127.0.0.1 stay open through the test
    server = mailpipe_factory({"smtp": {**LIMITS, "read_timeout": "30s"}})
    held = [Client(server.smtp_port) for _ in range(3)]
    fourth = Client(server.smtp_port, greet=False)
    assert fourth.reply() == (421, "4.7.0 Too many connections from your address")
    assert fourth.wait_closed()
    fourth.close()
    assert refused(server, "max_connections_per_ip") == 1
    # other addresses still get in and are served while those three are open
    assert sent_from(server, "127.0.0.2", "from 127.0.0.2")
    assert sent_from(server, "127.0.0.3", "from 127.0.0.3")
    connections = server.get_json("/api/v1/connections")["connections"]
    assert sorted(c["remote_addr"].rpartition(":")[0] for c in connections) == ["127.0.0.1"] * 3
    # a slot one of them frees is that address's again
    held.pop().close()
    assert wait_for(lambda: len(server.get_json("/api/v1/connections")["connections"]) == 2)
    again = Client(server.smtp_port)  # greeted with 220
    again.expect("QUIT", 221)
    for client in [again, *held]:
        client.close()
    assert refused(server, "max_connections_per_ip") == 1
    assert refused(server, "max_connections") == 0


def test_max_connections_per_ip_is_set_per_listener(mailpipe_factory: Factory) -> None:
    strict, loose = free_port(), free_port()
    server = mailpipe_factory({"smtp": {**LIMITS, "read_timeout": "30s", "servers": [
        {"name": "strict", "addr": f"127.0.0.1:{strict}", "max_connections_per_ip": 1},
        {"name": "loose", "addr": f"127.0.0.1:{loose}"},  # smtp's 3
    ]}})
    clients = [Client(strict), *(Client(loose) for _ in range(3))]
    assert Client(strict, greet=False).reply()[0] == 421
    assert Client(loose, greet=False).reply()[0] == 421
    for client in clients:
        client.close()
    assert refused(server, "max_connections_per_ip", "strict") == 1
    assert refused(server, "max_connections_per_ip", "loose") == 1
