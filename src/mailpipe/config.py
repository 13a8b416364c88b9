"""All of mailpipe's configuration, in one place.

Sources, strongest first: command-line flags, environment (`MAILPIPE_SMTP__ADDR=...`), the
config file (`-c FILE`, else `mailpipe.yaml` or `.rr.yaml` in the working directory). A
RoadRunner `.rr.yaml` is read as is (its `rpc` section turns on the RPC endpoint): the
sections of RoadRunner's other plugins (kv, its http...) and its keys mailpipe has no use for
are ignored with a notice, `logs` maps onto `log`; any other unknown section, or a typo inside
a known one, is an error naming the key.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError

CONFIG_FILE_NAMES = ("mailpipe.yaml", "mailpipe.yml", ".rr.yaml", ".rr.yml")


class ConfigError(Exception):
    """A configuration problem, worded for the person who wrote the config."""


# ---- value types ----------------------------------------------------------------------

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1024**2, "mb": 1024**2,
               "mib": 1024**2, "g": 1024**3, "gb": 1024**3, "gib": 1024**3}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*")


def parse_duration(value: Any) -> float:
    """Seconds from a number or a Go-style duration ("60s", "1h30m", "500ms"), as RoadRunner
    configs write them."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like 60s, 500ms or 1h, or a number of seconds")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if isinstance(value, str):
        text = value.strip().lower()
        try:
            return parse_duration(float(text))
        except ValueError:
            pass
        parts = _DURATION_PART.findall(text)
        if parts and "".join(n + u for n, u in parts) == text:
            return sum(float(n) * _DURATION_UNITS[u] for n, u in parts)
    raise ValueError("expected a duration like 60s, 500ms or 1h, or a number of seconds")


def parse_size(value: Any) -> int:
    """Bytes from an integer or a size with a unit ("10MB", "512k")."""
    if isinstance(value, bool):
        raise ValueError("expected a size in bytes, or with a unit like 10MB or 512KB")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if isinstance(value, str):
        match = _SIZE.fullmatch(value)
        if match and match.group(2).lower() in _SIZE_UNITS:
            return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])
    raise ValueError("expected a size in bytes, or with a unit like 10MB or 512KB")


Duration = Annotated[float, BeforeValidator(parse_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]


def split_host_port(addr: str) -> tuple[str, int]:
    """`host:port`, `[v6]:port` or `:port` (all interfaces)."""
    text = addr.strip()
    if text.startswith("tcp://"):
        text = text[len("tcp://"):]
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected host:port, e.g. 127.0.0.1:1025, got {addr!r}")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_addr(value: str) -> str:
    split_host_port(value)
    return value


Address = Annotated[str, BeforeValidator(lambda v: _check_addr(str(v)))]


def parse_listen(address: str) -> tuple[str, str | int]:
    """RoadRunner's `rpc.listen`: `tcp://host:port` as ("host", port), `unix:///path` as
    ("unix", "/path")."""
    if address.startswith("unix://") and len(address) > len("unix://"):
        return "unix", address[len("unix://"):]
    if address.startswith("tcp://"):
        host, sep, port = address[len("tcp://"):].rpartition(":")
        if sep and port.isdigit() and int(port) <= 65535:
            return host.strip("[]") or "0.0.0.0", int(port)
    raise ValueError(f"expected tcp://host:port or unix:///path, got {address!r}")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


# ---- sections -------------------------------------------------------------------------


class AttachmentStorageConfig(Section):
    mode: Literal["memory", "tempfile"] = "memory"
    temp_dir: str | None = None
    cleanup_after: Duration = 3600.0


class TLSConfig(Section):
    """STARTTLS (default) or implicit TLS, with a cert/key or a self-signed pair made at start."""

    mode: Literal["starttls", "implicit"] = "starttls"
    cert: str | None = None
    key: str | None = None
    self_signed: bool = False

    @model_validator(mode="after")
    def _needs_material(self) -> TLSConfig:
        if not self.self_signed and not (self.cert and self.key):
            raise ValueError("TLS needs both cert and key files, or `self-signed`")
        return self


def _tls_shorthand(value: Any) -> Any:
    if value == "self-signed":
        return {"self_signed": True}
    if value in (False, None, "off", "none"):
        return None
    return value


TLSSetting = Annotated[TLSConfig | None, BeforeValidator(_tls_shorthand)]


AuthMechanism = Literal["PLAIN", "LOGIN", "CRAM-MD5", "XOAUTH2"]


class SMTPAuthConfig(Section):
    """AUTH mechanisms offered in EHLO, in this order; others answer 504. CRAM-MD5 is off by
    default: clients prefer it when offered (Symfony Mailer, PHPMailer, smtplib), and then
    only a digest of the password is captured."""

    mechanisms: list[AuthMechanism] = Field(default_factory=lambda: ["PLAIN", "LOGIN", "XOAUTH2"])

    @field_validator("mechanisms", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return [str(v).upper() for v in value] if isinstance(value, list) else value


class ListenerLimits(Section):
    """The limits an SMTP listener runs with, and their defaults: declared here and nowhere
    else. The `smtp` section sets them for every listener; an entry of `smtp.servers`
    overrides the ones it names."""

    hostname: str = "localhost"
    read_timeout: Duration = 60.0
    write_timeout: Duration = 10.0
    max_message_size: Size = 10 * 1024 * 1024
    max_recipients: int = Field(default=100, ge=1)
    max_line_length: int = Field(default=4096, ge=512)
    max_connections: int = Field(default=1000, ge=1)
    max_connections_per_ip: int = Field(default=100, ge=1)  # so one source cannot take them all
    # A message body gets data_timeout of credit, each byte adds 1/min_data_rate s (at most
    # data_timeout): one done within data_timeout is never cut, a longer one must average
    # min_data_rate. 0 (either) disables it; a body silent for read_timeout is cut anyway.
    data_timeout: Duration = 60.0
    min_data_rate: Size = 1024  # bytes per second
    tls: TLSSetting = None
    auth: SMTPAuthConfig = SMTPAuthConfig()


class ListenerConfig(ListenerLimits):
    """One entry of `smtp.servers`: an address, and the limits it sets itself."""

    name: str | None = None
    addr: Address

    def own_limits(self) -> dict[str, Any]:
        """The limits written in this entry (`tls: off` included); the rest are inherited."""
        return {key: getattr(self, key) for key in ListenerLimits.model_fields
                if key in self.model_fields_set}

    @model_serializer(mode="wrap")
    def _written_only(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # check-config shows what the entry sets, not defaults it does not use.
        return {k: v for k, v in handler(self).items() if k in self.model_fields_set}


class SupervisorConfig(Section):
    """RoadRunner's pool supervisor: limits checked every `watch_tick`."""

    watch_tick: Duration = 1.0
    ttl: Duration = 0.0  # a worker older than this is replaced once idle; 0 = never
    idle_ttl: Duration = 0.0  # a worker idle this long is replaced; 0 = never
    max_worker_memory: int = Field(default=0, ge=0)  # MB of RSS; 0 = unlimited
    exec_ttl: Duration = 0.0  # longest one email may take; 0 = unlimited


class PoolConfig(Section):
    """A worker pool, with RoadRunner's names and defaults (but 4 workers, not one per CPU)."""

    num_workers: int = Field(default=4, ge=0)
    max_jobs: int = Field(default=0, ge=0)
    # Workers that ask to stop hand the email to another worker; after this many attempts
    # the email is poison: 451 to the client rather than an endless loop of restarts.
    max_retries_per_email: int = Field(default=3, ge=1)
    allocate_timeout: Duration = 60.0
    destroy_timeout: Duration = 60.0
    reset_timeout: Duration = 60.0
    exec_ttl: Duration = 0.0
    command: str | list[str] | None = None  # overrides server.command for this pool
    supervisor: SupervisorConfig = SupervisorConfig()

    @property
    def effective_exec_ttl(self) -> float:
        """`exec_ttl` of the pool, else of its supervisor (where RoadRunner puts it)."""
        return self.exec_ttl or self.supervisor.exec_ttl


def _env_strings(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): "" if v is None else str(v) for k, v in value.items()}
    return value


def _optional_name(value: Any) -> Any:
    return None if value in (None, "") else str(value)  # RoadRunner writes "" for unset


EnvMapping = Annotated[dict[str, str], BeforeValidator(_env_strings)]
OptionalName = Annotated[str | None, BeforeValidator(_optional_name)]


class OnInitConfig(Section):
    """A command run once before the workers start (RoadRunner's `server.on_init`)."""

    command: str | list[str]
    exec_timeout: Duration = 60.0
    exit_on_error: bool = True  # RoadRunner's default is false: a failed init goes unnoticed
    env: EnvMapping = Field(default_factory=dict)


class ServerConfig(Section):
    """How worker processes are started (RoadRunner's `server` section)."""

    command: str | list[str] | None = None
    relay: str = "pipes"
    env: EnvMapping = Field(default_factory=dict)
    relay_timeout: Duration = 60.0
    user: OptionalName = None  # workers (and on_init) run as this user: mailpipe must be root
    group: OptionalName = None  # default: the user's own group
    on_init: OnInitConfig | None = None

    @field_validator("relay")
    @classmethod
    def _relay(cls, value: str) -> str:
        if value == "pipes" or value.startswith(("tcp://", "unix://")):
            return value
        raise ValueError("expected pipes, tcp://host:port or unix:///path")


class SMTPConfig(ListenerLimits):
    addr: Address = "127.0.0.1:1025"
    spool_threshold: Size = 1024 * 1024
    include_raw: bool = False
    transcript: bool = False
    attachment_storage: AttachmentStorageConfig = AttachmentStorageConfig()
    servers: list[ListenerConfig] = Field(default_factory=list)
    pool: PoolConfig | None = None
    jobs: SMTPJobsConfig | None = None
    delivery: Literal["auto", "workers", "jobs", "both", "none"] = "auto"

    def listeners(self) -> list[ResolvedListener]:
        """Every listener with its limits filled in from this section."""
        given = self.servers or [ListenerConfig(addr=self.addr)]
        shared = {key: getattr(self, key) for key in ListenerLimits.model_fields}
        resolved = []
        for index, item in enumerate(given):
            name = item.name or ("default" if not self.servers else f"smtp{index}")
            resolved.append(ResolvedListener(name=name, addr=item.addr,
                                             **{**shared, **item.own_limits()}))
        names = [r.name for r in resolved]
        if len(set(names)) != len(names):
            raise ValueError("smtp.servers: listener names must be unique")
        return resolved


# ---- jobs (RoadRunner's jobs plugin, by its names) ----------------------------------------


class SMTPJobsConfig(Section):
    """How the SMTP side pushes each email as a job."""

    pipeline: str
    priority: int = 10
    delay: Duration = 0.0
    auto_ack: bool = False
    batch_size: int = Field(default=100, ge=1)
    flush_interval: Duration = 0.005
    push_timeout: Duration = 5.0  # broker silent this long: the client gets 451
    headers: dict[str, str | list[str]] = Field(default_factory=dict)


class PipelineOptions(Section):
    """Options every driver understands (under `jobs.pipelines.NAME.config`)."""

    priority: int = 10
    prefetch: int = Field(default=100, ge=1)
    max_attempts: int = Field(default=3, ge=0)  # deliveries before dead-lettering; 0 = forever
    visibility_timeout: Duration = 30.0  # reserved this long without ack: delivered again
    dead_letter: str | None = None  # a pipeline to move dead jobs to (else the driver's own)


class SQLitePipelineOptions(PipelineOptions):
    path: str | None = None  # default: <data_dir>/jobs.db
    poll_interval: Duration = 0.05
    synchronous: Literal["NORMAL", "FULL", "EXTRA"] = "FULL"


class MemoryPipelineOptions(PipelineOptions):
    pass


class RedisPipelineOptions(PipelineOptions):
    addr: str = "redis://127.0.0.1:6379/0"
    stream: str | None = None  # default: mailpipe:<pipeline>
    group: str = "mailpipe"
    maxlen: int | None = None  # approximate stream cap (XADD MAXLEN ~); None keeps everything


class AMQPPipelineOptions(PipelineOptions):
    addr: str = "amqp://guest:guest@127.0.0.1:5672/"
    queue: str | None = None  # default: the pipeline name
    exchange: str = "mailpipe"
    exchange_type: Literal["direct", "topic", "fanout", "headers"] = "direct"
    routing_key: str | None = None  # default: the queue name
    queue_type: Literal["quorum", "classic"] = "quorum"
    durable: bool = True


class NATSPipelineOptions(PipelineOptions):
    addr: str = "nats://127.0.0.1:4222"
    stream: str | None = None  # default: MAILPIPE_<PIPELINE>
    subject: str | None = None  # default: mailpipe.<pipeline>
    durable: str = "mailpipe"
    retention: Literal["workqueue", "limits"] = "workqueue"
    max_age: Duration = 0.0  # 0 = keep until consumed


class RoadRunnerPipelineOptions(PipelineOptions):
    """Push-only: jobs go to a RoadRunner server's jobs.PushBatch, its consumers take them."""

    addr: str = "tcp://127.0.0.1:6001"  # RoadRunner's rpc.listen
    pipeline: str | None = None  # RoadRunner's pipeline; default: this pipeline's name
    timeout: Duration = 10.0  # connecting, and each call

    @field_validator("addr")
    @classmethod
    def _addr(cls, value: str) -> str:
        parse_listen(value)
        return value


DRIVER_OPTIONS: dict[str, type[PipelineOptions]] = {
    "sqlite": SQLitePipelineOptions,
    "memory": MemoryPipelineOptions,
    "redis": RedisPipelineOptions,
    "amqp": AMQPPipelineOptions,
    "nats": NATSPipelineOptions,
    "roadrunner": RoadRunnerPipelineOptions,
}


class PipelineConfig(Section):
    driver: Literal["sqlite", "memory", "redis", "amqp", "nats", "roadrunner"] = "sqlite"
    config: PipelineOptions = PipelineOptions()

    @model_validator(mode="before")
    @classmethod
    def _driver_options(cls, value: Any) -> Any:
        # Validate `config` with the model of the named driver, so that a typo in a driver
        # option is reported under jobs.pipelines.NAME.config.KEY.
        if isinstance(value, dict):
            model = DRIVER_OPTIONS.get(value.get("driver", "sqlite"))
            if model is not None:
                value = {**value, "config": model.model_validate(value.get("config") or {})}
        return value


class JobsConfig(Section):
    pipelines: dict[str, PipelineConfig] = Field(default_factory=dict)
    consume: list[str] = Field(default_factory=list)
    pool: PoolConfig = PoolConfig()


class ResolvedListener(ListenerLimits):
    """A listener as it runs: its name, address and every limit filled in."""

    name: str
    addr: str


class HTTPAuthConfig(Section):
    type: Literal["basic", "bearer"]
    username: str | None = None
    password: str | None = None
    token: str | None = None

    @model_validator(mode="after")
    def _complete(self) -> HTTPAuthConfig:
        if self.type == "basic" and not (self.username and self.password):
            raise ValueError("basic auth needs username and password")
        if self.type == "bearer" and not self.token:
            raise ValueError("bearer auth needs token")
        return self


class HTTPConfig(Section):
    enabled: bool = True
    addr: Address = "127.0.0.1:8025"
    auth: HTTPAuthConfig | None = None
    # Host names served besides the bind address and loopback (DNS rebinding protection,
    # web/guard.py); "*" serves any Host, which lets a rebinding page in: unsafe.
    allowed_hosts: list[str] = Field(default_factory=list)
    # Served under this path ("/mail") behind a reverse proxy; nothing is served outside it.
    base_path: str = ""
    # The default of GET /api/v1/messages/{uuid}/codes: one-time codes in an email's text.
    code_pattern: str = r"\b\d{4,8}\b"

    @field_validator("base_path")
    @classmethod
    def _base_path(cls, value: str) -> str:
        value = value.rstrip("/")
        if value and not re.fullmatch(r"(/[A-Za-z0-9._~!$&'()*+,;=:@%-]+)+", value):
            raise ValueError(f"{value!r} is not a URL path like /mail (a leading slash, no "
                             "query, no spaces, no empty or dot segments)")
        if any(segment in (".", "..") for segment in value.split("/")):
            raise ValueError(f"{value!r}: no . or .. segments")
        return value

    @field_validator("code_pattern")
    @classmethod
    def _regex(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from None
        return value

    @field_validator("allowed_hosts")
    @classmethod
    def _host_names(cls, names: list[str]) -> list[str]:
        from mailpipe.web.guard import ANY_HOST, is_ip_literal, parse_authority

        for name in names:
            plain = name == ANY_HOST or is_ip_literal(name)  # IPv6 with or without brackets
            parsed = (name, None) if plain else parse_authority(name)
            if parsed is None or parsed[1] is not None:
                raise ValueError(f"{name!r} is not a host name or IP address (no scheme, "
                                 "no port; \"*\" for any)")
        return names


class POP3User(Section):
    username: str = Field(min_length=1)
    password: str = Field(min_length=1)


def _pop3_auth(value: Any) -> Any:
    return [value] if isinstance(value, dict) else value  # one user, without a list


class POP3Config(Section):
    """The POP3 server (pop3/, docs/pop3.md), off unless `addr` is set. Like Mailpit's, it
    wants credentials: `auth` is one {username, password} or a list of them; `auth: any`
    lets any login in, and must be written to be had."""

    addr: Address | None = None
    auth: Annotated[list[POP3User] | Literal["any"] | None, BeforeValidator(_pop3_auth)] = None
    hostname: str = "localhost"
    tls: TLSSetting = None  # starttls: STLS offered; implicit: POP3S
    read_timeout: Duration = 600.0  # RFC 1939's autologout timer: at least 10 minutes
    max_connections: int = Field(default=50, ge=1)
    max_line_length: int = Field(default=1024, ge=255)  # RFC 2449: commands fit in 255
    auth_failure_delay: Duration = 1.0
    max_auth_failures: int = Field(default=3, ge=1)

    @model_validator(mode="after")
    def _needs_auth(self) -> POP3Config:
        if self.addr is not None and not self.auth:
            raise ValueError("pop3.auth: POP3 serves every captured email, so it needs "
                             "credentials: set pop3.auth to {username, password} or a list "
                             "of them, or to `any` to let any login in")
        return self

    def users(self) -> dict[str, str] | None:
        """Username to password; None when any login is let in."""
        if self.auth == "any":
            return None
        return {user.username: user.password for user in self.auth or []}


class LinkCheckConfig(Section):
    """GET /api/v1/messages/{uuid}/link-check: outbound requests, on demand (checks/links.py)."""

    timeout: Duration = 10.0  # per link, redirects included
    concurrency: int = Field(default=5, ge=1, le=50)
    max_links: int = Field(default=200, ge=1, le=10_000)
    max_redirects: int = Field(default=10, ge=0, le=30)


class ScreenshotConfig(Section):
    """GET /api/v1/messages/{uuid}/screenshot.png (checks/screenshot.py)."""

    chromium: str | None = None  # default: /usr/bin/chromium, else Playwright's own
    timeout: Duration = 20.0
    max_height: int = Field(default=4000, ge=100, le=20_000)


class ChecksConfig(Section):
    links: LinkCheckConfig = LinkCheckConfig()
    screenshot: ScreenshotConfig = ScreenshotConfig()


class RPCConfig(Section):
    """RoadRunner's RPC endpoint (Goridge RPC), off unless `listen` is set."""

    listen: str | None = None  # tcp://127.0.0.1:6001 (RoadRunner's) or unix:///path
    # Bounds on what one client may send: a bigger frame, or one left half-sent this long,
    # closes its connection.
    max_frame_size: Size = 64 * 1024 * 1024
    read_timeout: Duration = 30.0

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str | None) -> str | None:
        if value is not None:
            parse_listen(value)
        return value


class CompatAPIConfig(Section):
    """One other mail catcher's API (compat/): under /compat/NAME/ of the main listener while
    `enabled`, and also at the root of its own listener when `addr` is set, where that
    catcher's clients work unchanged."""

    enabled: bool = True
    addr: Address | None = None


class RelayAuthConfig(Section):
    username: str
    password: str
    mechanism: Literal["PLAIN", "LOGIN", "CRAM-MD5"] | None = None  # None: the server's best


class RelayConfig(Section):
    """A downstream SMTP server that messages are handed to once (router/deliver.py), as
    Mailpit's smtp-relay settings describe it. `starttls`: true insists on it, false never
    asks for it."""

    host: str
    port: int = Field(default=25, ge=1, le=65535)
    starttls: bool = False
    auth: RelayAuthConfig | None = None
    timeout: Duration = 30.0
    # Recipients must match allowed_recipients (a regex) and must not match
    # blocked_recipients; return_path becomes the envelope sender.
    allowed_recipients: str | None = None
    blocked_recipients: str | None = None
    return_path: str | None = None
    override_from: str | None = None
    preserve_message_ids: bool = False

    @field_validator("allowed_recipients", "blocked_recipients")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a regular expression: {exc}") from None
        return value


class MailpitCompatConfig(CompatAPIConfig):
    """Mailpit's API also releases messages to `relay`, and changes its Chaos triggers at run
    time when `chaos` is on (`chaos_triggers` as Mailpit's --chaos-triggers)."""

    label: str = ""
    relay: RelayConfig | None = None
    chaos: bool = False
    chaos_triggers: str | None = None

    @field_validator("chaos_triggers")
    @classmethod
    def _triggers(cls, value: str | None) -> str | None:
        if value is not None:
            from mailpipe.compat.mailpit_chaos import parse_triggers

            parse_triggers(value)  # its ChaosError is a ValueError: reported as a config error
        return value


class MailHogCompatConfig(CompatAPIConfig):
    """MailHog's API also invites Jim, its chaos monkey, at start when `invite_jim` (MailHog's
    -invite-jim, with its default chances); /api/v2/jim changes or dismisses him at run time."""

    invite_jim: bool = False


class CompatConfig(Section):
    mailpit: MailpitCompatConfig = MailpitCompatConfig()
    mailhog: MailHogCompatConfig = MailHogCompatConfig()


class StoreConfig(Section):
    enabled: bool = True
    path: str | None = None
    max_messages: int = Field(default=5000, ge=1)
    max_age: Duration | None = None
    synchronous: Literal["OFF", "NORMAL", "FULL", "EXTRA"] = "FULL"

    @field_validator("synchronous", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value


class TagFilterConfig(Section):
    """`tags.filters[]`: messages matching the search query `match` get `tags` (a list, or
    Mailpit's comma-separated string)."""

    match: str
    tags: list[str]

    @field_validator("tags", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        return value.split(",") if isinstance(value, str) else value

    @model_validator(mode="after")
    def _valid(self) -> TagFilterConfig:
        from mailpipe.store.tags import TagFilter

        TagFilter(self.match, tuple(self.tags))  # raises TagError (a ValueError) saying why
        return self


class TagsConfig(Section):
    """`tags`: automatic tags on stored messages (store/tags.py)."""

    plus_addressing: bool = True
    filters: list[TagFilterConfig] = Field(default_factory=list)


class SinksConfig(Section):
    """`sinks.NAME`: one section per registered sink, validated by that sink's own model
    (`mailpipe.sinks.registry`); an unknown NAME is an error listing the known ones."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _registered(cls, value: Any) -> Any:
        if not isinstance(value, dict) or not value:
            return value
        from mailpipe.sinks.registry import validate_sections

        return validate_sections(value)

    def sections(self) -> dict[str, Any]:
        """Each configured sink's validated settings, by name."""
        return dict(self.model_extra or {})


class ExecutorConfig(Section):
    """How every plugin call is isolated (plugins/executor.py)."""

    timeout: Duration = 30.0
    max_concurrent: int = Field(default=10, ge=1)
    enable_panic_recovery: bool = True  # off: a plugin's exception answers 451 (fail closed)
    failure_threshold: int = Field(default=5, ge=1)  # failures in a row that switch it off
    on_failure: Literal["continue", "tempfail"] = "continue"
    on_failure_hooks: dict[str, Literal["continue", "tempfail"]] = Field(default_factory=dict)

    @field_validator("on_failure_hooks")
    @classmethod
    def _hook_names(cls, value: dict[str, str]) -> dict[str, str]:
        from mailpipe.plugins.hooks import HOOKS

        for name in value:
            if name not in HOOKS:
                raise ValueError(f"{name!r} is not a hook (see docs/plugins.md)")
        return value


class ExternalPluginConfig(Section):
    """An out-of-process plugin: an executable speaking go-plugin's gRPC protocol."""

    command: str
    args: list[str] = Field(default_factory=list)
    env: EnvMapping = Field(default_factory=dict)
    start_timeout: Duration = 60.0


class PluginsConfig(Section):
    enabled: bool = True
    plugin_path: str = "./plugins"
    plugins: list[str] = Field(default_factory=list)  # which run, in this order
    auto_reload: bool = False
    reload_interval: Duration = 300.0
    health_check_interval: Duration = 30.0
    executor: ExecutorConfig = ExecutorConfig()
    plugin_config: dict[str, dict[str, Any]] = Field(default_factory=dict)
    external: dict[str, ExternalPluginConfig] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _builtin_settings(self) -> PluginsConfig:
        """A listed built-in's settings are checked now, so that a typo is a config error
        (exit 2, `check-config`) rather than a failure at start."""
        if not self.plugins:
            return self  # (also: the default instance is made while this module loads)
        from mailpipe.plugins.base import PluginError
        from mailpipe.plugins.builtin import BUILTINS, check_settings
        from mailpipe.plugins.python import find_file

        for name in self.plugins:
            shadowed = name in self.external or find_file(Path(self.plugin_path), name)
            if name in BUILTINS and not shadowed:
                try:
                    check_settings(name, self.plugin_config.get(name))
                except PluginError as exc:
                    # Its lines name each bad key in full; the heading line goes.
                    lines = str(exc).splitlines()
                    raise ValueError("\n".join(lines[1:] if len(lines) > 1 else lines)) from None
        return self


class SpamAssassinConfig(Section):
    """Spam scores from SpamAssassin's spamd (checks/spam.py, docs/spam.md); off without
    `addr`."""

    addr: str | None = None  # host:port, or unix:///path of spamd's socket
    timeout: Duration = 10.0  # connecting, sending and the answer, together
    max_size: Size = Field(default=500 * 1024, ge=1)  # larger emails are not sent (spamc's)
    start: bool = False  # mailpipe runs spamd itself, on addr (a loopback host:port)

    @model_validator(mode="after")
    def _address(self) -> SpamAssassinConfig:
        if self.addr is None and not self.start:
            return self  # (also: the default instance is made while this module loads)
        from mailpipe.checks.spam import check_settings

        check_settings(self.addr, self.start)
        return self


class LogConfig(Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["console", "json"] = "console"

    @field_validator("level", "format", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.lower()
            return "warning" if value == "warn" else value
        return value


class Config(BaseSettings):
    """The whole configuration."""

    model_config = SettingsConfigDict(
        env_prefix="MAILPIPE_",
        env_nested_delimiter="__",
        extra="ignore",
        case_sensitive=False,
    )

    version: str | None = None
    data_dir: str = "./.mailpipe"
    server: ServerConfig = ServerConfig()
    shutdown_timeout: Duration = 30.0
    smtp: SMTPConfig = SMTPConfig()
    http: HTTPConfig = HTTPConfig()
    store: StoreConfig = StoreConfig()
    tags: TagsConfig = TagsConfig()
    sinks: SinksConfig = SinksConfig()
    jobs: JobsConfig = JobsConfig()
    rpc: RPCConfig = RPCConfig()
    compat: CompatConfig = CompatConfig()
    pop3: POP3Config = POP3Config()
    plugins: PluginsConfig = PluginsConfig()
    spamassassin: SpamAssassinConfig = SpamAssassinConfig()
    log: LogConfig = LogConfig()
    checks: ChecksConfig = ChecksConfig()
    # What loading the file noted (RoadRunner sections ignored or mapped), logged at start.
    _notices: list[str] = PrivateAttr(default_factory=list)

    @property
    def notices(self) -> list[str]:
        return self._notices

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _FileSource(settings_cls))

    @model_validator(mode="after")
    def _listeners_resolve(self) -> Config:
        self.smtp.listeners()
        return self

    @model_validator(mode="after")
    def _pipelines_exist(self) -> Config:
        pipelines = self.jobs.pipelines
        if self.smtp.jobs is not None and self.smtp.jobs.pipeline not in pipelines:
            raise ValueError(
                f"smtp.jobs.pipeline: {self.smtp.jobs.pipeline!r} is not declared in "
                f"jobs.pipelines (declared: {', '.join(pipelines) or 'none'})"
            )
        for name in self.jobs.consume:
            if name not in pipelines:
                raise ValueError(f"jobs.consume: {name!r} is not declared in jobs.pipelines")
            if pipelines[name].driver == "roadrunner":
                raise ValueError(f"jobs.consume: {name!r} is a roadrunner pipeline: "
                                 "RoadRunner's own consumers take its jobs")
        if self.jobs.consume and not (self.jobs.pool.command or self.server.command):
            raise ValueError("jobs.consume: consumers need a command: set jobs.pool.command "
                             "or server.command")
        for name, pipeline in pipelines.items():
            dead = pipeline.config.dead_letter
            if dead is not None and dead not in pipelines:
                raise ValueError(f"jobs.pipelines.{name}.config.dead_letter: {dead!r} "
                                 "is not declared in jobs.pipelines")
        if self.smtp.delivery in ("jobs", "both") and self.smtp.jobs is None:
            raise ValueError(f"smtp.delivery: {self.smtp.delivery!r} needs smtp.jobs.pipeline")
        if self.smtp.delivery in ("workers", "both") and not self.server.command:
            raise ValueError(f"smtp.delivery: {self.smtp.delivery!r} needs server.command")
        return self

    def delivers_to_workers(self) -> bool:
        if self.smtp.delivery == "auto":
            return bool(self.server.command) and self.smtp.jobs is None
        return self.smtp.delivery in ("workers", "both")

    def delivers_to_jobs(self) -> bool:
        if self.smtp.delivery == "auto":
            return self.smtp.jobs is not None
        return self.smtp.delivery in ("jobs", "both")

    @property
    def admin_url(self) -> str | None:
        """The admin API's address."""
        return f"http://{self.http.addr}" if self.http.enabled else None

    @property
    def rr_rpc(self) -> str | None:
        """What workers get as RR_RPC: the RPC endpoint when it is on, else the admin API."""
        return self.rpc.listen or self.admin_url

    @property
    def store_path(self) -> Path:
        return Path(self.store.path) if self.store.path else Path(self.data_dir) / "mailpipe.db"


class _FileSource(PydanticBaseSettingsSource):
    """The YAML file's values, weakest of the sources."""

    data: dict[str, Any] = {}

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self.data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self.data)


def find_config_file(explicit: str | None, cwd: Path | None = None) -> Path | None:
    if explicit:
        path = Path(explicit)
        if not path.exists():
            raise ConfigError(f"config file {explicit}: not found")
        if path.is_dir():
            raise ConfigError(f"config file {explicit}: is a directory")
        return path  # not only a regular file: /dev/null or <(...) are configs too
    base = cwd or Path.cwd()
    for name in CONFIG_FILE_NAMES:
        if (base / name).is_file():
            return base / name
    return None


def read_config_file(path: Path) -> dict[str, Any]:
    # PyYAML is imported here, not with mailpipe: without a config file it is never needed.
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path}: not valid YAML: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot be read: {exc.strerror}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of sections at the top")
    return data


# ---- RoadRunner files ---------------------------------------------------------------------

# The sections of RoadRunner's other plugins: a .rr.yaml holds them, mailpipe has no use for
# them (`rpc` is mailpipe's too: it turns the RPC endpoint on).
RR_SECTIONS = frozenset({
    "http", "logs", "kv", "metrics", "status", "reload", "service", "grpc", "tcp",
    "temporal", "centrifuge", "fileserver", "websockets", "broadcast", "otel", "endure",
    "lock", "redis", "memory", "boltdb", "memcached", "amqp", "beanstalk", "kafka", "nats",
    "sqs", "google_pub_sub", "informer", "resetter", "include", "experimental",
})
# Keys of RoadRunner's that sit in sections mailpipe reads and that it has no use for.
RR_IGNORED_KEYS = ("smtp.access_logs", "smtp.pool.debug", "smtp.pool.stream_timeout",
                   "jobs.pool.debug", "jobs.pool.stream_timeout", "jobs.num_pollers",
                   "jobs.pipeline_size")
# Keys only RoadRunner's http plugin has: an `http` section with one of them is RoadRunner's
# (its HTTP server for PHP), not mailpipe's API (`http.addr`, `http.auth`).
RR_HTTP_KEYS = frozenset({
    "address", "pool", "middleware", "uploads", "headers", "static", "ssl", "fcgi", "http2",
    "max_request_size", "trusted_subnets", "raw_body", "internal_error_code", "access_logs",
})
# RoadRunner's `logs.mode` as mailpipe's log settings; `logs.level` and `logs.encoding`
# given beside it win.
RR_LOG_MODES: dict[str, dict[str, str]] = {
    "development": {"level": "debug", "format": "console"},
    "production": {"level": "info", "format": "json"},
    "raw": {"format": "console"},
    "off": {"level": "error"},  # mailpipe still reports what fails
    "none": {"level": "error"},
}
RR_LOG_LEVELS = {"warn": "warning", "dpanic": "error", "panic": "error", "fatal": "error"}


def prepare_file(data: dict[str, Any], notices: list[str], problems: list[str]) -> dict[str, Any]:
    """The file's sections as mailpipe reads them: RoadRunner's other sections and keys taken
    out (one notice each), `logs` mapped onto `log`, an unknown section a problem."""
    data = {str(key): value for key, value in data.items()}
    if "logs" in data:
        mapped = _map_rr_logs(data.pop("logs"), problems)
        if mapped:
            notices.append("RoadRunner section 'logs' read as log: "
                           + ", ".join(f"{k}={v}" for k, v in mapped.items()))
            given = data.get("log")
            data["log"] = {**mapped, **given} if isinstance(given, dict) else given or mapped
        else:
            notices.append("ignoring RoadRunner section 'logs'")
    if isinstance(data.get("http"), dict) and RR_HTTP_KEYS & data["http"].keys():
        del data["http"]
        notices.append("ignoring RoadRunner section 'http' (RoadRunner's HTTP server; "
                       "mailpipe's API listens on http.addr)")
    known = set(Config.model_fields)
    for key in [k for k in data if k not in known]:
        del data[key]
        if key in RR_SECTIONS:
            notices.append(f"ignoring RoadRunner section {key!r}")
        else:
            import difflib  # only to suggest a name for a misspelt section

            close = difflib.get_close_matches(key, sorted(known | RR_SECTIONS), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            problems.append(f"  {key}: unknown section{hint}")
    for dotted in RR_IGNORED_KEYS:
        *parents, leaf = dotted.split(".")
        section: Any = data
        for name in parents:
            section = section.get(name) if isinstance(section, dict) else None
        if isinstance(section, dict) and leaf in section:
            del section[leaf]
            notices.append(f"ignoring RoadRunner key {dotted!r} (mailpipe has no use for it)")
    return data


def _map_rr_logs(logs: Any, problems: list[str]) -> dict[str, str]:
    if not isinstance(logs, dict):
        return {}
    mode = logs.get("mode", "")
    mode = "off" if mode is False else str(mode).lower()  # YAML 1.1 reads a bare off as false
    if mode and mode not in RR_LOG_MODES:
        problems.append(f"  logs.mode: got {logs['mode']!r}: expected "
                        f"{', '.join(RR_LOG_MODES)}")
    mapped = dict(RR_LOG_MODES.get(mode, {}))
    if "level" in logs:
        level = str(logs["level"]).lower()
        mapped["level"] = RR_LOG_LEVELS.get(level, level)
    if "encoding" in logs:
        mapped["format"] = str(logs["encoding"]).lower()
    return mapped


# ---- loading ------------------------------------------------------------------------------


def load_config(file: str | None = None, overrides: dict[str, Any] | None = None,
                cwd: Path | None = None) -> tuple[Config, Path | None]:
    """The effective configuration, and the file it came from (if any)."""
    path = find_config_file(file, cwd)
    notices: list[str] = []
    problems: list[str] = []
    _FileSource.data = prepare_file(read_config_file(path), notices, problems) if path else {}
    sources = _Sources(path, overrides or {})
    try:
        config = Config(**(overrides or {}))
    except ValidationError as exc:
        raise ConfigError(sources.describe(exc, problems)) from None
    except SettingsError as exc:
        raise ConfigError(sources.describe_undecodable(exc)) from None
    finally:
        _FileSource.data = {}
    if problems:
        raise ConfigError("\n".join([sources.header({str(path)}), *problems]))
    config.notices.extend(notices)
    return config, path


ENV_PREFIX = "MAILPIPE_"


class _Sources:
    """Where each value came from (flag, environment variable or file), for the errors."""

    def __init__(self, path: Path | None, overrides: dict[str, Any]) -> None:
        self.path = path
        self.overrides = overrides
        self.env = {name.upper(): name for name in os.environ}

    def env_variable(self, loc: tuple[Any, ...]) -> str | None:
        """The variable that set the value at `loc`: its own, or one holding a whole section
        or list as JSON."""
        parts = [str(part).upper() for part in loc]
        for end in range(len(parts), 0, -1):
            name = ENV_PREFIX + "__".join(parts[:end])
            if name in self.env:
                return self.env[name]
        return None

    def from_flags(self, loc: tuple[Any, ...]) -> bool:
        tree: Any = self.overrides
        for part in loc:
            if not isinstance(tree, dict) or str(part) not in tree:
                return False
            tree = tree[str(part)]
        return bool(loc)

    def header(self, origins: set[str]) -> str:
        places = {"the command line": "on the command line",
                  "the environment": "in the environment", str(self.path): f"in {self.path}"}
        named = [place for origin, place in places.items() if origin in origins]
        return " ".join(["invalid configuration", " and ".join(named)]).rstrip() + ":"

    def describe(self, exc: ValidationError, problems: list[str]) -> str:
        """One line per problem: the key (and the variable that set it), the bad value, what is
        expected."""
        origins: set[str] = {str(self.path)} if problems else set()
        lines = []
        for error in exc.errors(include_url=False):
            loc = tuple(p for p in error["loc"] if not str(p).startswith("function-"))
            key = re.sub(r"\.(\d+)(?=\.|$)", r"[\1]", ".".join(str(p) for p in loc))
            if self.from_flags(loc):
                origins.add("the command line")
            elif variable := self.env_variable(loc):
                origins.add("the environment")
                key = f"{variable} ({key})"
            elif loc and self.path:
                origins.add(str(self.path))
            message = error["msg"].removeprefix("Value error, ")
            if error["type"] == "extra_forbidden":
                lines.append(f"  {key}: unknown key (check its spelling)")
            elif not loc:  # a rule across sections: its message names the keys
                lines.append(f"  {message}")
            elif message.lstrip().startswith(f"{key}."):  # it names the keys inside
                lines.extend(f"  {line.strip()}" for line in message.splitlines())
            else:
                lines.append(f"  {key}: got {error['input']!r}: {message}")
        if not origins and self.path:
            origins.add(str(self.path))
        return "\n".join([self.header(origins), *problems, *lines])

    def describe_undecodable(self, exc: SettingsError) -> str:
        # pydantic-settings reads a section or list from one variable as JSON.
        match = re.search(r'field "([^"]+)"', str(exc))
        field = match.group(1).upper() if match else ""
        names = sorted(original for upper, original in self.env.items()
                       if upper.startswith(ENV_PREFIX + field))
        return (f"invalid configuration in the environment:\n  {', '.join(names) or exc}: "
                "not valid JSON (a section or list from the environment is written as JSON)")

