"""The `mailpipe` command. Thin: it turns flags into config overrides and runs the app."""

from __future__ import annotations

import asyncio
import errno
import logging
import sys
from typing import Any

import click

from mailpipe import __version__
from mailpipe.config import ConfigError, load_config

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

    from mailpipe.app import Mailpipe, install_uvloop
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
