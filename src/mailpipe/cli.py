"""The `mailpipe` command. Thin: it turns flags into config overrides and runs the app."""

from __future__ import annotations

import asyncio
import base64
import errno
import functools
import json
import logging
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar, cast

import click

from mailpipe import __version__
from mailpipe.config import Config, ConfigError, load_config, split_host_port

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

log = logging.getLogger("mailpipe")


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[leaf] = value


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mailpipe")
def main() -> None:
    """mailpipe: an SMTP capture server for developers."""


@main.command()
@click.option("-c", "--config", "config_file", metavar="FILE",
              help="Config file (default: mailpipe.yaml or .rr.yaml in this directory).")
@click.option("--smtp", metavar="HOST:PORT", help="SMTP listen address (smtp.addr).")
@click.option("--http", metavar="HOST:PORT", help="HTTP API listen address (http.addr).")
@click.option("--data-dir", metavar="DIR", help="Where the store and spool files live.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"],
                                               case_sensitive=False))
@click.option("--log-format", type=click.Choice(["console", "json"], case_sensitive=False))
@click.option("--jsonl", metavar="PATH", help="Also write each event as a JSON line ('-': stdout).")
def serve(config_file: str | None, smtp: str | None, http: str | None, data_dir: str | None,
          log_level: str | None, log_format: str | None, jsonl: str | None) -> None:
    """Capture email: SMTP in, events to the store, the API and the configured sinks."""
    overrides: dict[str, Any] = {}
    for key, value in (("smtp.addr", smtp), ("http.addr", http), ("data_dir", data_dir),
                       ("log.level", log_level), ("log.format", log_format),
                       ("sinks.jsonl.path", jsonl)):
        if value is not None:
            _set(overrides, key, value)
    try:
        config, path = load_config(config_file, overrides)
    except ConfigError as exc:
        click.echo(f"mailpipe: {exc}", err=True)
        sys.exit(2)

    from mailpipe.app import Mailpipe, StartupError, install_uvloop
    from mailpipe.logs import setup_logging

    setup_logging(config.log.level, config.log.format)
    uvloop = install_uvloop()
    log.info("mailpipe %s starting", __version__,
             extra={"config": str(path) if path else "defaults", "uvloop": uvloop})
    try:
        asyncio.run(Mailpipe(config).run())
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            click.echo(f"mailpipe: cannot listen: {exc.strerror} ({exc})", err=True)
        else:
            click.echo(f"mailpipe: {exc}", err=True)
        sys.exit(1)
    except StartupError as exc:
        click.echo(f"mailpipe: cannot start: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        pass


@main.command("check-config")
@click.option("-c", "--config", "config_file", metavar="FILE")
def check_config(config_file: str | None) -> None:
    """Validate the configuration and print it as mailpipe sees it."""
    try:
        config, path = load_config(config_file)
    except ConfigError as exc:
        click.echo(f"mailpipe: {exc}", err=True)
        sys.exit(2)
    import yaml

    click.echo(f"# from {path or 'defaults'}")
    click.echo(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))


# ---- management commands over the HTTP admin API ----------------------------------------


@dataclass
class AdminClient:
    """The admin API of a running mailpipe, through urllib (no extra dependency)."""

    base: str
    headers: dict[str, str]

    def call(self, method: str, path: str) -> Any:
        """The decoded JSON body (None when empty); exits 1 with one clear line on failure."""
        request = urllib.request.Request(self.base + path, method=method, headers=self.headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                data = response.read()
        except urllib.error.HTTPError as exc:
            _fail(f"{_error_message(exc)} (HTTP {exc.code})")
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            _fail(f"cannot reach the admin API at {self.base}: {reason}")
        return json.loads(data) if data else None


def _fail(message: str) -> NoReturn:
    click.echo(f"mailpipe: {message}", err=True)
    sys.exit(1)


def _error_message(exc: urllib.error.HTTPError) -> str:
    body = exc.read()
    try:
        return str(json.loads(body)["error"])
    except (ValueError, KeyError, TypeError):
        return body.decode(errors="replace").strip() or str(exc.reason)


def _api_url(addr: str) -> str:
    host, port = split_host_port(addr)
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _auth_header(config: Config | None, token: str | None) -> dict[str, str]:
    if token:
        return {"Authorization": f"Bearer {token}"}
    auth = config.http.auth if config is not None else None
    if auth is None:
        return {}
    if auth.type == "bearer":
        return {"Authorization": f"Bearer {auth.token}"}
    pair = f"{auth.username}:{auth.password}".encode()
    return {"Authorization": "Basic " + base64.b64encode(pair).decode()}


def _client(config_file: str | None, api: str | None, token: str | None) -> AdminClient:
    config: Config | None = None
    if api is None or token is None:
        try:
            config, _ = load_config(config_file)
        except ConfigError as exc:
            click.echo(f"mailpipe: {exc}", err=True)
            sys.exit(2)
    if api is None:
        assert config is not None
        if not config.http.enabled:
            _fail("the HTTP API is disabled in the configuration (http.enabled); pass --api URL")
        api = _api_url(config.http.addr)
    elif "://" not in api:
        api = "http://" + api
    return AdminClient(api.rstrip("/"), {"Accept": "application/json",
                                         **_auth_header(config, token)})


F = TypeVar("F", bound=Callable[..., Any])


def admin_options(func: F) -> F:
    """--api, -c, --token and --json, turned into `client` and `as_json` arguments."""

    @functools.wraps(func)
    def wrapper(config_file: str | None, api: str | None, token: str | None,
                **kwargs: Any) -> Any:
        return func(client=_client(config_file, api, token), **kwargs)

    options = [
        click.option("--api", metavar="URL",
                     help="The admin API (default: http://<http.addr> from the config)."),
        click.option("-c", "--config", "config_file", metavar="FILE",
                     help="Config file for the API address and http.auth."),
        click.option("--token", metavar="TOKEN", help="Bearer token (default: http.auth)."),
        click.option("--json", "as_json", is_flag=True, help="Print the raw JSON."),
    ]
    for option in reversed(options):
        wrapper = option(wrapper)
    return cast(F, wrapper)


def _emit(data: Any, as_json: bool, text: str) -> None:
    click.echo(json.dumps(data, indent=2) if as_json else text)


def _console() -> Console:
    from rich.console import Console  # rich only for the tables, not at every start

    console = Console()
    if not console.is_terminal:  # piped: keep uuids and errors whole rather than wrapped
        console.width = max(console.width, 200)
    return console


def _age(since: str | None) -> str:
    if not since:
        return "-"
    try:
        seconds = int((datetime.now(UTC) - datetime.fromisoformat(since)).total_seconds())
    except (ValueError, TypeError):
        return since
    seconds = max(seconds, 0)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes}m"
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def _megabytes(value: int | None) -> str:
    return "-" if value is None else f"{value / (1024 * 1024):.1f} MB"


def _workers_table(workers: list[dict[str, Any]]) -> Table:
    from rich.table import Table

    table = Table("PID", "Status", "Execs", "Memory", "Created", "Last error")
    for column in table.columns[2:4]:
        column.justify = "right"
    for worker in workers:
        table.add_row(
            str(worker.get("pid", "-")),
            str(worker.get("status", "-")),
            str(worker.get("num_execs", 0)),
            _megabytes(worker.get("rss_bytes")),
            _age(worker.get("created_at")),
            str(worker.get("last_error") or ""),
        )
    return table


def _connections_table(connections: list[dict[str, Any]]) -> Table:
    from rich.table import Table

    table = Table("UUID", "Remote", "Server", "State", "Emails", "Since")
    table.columns[0].no_wrap = True
    table.columns[4].justify = "right"
    for conn in connections:
        table.add_row(
            str(conn.get("uuid")),
            str(conn.get("remote_addr", "")),
            str(conn.get("server", "")),
            str(conn.get("state", "")),
            str(conn.get("emails", 0)),
            _age(conn.get("since")),
        )
    return table


def _show_list(data: dict[str, Any], key: str, as_json: bool,
               table: Callable[[list[dict[str, Any]]], Table]) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2))
    elif not data[key]:
        click.echo(f"no {key}")
    else:
        _console().print(table(data[key]))


def _describe(worker: dict[str, Any]) -> str:
    return f"PID {worker.get('pid')} ({worker.get('status', '?')})"


@main.group()
def workers() -> None:
    """List, add, remove or reset the workers of a running mailpipe."""


@workers.command("list")
@admin_options
def workers_list(client: AdminClient, as_json: bool) -> None:
    """The workers, like `rr workers`."""
    data = client.call("GET", "/api/v1/workers")
    _show_list(data, "workers", as_json, _workers_table)


@workers.command("add")
@admin_options
def workers_add(client: AdminClient, as_json: bool) -> None:
    """Start one more worker."""
    data = client.call("POST", "/api/v1/workers")
    _emit(data, as_json, f"added worker {_describe(data)}")


@workers.command("remove")
@admin_options
def workers_remove(client: AdminClient, as_json: bool) -> None:
    """Stop one worker (an idle one first)."""
    data = client.call("DELETE", "/api/v1/workers")
    _emit(data, as_json, f"removed worker {_describe(data)}")


def _reset(client: AdminClient, as_json: bool) -> None:
    data = client.call("POST", "/api/v1/workers/reset")
    _emit(data, as_json, f"reset {data['reset']} workers")


@workers.command("reset")
@admin_options
def workers_reset(client: AdminClient, as_json: bool) -> None:
    """Replace every worker; emails in flight finish on their old worker first."""
    _reset(client, as_json)


@main.command("reset")
@admin_options
def reset(client: AdminClient, as_json: bool) -> None:
    """Replace every worker (the same as `workers reset`)."""
    _reset(client, as_json)


@main.group()
def connections() -> None:
    """List or close the SMTP sessions of a running mailpipe."""


@connections.command("list")
@admin_options
def connections_list(client: AdminClient, as_json: bool) -> None:
    """The live SMTP sessions."""
    data = client.call("GET", "/api/v1/connections")
    _show_list(data, "connections", as_json, _connections_table)


@connections.command("close")
@click.argument("uuid")
@admin_options
def connections_close(client: AdminClient, as_json: bool, uuid: str) -> None:
    """Close one session with 421 (after the email in flight, if any)."""
    client.call("DELETE", f"/api/v1/connections/{urllib.parse.quote(uuid, safe='')}")
    _emit({"closed": uuid}, as_json, f"closed connection {uuid}")


@main.command("stop")
@admin_options
def stop(client: AdminClient, as_json: bool) -> None:
    """Shut a running mailpipe down gracefully, as SIGTERM does."""
    data = client.call("POST", "/api/v1/stop")
    _emit(data, as_json, "mailpipe is stopping")
