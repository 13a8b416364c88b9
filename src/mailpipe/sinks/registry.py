"""Sinks by name: the built-ins and those installed under the `mailpipe.sinks` entry-point group.

A registered sink is a `Sink` subclass with a `Settings` model (its `sinks.NAME` section) and
a `create` factory, so that a new sink (relay, webhook, a package of your own) is configured
and built without any change to the code that runs mailpipe.
"""

from __future__ import annotations

import functools
import logging
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, Any

from pydantic import ConfigDict, ValidationError, create_model
from pydantic_core import InitErrorDetails, PydanticCustomError

if TYPE_CHECKING:
    from mailpipe.config import Config
    from mailpipe.metrics import Metrics
    from mailpipe.sinks.base import Sink

log = logging.getLogger("mailpipe.sinks")

ENTRY_POINT_GROUP = "mailpipe.sinks"

# In the order their results are weighed within a stage. Imported only when used: the jobs
# sink pulls in the broker clients.
BUILTIN = {
    "workers": "mailpipe.workers.sink:WorkerSink",
    "jobs": "mailpipe.jobs.sink:JobsSink",
    "store": "mailpipe.store.sqlite:StoreSink",
    "jsonl": "mailpipe.sinks.jsonl:JSONLSink",
}
# Built-ins that are off unless the configuration turns them on (their `create` answers None
# otherwise), with the Config method that says so: without their section, build_sinks does not
# import them at all (the worker pool and the jobs producer cost idle memory; issue 13).
SWITCHED_ON_BY = {"workers": "delivers_to_workers", "jobs": "delivers_to_jobs"}


@functools.cache
def registered() -> dict[str, EntryPoint]:
    """Every sink name and where its class lives: built-ins first, then installed ones."""
    found = {name: EntryPoint(name, value, ENTRY_POINT_GROUP) for name, value in BUILTIN.items()}
    for entry in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        if entry.name in found:
            if entry.value != found[entry.name].value:
                log.warning("sink %r from %s ignored: the name is taken by %s",
                            entry.name, entry.value, found[entry.name].value)
            continue
        found[entry.name] = entry
    return found


@functools.cache
def sink_class(name: str) -> type[Sink]:
    """The registered class for `name`; ValueError when it cannot be loaded."""
    from mailpipe.sinks.base import Sink

    entry = registered()[name]
    try:
        loaded = entry.load()
    except Exception as exc:  # a broken third-party package: say which and why
        raise ValueError(f"cannot load {entry.value}: {type(exc).__name__}: {exc}") from exc
    if not (isinstance(loaded, type) and issubclass(loaded, Sink)):
        raise ValueError(f"{entry.value} is not a mailpipe.sinks.base.Sink subclass")
    return loaded


def validate_sections(sections: dict[str, Any]) -> dict[str, Any]:
    """Each `sinks.NAME` section validated by its sink's model; errors are located at
    `sinks.NAME.KEY`. An empty section (`NAME: {}` or `NAME:`) takes the defaults."""
    sections = {name: value or {} for name, value in sections.items()}
    problems = [_problem(name, value, text) for name, value in sections.items()
                if (text := _unusable(name)) is not None]
    if problems:
        raise ValidationError.from_exception_data("sinks", problems)
    fields: Any = {name: (sink_class(name).Settings, ...) for name in sections}
    model = create_model("sinks", __config__=ConfigDict(extra="forbid"), **fields)
    validated = dict(model.model_validate(sections))
    problems = [_problem(name, settings.on_failure, "an optional sink answers after the 250, "
                         "so its failures can only be ignored; set required: true", "on_failure")
                for name, settings in validated.items() if _optional_but_failing(name, settings)]
    if problems:
        raise ValidationError.from_exception_data("sinks", problems)
    return validated


def _unusable(name: str) -> str | None:
    if name not in registered():
        known = ", ".join(sorted(registered()))
        return f"no sink named {name!r} is registered (known: {known})"
    try:
        sink_class(name)
    except ValueError as exc:
        return str(exc)
    return None


def _optional_but_failing(name: str, settings: Any) -> bool:
    required = sink_class(name).required if settings.required is None else settings.required
    return not required and settings.on_failure in ("tempfail", "reject")


def _problem(name: str, value: Any, text: str, *keys: str) -> InitErrorDetails:
    # The text is already worded; braces in it must not be read as placeholders.
    error = PydanticCustomError("sink_config", "{text}", {"text": text})
    return InitErrorDetails(type=error, loc=(name, *keys), input=value)


def build_sinks(config: Config, metrics: Metrics) -> list[Sink]:
    """Every sink the configuration enables, in registry order, with its section applied."""
    from mailpipe.sinks.base import SinkContext

    context = SinkContext(config=config, metrics=metrics)
    sections = config.sinks.sections()
    sinks = []
    for name in registered():
        settings = sections.get(name)
        switch = SWITCHED_ON_BY.get(name)
        if settings is None and switch is not None and not getattr(config, switch)():
            continue  # off, as its create() would say, and its module not imported
        if settings is None and name in BUILTIN and not sink_class(name).needs_section:
            settings = sink_class(name).Settings()
        if settings is None:
            continue  # not configured (and a third-party module is not even imported)
        sink = sink_class(name).create(settings, context)
        if sink is None:
            if name in sections:  # for instance sinks.workers without server.command
                log.warning("sinks.%s is set, but this configuration leaves that sink off", name)
            continue
        sink.name = name
        sink.apply(settings)
        sinks.append(sink)
    return sinks
