"""In-process Python plugins: any class with hook methods (sync or async), found in
`plugins.plugin_path`, through the `mailpipe.plugins` entry-point group, or built in.

A plugin class may define `init(config)`, `health()` and `close()` (each sync or async) and
any subset of the hooks in `hooks.HOOKS`, taking any subset of the hook's arguments plus
`ctx`. pluggy checks the argument names at load. A sync hook runs on the event loop: set the
class attribute `threaded = True` if yours blocks (it then runs in a thread, with a timeout).
"""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from mailpipe.plugins.base import Inline, Plugin, PluginError
from mailpipe.plugins.context import HookContext
from mailpipe.plugins.hooks import HOOKS, PROJECT
from mailpipe.plugins.results import HookResult

ENTRY_POINT_GROUP = "mailpipe.plugins"


class PythonPlugin(Plugin):
    def __init__(self, name: str, obj: Any, kind: str, source: str,
                 files: list[str] | None = None) -> None:
        self.name = name
        self.kind = kind
        self.source = source
        self.obj = obj
        self._files = files or []
        self._methods = _hook_methods(name, obj)
        threaded = bool(getattr(obj, "threaded", False))
        self._inline = {
            hook: (fn, argnames) for hook, (fn, argnames) in self._methods.items()
            if not threaded and not inspect.iscoroutinefunction(fn)
        }

    def implemented(self) -> frozenset[str]:
        return frozenset(self._methods)

    def inline(self, hook: str) -> Inline | None:
        return self._inline.get(hook)

    async def call(self, hook: str, ctx: HookContext) -> HookResult | None:
        fn, argnames = self._methods[hook]
        kwargs = _kwargs(argnames, ctx)
        if inspect.iscoroutinefunction(fn):
            return await fn(**kwargs)
        return await asyncio.to_thread(fn, **kwargs)

    async def start(self, config: dict[str, Any]) -> None:
        await _maybe_await(getattr(self.obj, "init", None), config)

    async def health(self) -> bool:
        method = getattr(self.obj, "health", None)
        return True if method is None else bool(await _maybe_await(method))

    async def close(self) -> None:
        await _maybe_await(getattr(self.obj, "close", None))

    def files(self) -> list[str]:
        return self._files


def _kwargs(argnames: tuple[str, ...], ctx: HookContext) -> dict[str, Any]:
    args = ctx.args
    return {name: ctx if name == "ctx" else args.get(name) for name in argnames}


async def _maybe_await(method: Any, *args: Any) -> Any:
    if method is None:
        return None
    value = method(*args)
    return await value if inspect.isawaitable(value) else value


def _hook_methods(name: str, obj: Any) -> dict[str, tuple[Any, tuple[str, ...]]]:
    """The object's hook methods and the argument names each takes, checked by pluggy."""
    # pluggy is imported by the first plugin loaded, not with mailpipe (idle memory).
    import pluggy

    from mailpipe.plugins.hooks import MailpipeSpecs

    manager = pluggy.PluginManager(PROJECT)
    manager.add_hookspecs(MailpipeSpecs)
    manager.parse_hookimpl_opts = lambda plugin, attr: {} if attr in HOOKS else None
    try:
        manager.register(obj, name)
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"plugin {name}: {exc}") from None
    methods = {}
    for hook in HOOKS:
        for impl in getattr(manager.hook, hook).get_hookimpls():
            methods[hook] = (impl.function, tuple(impl.argnames))
    return methods


def instantiate(name: str, target: Any, kind: str, source: str,
                files: list[str] | None = None) -> PythonPlugin:
    """A class is instantiated (no arguments); anything else is used as it is."""
    try:
        obj = target() if inspect.isclass(target) else target
    except Exception as exc:
        raise PluginError(f"plugin {name}: {source}: could not create it: {exc!r}") from exc
    return PythonPlugin(name, obj, kind, source, files)


def load_file(name: str, path: Path) -> PythonPlugin:
    """`NAME.py` or the package `NAME/` in plugin_path: its `Plugin` class or `plugin`
    object, else the one class in it that has hook methods. Loaded afresh each time (reload)."""
    file = path / "__init__.py" if path.is_dir() else path
    module_name = f"mailpipe_plugin_{name}"
    spec = importlib.util.spec_from_file_location(
        module_name, file, submodule_search_locations=[str(path)] if path.is_dir() else None)
    if spec is None or spec.loader is None:
        raise PluginError(f"plugin {name}: cannot load {file}")
    module = importlib.util.module_from_spec(spec)
    # A reload must see the file as it is now: drop the package's submodules imported last
    # time, and compile the source itself (cached bytecode is keyed on the file's mtime in
    # whole seconds and its size, so a quick same-size edit would run the old code).
    for loaded in [m for m in sys.modules if m.startswith(f"{module_name}.")]:
        del sys.modules[loaded]
    sys.modules[module_name] = module  # dataclasses and pickling look modules up here
    try:
        exec(compile(file.read_bytes(), str(file), "exec"), module.__dict__)
    except Exception as exc:
        raise PluginError(f"plugin {name}: {file} failed to import: {exc!r}") from exc
    files = [str(p) for p in (path.rglob("*.py") if path.is_dir() else [path])]
    return instantiate(name, _plugin_in(module, name, file), "python", str(file), files)


def _plugin_in(module: Any, name: str, file: Path) -> Any:
    for attr in ("Plugin", "plugin"):
        if hasattr(module, attr):
            return getattr(module, attr)
    candidates = [
        value for value in vars(module).values()
        if inspect.isclass(value) and value.__module__ == module.__name__
        and any(hasattr(value, hook) for hook in HOOKS)
    ]
    if len(candidates) != 1:
        found = ", ".join(c.__name__ for c in candidates) or "none"
        raise PluginError(f"plugin {name}: {file} must define `Plugin` (a class) or `plugin` "
                          f"(an object), or exactly one class with hook methods (found {found})")
    return candidates[0]


def find_file(plugin_path: Path, name: str) -> Path | None:
    for candidate in (plugin_path / f"{name}.py", plugin_path / name):
        if candidate.is_file() or (candidate / "__init__.py").is_file():
            return candidate
    return None


def discover_files(plugin_path: Path) -> list[str]:
    """Plugin names in plugin_path: NAME.py files and NAME/ packages, not _private ones."""
    if not plugin_path.is_dir():
        return []
    names = {p.stem for p in plugin_path.glob("*.py")}
    names |= {p.name for p in plugin_path.iterdir() if (p / "__init__.py").is_file()}
    return sorted(n for n in names if not n.startswith(("_", ".")))


def load_entry_point(name: str) -> PythonPlugin | None:
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            try:
                target = ep.load()
            except Exception as exc:
                raise PluginError(f"plugin {name}: entry point {ep.value} failed to load: "
                                  f"{exc!r}") from exc
            return instantiate(name, target, "python", f"entry point {ep.value}")
    return None
