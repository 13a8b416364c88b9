"""Other mail catchers' APIs over mailpipe's store, so that their clients and the test suites
written against them run unchanged: Mailpit's REST API v1 (compat/mailpit.py) and MailHog's
API v1 and v2 (compat/mailhog.py).

Their paths collide with mailpipe's own (`/api/v1/messages` exists in all three, with three
shapes), so each is an aiohttp application of its own, made by its module's
`create_app(context)`: served under `/compat/NAME` on the main listener and, when
`compat.NAME.addr` is set, at the root of a listener of its own. Both places sit behind the
same browser guard and authentication as mailpipe's API.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aiohttp import web

    from mailpipe.config import Config
    from mailpipe.metrics import Metrics
    from mailpipe.store.sqlite import SQLiteStore

APIS = ("mailpit", "mailhog")
PREFIX = "/compat/"


@dataclass(slots=True)
class CompatContext:
    """What a compatible API reaches into: the store, the running server (`mailpipe`: its
    plugins, capture pipeline and admin operations), metrics, the configuration, and the
    state its applications share."""

    store: SQLiteStore
    mailpipe: Any  # mailpipe.app.Mailpipe (imported lazily: app.py imports this package)
    metrics: Metrics
    config: Config
    # One per server, kept by all of its compatible APIs' applications: what the two places
    # an API is served must share (Mailpit's chaos triggers, MailHog's Jim), by API name.
    shared: dict[str, Any] = field(default_factory=dict)


def create_compat_app(name: str, context: CompatContext) -> web.Application:
    """A fresh application of compatible API `name` (one of APIS): an aiohttp application
    can be mounted once, and each place it is served needs its own."""
    if name not in APIS:
        raise ValueError(f"no compatible API {name!r}")
    module = importlib.import_module(f"mailpipe.compat.{name}")
    app: web.Application = module.create_app(context)
    return app
