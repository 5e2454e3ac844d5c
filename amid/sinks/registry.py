"""Every sink type amid knows, built-in or plugin, found and loaded one way.

A sink type is an entry point: a name (the config's ``type``) and a factory
``create(name, options) -> Sink``. The pydantic model of the type's own config keys is the
factory's ``Options`` attribute, else the ``Options`` class of the factory's module; without
either, the keys reach the factory as a plain dict. Built-ins are entry points written here;
plugins are the ``amid.sinks`` entry-point group of the installed distributions. Both load
through :meth:`EntryPoint.load`, so a built-in and a plugin cannot differ in how their factory
and ``Options`` are found.

Built-ins load lazily, on first use: a sink module imports its client library (aiohttp, ...),
and one whose library is missing makes only that type unavailable, named with the reason, never
the rest of the configuration. Plugins load when discovered, so a broken plugin is reported at
start even if no sink uses it.

Adding a built-in sink type is one line in :data:`BUILTIN_SINKS` (its module has ``create`` and
``Options``, like ``amid.sinks.file``).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from amid.sinks.base import ENTRY_POINT_GROUP, SinkFactory

__all__ = ["BUILTIN_SINKS", "PluginLoadError", "SinkType", "SinkTypeUnavailable", "SinkTypes"]

# type name -> "module:factory". One line per built-in sink type.
BUILTIN_SINKS: dict[str, str] = {
    "file": "amid.sinks.file:create",
    "syslog": "amid.sinks.syslog:create",
    "webhook": "amid.sinks.webhook:create",
    "amqp": "amid.sinks.amqp:create",
    "nats": "amid.sinks.nats:create",
}


class PluginLoadError(Exception):
    """A plugin could not be loaded or was ignored; the message names it and why. ``type_name``
    is the sink type it would have provided (None when a built-in keeps the name)."""

    def __init__(self, message: str, type_name: str | None = None) -> None:
        super().__init__(message)
        self.type_name = type_name


class SinkTypeUnavailable(Exception):
    """A sink type exists but cannot be used; the message says why (its import failed)."""


@dataclass(frozen=True)
class SinkType:
    """A loaded sink type: its factory and the model of its own config keys (None: a dict)."""

    name: str
    factory: SinkFactory
    options: Any  # type[pydantic.BaseModel] | None


def load_sink_type(ep: EntryPoint, *, plugin: bool) -> SinkType:
    """Import ``ep`` and check it is a sink type; raise :class:`SinkTypeUnavailable` saying why."""
    what = f"sink plugin {ep.name!r} ({ep.value})" if plugin else f"sink type {ep.name!r} ({ep.value})"
    try:
        factory = ep.load()
    except Exception as exc:  # any import-time failure of the sink's module or its libraries
        raise SinkTypeUnavailable(f"{what} failed to load: {type(exc).__name__}: {exc}") from None
    if not callable(factory):
        raise SinkTypeUnavailable(f"{what} is not callable")
    return SinkType(ep.name, factory, _options_model(factory))


def _options_model(factory: Any) -> Any:
    """The factory's ``Options``, else its module's (None: the sink's keys stay a dict)."""
    model = getattr(factory, "Options", None)
    if model is None:
        module = sys.modules.get(getattr(factory, "__module__", None) or "")
        model = getattr(module, "Options", None)
    return model


class SinkTypes:
    """The sink types one daemon (or one ``check-config``) uses: built-ins plus plugins.

    ``errors`` lists the plugins that failed to load or were ignored (each logged at start; a
    sink using a failed plugin's type is refused by the config with that reason).
    :attr:`option_models` is what :func:`amid.config.load` validates the sinks' own keys with.
    ``plugins`` given to the constructor are loaded types (or why they are unavailable) and take
    precedence over a built-in of the same name: how a test injects a factory.
    """

    def __init__(self, builtins: Mapping[str, str] = BUILTIN_SINKS,
                 plugins: Mapping[str, SinkType | SinkTypeUnavailable] | None = None,
                 errors: list[PluginLoadError] | None = None) -> None:
        self._entries: dict[str, EntryPoint] = {
            name: EntryPoint(name, value, ENTRY_POINT_GROUP) for name, value in builtins.items()}
        self._loaded: dict[str, SinkType | SinkTypeUnavailable] = dict(plugins or {})
        self.errors: list[PluginLoadError] = list(errors or [])

    @classmethod
    def discover(cls) -> SinkTypes:
        """The built-ins and every installed ``amid.sinks`` plugin (loaded now)."""
        plugins: dict[str, SinkType | SinkTypeUnavailable] = {}
        errors: list[PluginLoadError] = []
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in BUILTIN_SINKS:
                errors.append(PluginLoadError(
                    f"sink plugin {ep.name!r} ignored: a built-in sink type has that name"))
                continue
            try:
                plugins[ep.name] = load_sink_type(ep, plugin=True)
            except SinkTypeUnavailable as exc:
                plugins[ep.name] = exc
                errors.append(PluginLoadError(str(exc), ep.name))
        return cls(plugins=plugins, errors=errors)

    @classmethod
    def builtin(cls) -> SinkTypes:
        """The built-in sink types only (no plugin discovery)."""
        return cls()

    def names(self) -> list[str]:
        return sorted({*self._entries, *self._loaded})

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._loaded

    def get(self, name: str) -> SinkType:
        """The loaded sink type ``name``; KeyError if unknown, SinkTypeUnavailable if it cannot load."""
        loaded = self._loaded.get(name)
        if loaded is None:
            try:
                loaded = load_sink_type(self._entries[name], plugin=False)
            except SinkTypeUnavailable as exc:
                loaded = exc
            self._loaded[name] = loaded
        if isinstance(loaded, SinkTypeUnavailable):
            raise SinkTypeUnavailable(str(loaded))  # a new one each time: no stale traceback
        return loaded

    def factory(self, name: str) -> SinkFactory:
        return self.get(name).factory

    @property
    def option_models(self) -> Mapping[str, Any]:
        """type name -> options model (or None), loading a type only when it is looked up."""
        return _OptionModels(self)


class _OptionModels(Mapping[str, Any]):
    """The read-only view :func:`amid.config.load` takes: ``in`` and iteration never import a
    sink module; a lookup imports the one type asked for (and raises SinkTypeUnavailable)."""

    def __init__(self, types: SinkTypes) -> None:
        self._types = types

    def __getitem__(self, name: str) -> Any:
        if name not in self._types:
            raise KeyError(name)
        return self._types.get(name).options

    def __contains__(self, name: object) -> bool:
        return name in self._types

    def __iter__(self) -> Iterator[str]:
        return iter(self._types.names())

    def __len__(self) -> int:
        return len(self._types.names())
