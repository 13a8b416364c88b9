"""Sinks: typed results, the Dispatcher's delivery, per-sink timeouts and failure policies, the
registry and its config sections, and a third-party sink installed through the entry-point
group into a real `mailpipe serve`.

The small Sink subclasses below are test peers (sinks that accept, refuse, raise or hang, as a
real sink may), beside the real store and jsonl sinks; the Dispatcher itself is the real one.
"""

from __future__ import annotations

import asyncio
import json
import os
import smtplib
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import MailpipeServer, make_email
from mailpipe.config import ConfigError, load_config
from mailpipe.event import CapturedEmail
from mailpipe.metrics import Metrics
from mailpipe.sinks.base import DELIVER, RECORD, Sink
from mailpipe.sinks.dispatch import Dispatcher
from mailpipe.sinks.jsonl import JSONLSink
from mailpipe.sinks.registry import build_sinks
from mailpipe.sinks.results import Accepted, DeliveryResult, Reject, SinkResult, TempFail
from mailpipe.store.sqlite import SQLiteStore, StoreSink

Factory = Callable[..., MailpipeServer]


class Answering(Sink):
    """Answers every email with the same result, and remembers which emails it saw."""

    def __init__(self, name: str, result: SinkResult, *, stage: int = DELIVER,
                 required: bool = True) -> None:
        self.name, self.result, self.stage, self.required = name, result, stage, required
        self.seen: list[str] = []

    async def submit(self, email: CapturedEmail) -> SinkResult:
        self.seen.append(email.uuid)
        return self.result


class Raising(Answering):
    def __init__(self, name: str, **kwargs: Any) -> None:
        super().__init__(name, Accepted(), **kwargs)

    async def submit(self, email: CapturedEmail) -> SinkResult:
        self.seen.append(email.uuid)
        raise ConnectionRefusedError(111, "downstream refused the connection")


class Hanging(Answering):
    def __init__(self, name: str, **kwargs: Any) -> None:
        super().__init__(name, Accepted(), **kwargs)

    async def submit(self, email: CapturedEmail) -> SinkResult:
        self.seen.append(email.uuid)
        await asyncio.Event().wait()
        raise AssertionError("never answered")


class Sloppy(Answering):
    """A buggy sink that returns a bool, as sinks did before results were typed."""

    async def submit(self, email: CapturedEmail) -> Any:
        return True


@pytest.fixture
async def store_sink(tmp_path: Path) -> AsyncIterator[StoreSink]:
    yield StoreSink(SQLiteStore(tmp_path / "store.db", metrics=Metrics()))


@pytest.fixture
def jsonl(tmp_path: Path) -> JSONLSink:
    """The jsonl sink on a file, required (so it writes before the reply)."""
    sink = JSONLSink(str(tmp_path / "events.jsonl"))
    sink.required = True
    return sink


async def dispatch(sinks: list[Sink], email: CapturedEmail,
                   metrics: Metrics | None = None) -> DeliveryResult:
    """One email through a started Dispatcher, closed after (background sinks finish)."""
    dispatcher = Dispatcher(sinks, metrics or Metrics())
    await dispatcher.start()
    try:
        return await dispatcher.deliver(email)
    finally:
        await dispatcher.close()


def accepted(metrics: Metrics, sink: str) -> float:
    value = metrics.registry.get_sample_value("mailpipe_sink_latency_seconds_count",
                                              {"sink": sink})
    return value or 0.0


def results(metrics: Metrics, sink: str, result: str) -> float:
    value = metrics.registry.get_sample_value("mailpipe_sink_results_total",
                                              {"sink": sink, "result": result})
    return value or 0.0


async def stored(tmp_path: Path, uuid: str) -> dict[str, Any] | None:
    store = SQLiteStore(tmp_path / "store.db")
    await store.start()
    try:
        return await store.get(uuid)
    finally:
        await store.close()


# ---- results --------------------------------------------------------------------------------


def test_results_only_take_codes_of_their_class() -> None:
    assert (TempFail().code, TempFail().enhanced) == (451, "4.3.0")
    assert (Reject().code, Reject().enhanced) == (550, "5.7.1")
    assert TempFail("Greylisted", "4.7.1", 450).code == 450
    for bad in (lambda: TempFail(code=550), lambda: TempFail(enhanced="5.3.0"),
                lambda: Reject(code=451), lambda: Reject(enhanced="4.7.1"),
                lambda: Reject(code=600), lambda: Reject(enhanced="5.7"),
                lambda: Reject("no\r\n250 ok")):
        with pytest.raises(ValueError):
            bad()


# ---- the dispatcher's delivery -----------------------------------------------------------------


async def test_every_sink_accepting_gives_250_and_each_sink_has_the_email(
    tmp_path: Path, store_sink: StoreSink
) -> None:
    out = tmp_path / "events.jsonl"
    jsonl = JSONLSink(str(out))  # optional: after the 250, in the background
    worker = Answering("relay", Accepted(note={"downstream": "eu"}))
    email = make_email("all accept")
    metrics = Metrics()
    delivery = await dispatch([worker, store_sink, jsonl], email, metrics)
    assert accepted(metrics, "relay") == accepted(metrics, "store") == 1
    assert delivery == DeliveryResult(250, "2.0.0", f"Ok: queued as {email.uuid}")
    assert delivery.accepted and not delivery.close
    assert worker.seen == [email.uuid]
    assert json.loads(out.read_bytes())["uuid"] == email.uuid
    event = await stored(tmp_path, email.uuid)
    assert event is not None
    assert event["mailpipe"]["outcomes"] == {"relay": {"downstream": "eu"}}


async def test_tempfail_decides_and_nothing_is_recorded(
    tmp_path: Path, store_sink: StoreSink, jsonl: JSONLSink
) -> None:
    out = Path(jsonl.path)
    busy = Answering("relay", TempFail("Downstream busy", "4.4.5", 452, reason="eu: 421"))
    email = make_email("tempfail")
    metrics = Metrics()
    delivery = await dispatch([busy, jsonl, store_sink], email, metrics)
    assert delivery == DeliveryResult(452, "4.4.5", "Downstream busy", sink="relay")
    assert not delivery.accepted
    # The client sends the email again: recording this attempt would list it twice.
    assert await stored(tmp_path, email.uuid) is None
    assert out.read_bytes() == b""
    assert email.outcomes["relay"] == {"result": "tempfail", "code": 452, "enhanced": "4.4.5",
                                       "text": "Downstream busy", "reason": "eu: 421"}
    assert results(metrics, "relay", "tempfail") == 1
    assert accepted(metrics, "store") == 0


async def test_reject_is_final_and_only_the_store_records_it(
    tmp_path: Path, store_sink: StoreSink, jsonl: JSONLSink
) -> None:
    out = Path(jsonl.path)
    later = Answering("archive", Accepted(), stage=RECORD)
    background = Answering("webhook", Accepted(), required=False)
    policy = Answering("policy", Reject("Sender not allowed", "5.7.1", 553, reason="deny list"))
    email = make_email("rejected")
    delivery = await dispatch([policy, later, jsonl, background, store_sink], email)
    assert delivery == DeliveryResult(553, "5.7.1", "Sender not allowed", sink="policy")
    assert later.seen == [] and background.seen == [] and out.read_bytes() == b""
    event = await stored(tmp_path, email.uuid)
    assert event is not None, "the store keeps a rejected email, with the refusal"
    assert event["mailpipe"]["outcomes"]["policy"] == {
        "result": "reject", "code": 553, "enhanced": "5.7.1", "text": "Sender not allowed",
        "reason": "deny list"}


async def test_first_refusal_in_stage_order_decides(store_sink: StoreSink) -> None:
    # Listed first but in a later stage: the delivery stage's tempfail comes first.
    recorder = Answering("recorder", Reject(), stage=RECORD)
    deliverer = Answering("deliverer", TempFail())
    delivery = await dispatch([recorder, deliverer, store_sink], make_email())
    assert (delivery.code, delivery.sink) == (451, "deliverer")
    assert recorder.seen == []
    # Within one stage (run concurrently) the order of the sinks decides.
    first = Answering("first", Reject("first said no"))
    second = Answering("second", TempFail())
    delivery = await dispatch([first, second], make_email())
    assert (delivery.code, delivery.text, delivery.sink) == (550, "first said no", "first")
    assert first.seen and second.seen


async def test_a_reject_is_never_followed_by_a_250_even_when_the_store_fails(
    tmp_path: Path,
) -> None:
    closed_store = StoreSink(SQLiteStore(tmp_path / "never-started.db"))
    policy = Answering("policy", Reject())
    dispatcher = Dispatcher([policy, closed_store], Metrics())
    delivery = await dispatcher.deliver(make_email())  # the store was never started
    assert (delivery.code, delivery.sink) == (550, "policy")


async def test_a_failure_follows_the_sinks_policy(tmp_path: Path, store_sink: StoreSink) -> None:
    metrics = Metrics()
    broken = Raising("relay")  # required: tempfail by default
    email = make_email()
    delivery = await dispatch([broken], email, metrics)
    assert (delivery.code, delivery.enhanced, delivery.text) == (
        451, "4.3.0", "Temporary failure, please retry")
    assert "downstream refused the connection" in email.outcomes["relay"]["reason"]
    assert metrics.registry.get_sample_value("mailpipe_sink_failures_total",
                                             {"sink": "relay"}) == 1

    broken.on_failure = "reject"
    delivery = await dispatch([broken], make_email())
    assert (delivery.code, delivery.enhanced) == (554, "5.3.0")

    broken.on_failure = "ignore"
    email = make_email("failure ignored")
    delivery = await dispatch([broken, store_sink], email)
    assert delivery.accepted
    event = await stored(tmp_path, email.uuid)
    assert event is not None
    outcome = event["mailpipe"]["outcomes"]["relay"]
    assert outcome["result"] == "ignored"
    assert "downstream refused the connection" in outcome["reason"]


async def test_a_sink_past_its_timeout_follows_its_policy(store_sink: StoreSink) -> None:
    metrics = Metrics()
    slow = Hanging("slow")
    slow.timeout = 0.05
    email = make_email()
    delivery = await dispatch([slow, store_sink], email, metrics)
    assert (delivery.code, delivery.sink) == (451, "slow")
    assert email.outcomes["slow"]["reason"] == "timeout after 0.05s"
    assert results(metrics, "slow", "tempfail") == 1

    slow.on_failure = "reject"
    delivery = await dispatch([slow], make_email())
    assert delivery.code == 554


async def test_a_result_that_is_not_typed_is_a_failure() -> None:
    email = make_email()
    delivery = await dispatch([Sloppy("old", Accepted())], email)
    assert delivery.code == 451
    assert "not Accepted, TempFail or Reject" in email.outcomes["old"]["reason"]


async def test_optional_sinks_never_change_the_reply() -> None:
    metrics = Metrics()
    email = make_email()
    refusing = Answering("refusing", Reject(), required=False)
    broken = Raising("broken", required=False)
    delivery = await dispatch([refusing, broken], email, metrics)
    assert delivery.accepted
    assert refusing.seen == [email.uuid] and broken.seen == [email.uuid]
    assert results(metrics, "refusing", "reject") == 1
    assert results(metrics, "broken", "ignored") == 1


async def test_a_sink_may_ask_to_close_the_session_after_the_250() -> None:
    closing = Answering("worker", Accepted(close=True))
    delivery = await dispatch([closing, Answering("other", Accepted())], make_email())
    assert delivery.accepted and delivery.close


# ---- registry and configuration ------------------------------------------------------------


def config_from(tmp_path: Path, text: str) -> Any:
    path = tmp_path / "mailpipe.yaml"
    path.write_text(textwrap.dedent(text))
    return load_config(str(path))[0]


def test_builtins_keep_their_config_keys(tmp_path: Path,
                                         caplog: pytest.LogCaptureFixture) -> None:
    config = config_from(tmp_path, f"""
        data_dir: {tmp_path}
        sinks:
          jsonl: {{path: {tmp_path}/e.jsonl, required: true}}
          store: {{timeout: 5s, on_failure: reject}}
    """)
    sinks = build_sinks(config, Metrics())
    assert [s.name for s in sinks] == ["store", "jsonl"]
    store, jsonl = sinks
    assert (store.timeout, store.failure_policy) == (5.0, "reject")
    assert isinstance(jsonl, JSONLSink) and jsonl.path == f"{tmp_path}/e.jsonl"
    assert (jsonl.required, jsonl.failure_policy) == (True, "tempfail")
    off = config_from(tmp_path, "store: {enabled: false}\nsinks: {workers: {on_failure: reject}}\n")
    assert build_sinks(off, Metrics()) == []
    assert "sinks.workers is set, but this configuration leaves that sink off" in caplog.text


@pytest.mark.parametrize(("text", "expected"), [
    ("sinks: {webhok: {url: x}}",
     "sinks.webhok: got {'url': 'x'}: no sink named 'webhok' is registered "
     "(known: jobs, jsonl, store, workers"),
    ("sinks: {jsonl: {path: x, pth: y}}", "sinks.jsonl.pth: unknown key"),
    ("sinks: {store: {on_failure: bounce}}", "sinks.store.on_failure: got 'bounce'"),
    ("sinks: {store: {timeout: soon}}", "sinks.store.timeout: got 'soon'"),
    ("sinks: {jsonl: {path: x, on_failure: tempfail}}",
     "sinks.jsonl.on_failure: got 'tempfail': an optional sink answers after the 250"),
    ("sinks: {workers: {timeout: 5s}}", "set smtp.pool.exec_ttl"),
])
def test_sink_sections_are_validated_by_name(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as error:
        config_from(tmp_path, text + "\n")
    assert expected in str(error.value)


# ---- a third-party sink, installed, in a real mailpipe ---------------------------------------

THIRD_PARTY = '''
"""Sinks a third party might publish: one writes each uuid to a file, one refuses, one hangs."""
import asyncio

from mailpipe.sinks.base import DELIVER, Sink, SinkSettings
from mailpipe.sinks.results import Accepted, Reject


class FileSettings(SinkSettings):
    path: str


class FileSink(Sink):
    stage = DELIVER
    Settings = FileSettings

    @classmethod
    def create(cls, settings, context):
        return cls(settings.path)

    def __init__(self, path):
        self.path = path

    async def submit(self, email):
        with open(self.path, "a") as out:
            out.write(email.uuid + "\\n")
        return Accepted(note={"path": self.path})


class PolicySettings(SinkSettings):
    code: int = 550
    enhanced: str = "5.7.1"
    text: str = "Refused"


class PolicySink(Sink):
    stage = DELIVER
    Settings = PolicySettings

    @classmethod
    def create(cls, settings, context):
        return cls(Reject(settings.text, settings.enhanced, settings.code,
                          reason="the policy sink refuses everything"))

    def __init__(self, answer):
        self.answer = answer

    async def submit(self, email):
        return self.answer


class HangSink(Sink):
    """Never answers (a downstream that accepted the connection and went silent)."""

    stage = DELIVER

    async def submit(self, email):
        await asyncio.Event().wait()
'''


@pytest.fixture
def third_party(tmp_path: Path) -> dict[str, str]:
    """A package installed the way pip leaves one: a module and its dist-info with the entry
    points; the environment that puts it on a child's path."""
    site = tmp_path / "site"
    info = site / "thirdsink-0.1.dist-info"
    info.mkdir(parents=True)
    (site / "thirdsink.py").write_text(THIRD_PARTY)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdsink\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[mailpipe.sinks]\ntofile = thirdsink:FileSink\npolicy = thirdsink:PolicySink\n"
        "hang = thirdsink:HangSink\n")
    return {"PYTHONPATH": str(site)}


def child_env(extra: dict[str, str]) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("MAILPIPE_")}, **extra}


def message(subject: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "app@example.com", "user@example.org", subject
    msg.set_content("hello")
    return msg


def refusal(server: MailpipeServer, subject: str) -> smtplib.SMTPDataError:
    with (smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=10) as client,
          pytest.raises(smtplib.SMTPDataError) as refused):
        client.send_message(message(subject))
    return refused.value


def served_metric(server: MailpipeServer, name: str, **labels: str) -> float:
    _, body, _ = server.request("GET", "/metrics")
    return sum(sample.value for family in text_string_to_metric_families(body.decode())
               for sample in family.samples
               if sample.name == name and labels.items() <= sample.labels.items())


def test_an_installed_sink_gets_each_email(
    mailpipe_factory: Factory, third_party: dict[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "uuids.txt"
    server = mailpipe_factory({"sinks": {"tofile": {"path": str(out)}}}, env=third_party)
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=10) as client:
        client.send_message(message("to a third-party sink"))
    (stored_email,) = server.wait_for_messages(1)
    # Required by default and in the delivery stage: written before the 250.
    assert out.read_text().split() == [stored_email["uuid"]]
    outcomes = server.event(stored_email["uuid"])["mailpipe"]["outcomes"]
    assert outcomes == {"tofile": {"path": str(out)}}


def test_an_installed_sink_that_rejects_refuses_the_email(
    mailpipe_factory: Factory, third_party: dict[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "uuids.txt"
    server = mailpipe_factory({"sinks": {
        "policy": {"code": 553, "enhanced": "5.7.1", "text": "Sender not on the allow list"},
        "tofile": {"path": str(out)},
    }}, env=third_party)
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=10) as client:
        with pytest.raises(smtplib.SMTPDataError) as refused:
            client.send_message(message("refused by policy"))
        assert refused.value.smtp_code == 553
        assert refused.value.smtp_error == b"5.7.1 Sender not on the allow list"
        assert client.noop()[0] == 250  # a refusal does not end the session
    (kept,) = server.wait_for_messages(1)
    outcomes = server.event(kept["uuid"])["mailpipe"]["outcomes"]
    assert outcomes["policy"] == {"result": "reject", "code": 553, "enhanced": "5.7.1",
                                  "text": "Sender not on the allow list",
                                  "reason": "the policy sink refuses everything"}
    assert "sink policy refused the email: 553 5.7.1" in server.log()
    assert served_metric(server, "mailpipe_emails_accepted_total") == 0
    assert served_metric(server, "mailpipe_emails_rejected_total", reason="sink") == 1
    assert served_metric(server, "mailpipe_sink_results_total", sink="policy",
                         result="reject") == 1


def test_an_installed_sink_past_its_timeout_gets_its_policy(
    mailpipe_factory: Factory, third_party: dict[str, str]
) -> None:
    server = mailpipe_factory({"sinks": {"hang": {"timeout": "300ms"}}}, env=third_party)
    refused = refusal(server, "into a silent sink")
    assert refused.smtp_code == 451
    assert refused.smtp_error == b"4.3.0 Temporary failure, please retry"
    assert "sink hang failed: timeout after 0.3s" in server.log()
    assert server.wait_for_messages(0) == []  # the client sends it again; nothing kept twice
    assert served_metric(server, "mailpipe_sink_failures_total", sink="hang") == 1


def test_a_builtin_sinks_failure_policy_and_the_outcome_in_the_store(
    mailpipe_factory: Factory,
) -> None:
    server = mailpipe_factory({"sinks": {"jsonl": {
        "path": "/dev/full", "required": True, "on_failure": "reject"}}})
    refused = refusal(server, "to a full disk")
    assert refused.smtp_code == 554
    assert refused.smtp_error == b"5.3.0 Message could not be delivered"
    (kept,) = server.wait_for_messages(1)
    outcome = server.event(kept["uuid"])["mailpipe"]["outcomes"]["jsonl"]
    assert (outcome["result"], outcome["code"]) == ("reject", 554)
    assert "No space left on device" in outcome["reason"]


def test_an_installed_sinks_section_is_validated(
    third_party: dict[str, str], tmp_path: Path
) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("sinks: {tofile: {path: x, colour: red}}\n")
    done = subprocess.run([sys.executable, "-m", "mailpipe", "check-config", "-c", str(config)],
                          capture_output=True, text=True, env=child_env(third_party),
                          timeout=60)
    assert done.returncode != 0
    assert "sinks.tofile.colour: unknown key" in done.stderr
    config.write_text(f"sinks: {{tofile: {{path: {tmp_path}/x, timeout: 2s}}}}\n")
    done = subprocess.run([sys.executable, "-m", "mailpipe", "check-config", "-c", str(config)],
                          capture_output=True, text=True, env=child_env(third_party),
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert "tofile:" in done.stdout and "timeout: 2.0" in done.stdout
