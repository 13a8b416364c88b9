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
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
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


CONFIG_HELP = "Config file (default: mailpipe.yaml or .rr.yaml in this directory)."
log_level_option = click.option(
    "--log-level", type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False))
log_format_option = click.option(
    "--log-format", type=click.Choice(["console", "json"], case_sensitive=False))


def _load(config_file: str | None,
          overrides: dict[str, Any] | None = None) -> tuple[Config, Path | None]:
    """The config, or exit 2 with the one line naming what is wrong."""
    try:
        return load_config(config_file, overrides)
    except ConfigError as exc:
        _fail(str(exc), code=2)


def _overrides(pairs: Iterable[tuple[str, Any]]) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for key, value in pairs:
        if value is not None:
            _set(overrides, key, value)
    return overrides


def _start_logging(config: Config, path: Path | None, **extra: Any) -> None:
    """Logging as configured, uvloop when installed, and the starting line."""
    from mailpipe.app import install_uvloop
    from mailpipe.logs import setup_logging

    setup_logging(config.log.level, config.log.format)
    uvloop = install_uvloop()
    log.info("mailpipe %s starting", __version__,
             extra={"config": str(path) if path else "defaults", "uvloop": uvloop, **extra})
    for notice in config.notices:
        log.info(notice)


@main.command()
@click.option("-c", "--config", "config_file", metavar="FILE", help=CONFIG_HELP)
@click.option("--smtp", metavar="HOST:PORT", help="SMTP listen address (smtp.addr).")
@click.option("--http", metavar="HOST:PORT", help="HTTP API listen address (http.addr).")
@click.option("--data-dir", metavar="DIR", help="Where the store and spool files live.")
@log_level_option
@log_format_option
@click.option("--jsonl", metavar="PATH", help="Also write each event as a JSON line ('-': stdout).")
def serve(config_file: str | None, smtp: str | None, http: str | None, data_dir: str | None,
          log_level: str | None, log_format: str | None, jsonl: str | None) -> None:
    """Capture email: SMTP in, events to the store, the API and the configured sinks."""
    config, path = _load(config_file, _overrides(
        (("smtp.addr", smtp), ("http.addr", http), ("data_dir", data_dir),
         ("log.level", log_level), ("log.format", log_format), ("sinks.jsonl.path", jsonl))))

    from mailpipe.app import Mailpipe, StartupError

    _start_logging(config, path)
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
    except KeyboardInterrupt:  # before the signal handlers are installed
        pass


@main.command("check-config")
@click.option("-c", "--config", "config_file", metavar="FILE")
def check_config(config_file: str | None) -> None:
    """Validate the configuration and print it as mailpipe sees it."""
    config, path = _load(config_file)
    import yaml

    click.echo(f"# from {path or 'defaults'}")
    for notice in config.notices:
        click.echo(f"# {notice}")
    click.echo(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))


# ---- management commands over the HTTP admin API ----------------------------------------


@dataclass
class AdminClient:
    """The admin API of a running mailpipe, through urllib (no extra dependency)."""

    base: str
    headers: dict[str, str]

    def call(self, method: str, path: str, body: Any = None) -> Any:
        """The decoded JSON body (None when empty); exits 1 with one clear line on failure.
        `body`, when given, is sent as JSON."""
        headers, data = self.headers, None
        if body is not None:
            headers = {**headers, "Content-Type": "application/json"}
            data = json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method,
                                         headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                data = response.read()
        except urllib.error.HTTPError as exc:
            _fail(f"{_error_message(exc)} (HTTP {exc.code})")
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            _fail(f"cannot reach the admin API at {self.base}: {reason}")
        return json.loads(data) if data else None


def _fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"mailpipe: {message}", err=True)
    sys.exit(code)


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


def _client(config_file: str | None, api: str | None, token: str | None,
            data_dir: str | None = None) -> AdminClient:
    config: Config | None = None
    if api is None or token is None:
        config, _ = _load(config_file, _overrides((("data_dir", data_dir),)))
    if api is None:
        assert config is not None
        api = _api_url(_server_http_addr(config))
    elif "://" not in api:
        api = "http://" + api
    return AdminClient(api.rstrip("/"), {"Accept": "application/json",
                                         **_auth_header(config, token)})


def _server_http_addr(config: Config) -> str:
    """The HTTP address of the server that uses this config's data dir: the one it bound (its
    state file says; `--http` or MAILPIPE_HTTP__ADDR may have moved it), else the configured."""
    from mailpipe.discovery import read_state

    state = read_state(config.data_dir)
    if state is not None:
        if state.get("http_addr"):
            return str(state["http_addr"])
        _fail(f"the mailpipe running on {config.data_dir} (pid {state.get('pid')}) serves no "
              "HTTP API (http.enabled); pass --api URL")
    if not config.http.enabled:
        _fail("the HTTP API is disabled in the configuration (http.enabled); pass --api URL")
    return config.http.addr


F = TypeVar("F", bound=Callable[..., Any])


def admin_options(func: F) -> F:
    """--api, -c, --token and --json, turned into `client` and `as_json` arguments."""

    @functools.wraps(func)
    def wrapper(config_file: str | None, api: str | None, token: str | None,
                data_dir: str | None, **kwargs: Any) -> Any:
        return func(client=_client(config_file, api, token, data_dir), **kwargs)

    options = [
        click.option("--api", metavar="URL",
                     help="The admin API (default: the one the server of the data dir bound, "
                          "else http://<http.addr> from the config)."),
        click.option("-c", "--config", "config_file", metavar="FILE",
                     help="Config file for the API address and http.auth."),
        click.option("--data-dir", metavar="DIR",
                     help="The data dir of the server to manage (as given to serve)."),
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


def _add_row(table: Table, *cells: str) -> None:
    """Cells as they are: text in square brackets (an error, an IPv6 address) is not markup."""
    from rich.text import Text

    table.add_row(*(Text(cell) for cell in cells))


def _workers_table(workers: list[dict[str, Any]]) -> Table:
    from rich.table import Table

    table = Table("PID", "Status", "Execs", "Memory", "Created", "Last error")
    for column in table.columns[2:4]:
        column.justify = "right"
    for worker in workers:
        _add_row(
            table,
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
        _add_row(
            table,
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
    """Close one session with 421 (after the email being sent; not waiting on a worker)."""
    client.call("DELETE", f"/api/v1/connections/{urllib.parse.quote(uuid, safe='')}")
    _emit({"closed": uuid}, as_json, f"closed connection {uuid}")


@main.command("stop")
@admin_options
def stop(client: AdminClient, as_json: bool) -> None:
    """Shut a running mailpipe down gracefully, as SIGTERM does."""
    data = client.call("POST", "/api/v1/stop")
    _emit(data, as_json, "mailpipe is stopping")


# ---- jobs: the consumer process, and the pipelines of a running mailpipe -----------------


@main.group()
def jobs() -> None:
    """Consume jobs pipelines; list, pause, resume or purge those of a running mailpipe."""


def _dead_letter_targets(config: Config) -> set[str]:
    return {name for pipeline in config.jobs.pipelines.values()
            if (name := pipeline.config.dead_letter) is not None}


def _pipelines_to_consume(config: Config, given: tuple[str, ...]) -> list[str]:
    """The PIPELINE arguments, else jobs.consume, else every declared pipeline but the
    dead-letter and roadrunner ones; exits 2 for an undeclared name, nothing to consume or
    no command."""
    declared = config.jobs.pipelines
    for name in given:
        if name not in declared:
            _fail(f"jobs consume: pipeline {name!r} is not declared in jobs.pipelines", code=2)
        if declared[name].driver == "roadrunner":
            _fail(f"jobs consume: {name!r} is a roadrunner pipeline: RoadRunner's own "
                  "consumers take its jobs", code=2)
    names = list(dict.fromkeys(given)) or config.jobs.consume
    if not names:
        # Not the dead-letter ones, nor those RoadRunner's consumers take.
        dead = _dead_letter_targets(config)
        names = [name for name, pipeline in declared.items()
                 if name not in dead and pipeline.driver != "roadrunner"]
    if not names:
        _fail("jobs consume: no pipeline is declared in jobs.pipelines" if not declared else
              "jobs consume: no pipeline to consume (roadrunner pipelines are RoadRunner's)",
              code=2)
    if not (config.jobs.pool.command or config.server.command):
        _fail("jobs consume: no consumer command: set jobs.pool.command (or server.command)",
              code=2)
    return names


@jobs.command("consume")
@click.argument("pipelines", nargs=-1, metavar="[PIPELINE]...")
@click.option("-c", "--config", "config_file", metavar="FILE", help=CONFIG_HELP)
@log_level_option
@log_format_option
def jobs_consume(pipelines: tuple[str, ...], config_file: str | None, log_level: str | None,
                 log_format: str | None) -> None:
    """Run the jobs worker pool (jobs.pool) on pipelines, without SMTP, until SIGINT/SIGTERM.

    Without PIPELINE: the config's jobs.consume, else every declared pipeline except the
    dead-letter ones. On a signal it stops pulling, lets the jobs in hand finish (up to
    shutdown_timeout) and exits 0; the rest stay with the broker."""
    config, path = _load(config_file, _overrides(
        (("log.level", log_level), ("log.format", log_format))))
    names = _pipelines_to_consume(config, pipelines)

    from mailpipe.jobs.runner import run_consumer
    from mailpipe.metrics import Metrics
    from mailpipe.plugins.base import PluginError
    from mailpipe.workers.on_init import OnInitError
    from mailpipe.workers.pool import PoolError

    _start_logging(config, path, pipelines=names)
    try:
        asyncio.run(run_consumer(config, names, Metrics()))
    except PoolError as exc:
        _fail(f"cannot start the jobs worker pool: {exc}")
    except (OnInitError, PluginError) as exc:
        _fail(f"cannot start: {exc}")
    except KeyboardInterrupt:  # before the signal handlers are installed
        pass


def _pipeline_path(name: str, suffix: str = "") -> str:
    return f"/api/v1/jobs/pipelines/{urllib.parse.quote(name, safe='')}{suffix}"


PIPELINE_COLUMNS = ("Pipeline", "Driver", "Queue", "Ready", "Delayed", "Reserved", "Dead",
                    "Consumed", "Paused")
PIPELINE_KEYS = ("pipeline", "driver", "queue", "ready", "delayed", "reserved", "dead")


def _pipeline_row(pipeline: dict[str, Any]) -> list[str]:
    if "error" in pipeline:  # its broker did not answer
        return [str(pipeline.get("pipeline")), *["-"] * 8, str(pipeline["error"])]
    row = [str(pipeline.get(key, "-")) for key in PIPELINE_KEYS]
    return [*row, *("yes" if pipeline.get(key) else "no" for key in ("consumed", "paused")), ""]


def _pipelines_table(pipelines: list[dict[str, Any]]) -> Table:
    from rich.table import Table

    errors = any("error" in pipeline for pipeline in pipelines)
    table = Table(*PIPELINE_COLUMNS, *(["Error"] if errors else []))
    for column in table.columns[3:7]:
        column.justify = "right"
    for pipeline in pipelines:
        _add_row(table, *_pipeline_row(pipeline)[:len(table.columns)])
    return table


@jobs.command("list")
@admin_options
def jobs_list(client: AdminClient, as_json: bool) -> None:
    """Every declared pipeline: driver, queue, depth, consumed and paused here."""
    data = client.call("GET", "/api/v1/jobs/pipelines")
    _show_list(data, "pipelines", as_json, _pipelines_table)


@jobs.command("stats")
@click.argument("pipeline", required=False)
@admin_options
def jobs_stats(client: AdminClient, as_json: bool, pipeline: str | None) -> None:
    """One pipeline's jobs: ready, delayed, reserved, dead (every pipeline without PIPELINE)."""
    if pipeline is None:
        data = client.call("GET", "/api/v1/jobs/pipelines")
        _show_list(data, "pipelines", as_json, _pipelines_table)
        return
    data = client.call("GET", _pipeline_path(pipeline))
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        _console().print(_pipelines_table([data]))


@jobs.command("pause")
@click.argument("pipeline")
@admin_options
def jobs_pause(client: AdminClient, as_json: bool, pipeline: str) -> None:
    """Stop taking jobs from a pipeline the server consumes (jobs.consume); pushing goes on."""
    client.call("POST", _pipeline_path(pipeline, "/pause"))
    _emit({"pipeline": pipeline, "paused": True}, as_json, f"paused pipeline {pipeline}")


@jobs.command("resume")
@click.argument("pipeline")
@admin_options
def jobs_resume(client: AdminClient, as_json: bool, pipeline: str) -> None:
    """Take jobs from a paused pipeline again."""
    client.call("POST", _pipeline_path(pipeline, "/resume"))
    _emit({"pipeline": pipeline, "paused": False}, as_json, f"resumed pipeline {pipeline}")


@jobs.command("purge")
@click.argument("pipeline")
@admin_options
def jobs_purge(client: AdminClient, as_json: bool, pipeline: str) -> None:
    """Delete the pipeline's jobs not yet acked (ready, delayed, reserved); dead letters stay."""
    data = client.call("DELETE", _pipeline_path(pipeline, "/jobs"))
    _emit(data, as_json, f"purged {data['purged']} jobs from pipeline {pipeline}")


# ---- plugins of a running mailpipe ------------------------------------------------------


@main.group()
def plugins() -> None:
    """List the plugins of a running mailpipe, show their counters, reload them."""


def _plugins_table(entries: list[dict[str, Any]]) -> Table:
    from rich.table import Table

    table = Table("Name", "Kind", "Enabled", "Hooks", "Source")
    for entry in entries:
        _add_row(
            table,
            str(entry.get("name")),
            str(entry.get("kind", "")),
            "yes" if entry.get("enabled") else "no",
            ", ".join(entry.get("hooks") or []) or "-",
            str(entry.get("source", "")),
        )
    return table


STAT_COLUMNS = ("executions", "successes", "failures", "timeouts", "recoveries")


def _plugin_stats_table(entries: list[dict[str, Any]]) -> Table:
    """One row per plugin and hook it implements (hooks never called show zeros)."""
    from rich.table import Table

    external = any(entry.get("kind") == "external" for entry in entries)
    table = Table("Plugin", "Hook", "Execs", "OK", "Failed", "Timeouts", "Recovered",
                  "Mean ms", "P99 ms", *(["PID", "Restarts"] if external else []))
    for column in table.columns[2:9]:
        column.justify = "right"
    for entry in entries:
        stats = entry.get("stats") or {}
        process = ([str(entry.get("pid") or "-"), str(entry.get("restarts") or 0)]
                   if entry.get("kind") == "external" else ["-", "-"])
        for hook in sorted(set(entry.get("hooks") or []) | set(stats)):
            counts = stats.get(hook, {})
            _add_row(
                table,
                str(entry.get("name")),
                hook,
                *(str(counts.get(key, 0)) for key in STAT_COLUMNS),
                f"{counts.get('mean_ms', 0):.3f}",
                f"{counts.get('p99_ms', 0):.3f}",
                *(process if external else []),
            )
    return table


def _plugin_path(name: str) -> str:
    return f"/api/v1/plugins/{urllib.parse.quote(name, safe='')}"


@plugins.command("list")
@admin_options
def plugins_list(client: AdminClient, as_json: bool) -> None:
    """The loaded plugins: name, kind, enabled, hooks, source."""
    data = client.call("GET", "/api/v1/plugins")
    _show_list(data, "plugins", as_json, _plugins_table)


@plugins.command("status")
@click.argument("name", required=False)
@admin_options
def plugins_status(client: AdminClient, as_json: bool, name: str | None) -> None:
    """Per hook: executions, successes, failures, timeouts, recoveries, mean and p99 time;
    PID and restarts of external plugins (every plugin without NAME)."""
    if name is None:
        data = client.call("GET", "/api/v1/plugins")
        _show_list(data, "plugins", as_json, _plugin_stats_table)
        return
    entry = client.call("GET", _plugin_path(name))
    if as_json:
        click.echo(json.dumps(entry, indent=2))
        return
    if entry.get("last_error"):
        click.echo(f"last error: {entry['last_error']}")
    _console().print(_plugin_stats_table([entry]))


@plugins.command("reload")
@click.argument("names", nargs=-1, metavar="[NAME]...")
@admin_options
def plugins_reload(client: AdminClient, as_json: bool, names: tuple[str, ...]) -> None:
    """Load plugins afresh (every one without NAME); open SMTP sessions go on. Exits 1 when
    one failed to reload (it keeps running its previous version)."""
    data = client.call("POST", "/api/v1/plugins/reload",
                       body={"plugins": list(names) if names else None})
    outcomes: dict[str, str] = data["plugins"]
    lines = [f"{name}: {outcome}" for name, outcome in outcomes.items()]
    _emit(data, as_json, "\n".join(lines) or "no plugins loaded")
    if any(outcome != "reloaded" for outcome in outcomes.values()):
        sys.exit(1)
