"""What the two message-broker sinks (``amqp``, ``nats``) share, written once.

* :class:`TopicNames`: a record's routing key or subject from a template such as
  ``ami.{server}.{event}``, each value made safe to be one word of a dotted topic name.
* :class:`ConfirmedIds`: the ids the broker already confirmed while a batch failed part-way, so
  the runner's retry of that batch re-publishes only what was not confirmed.
* :class:`BrokerSink`: the life of a broker sink (open, send what is not yet confirmed, close),
  around what each broker's client does its own way (connect, publish a batch, read the answers).
* TLS contexts, a check that the client library is installed, and redaction of credentials.
"""

from __future__ import annotations

import abc
import asyncio
import enum
import importlib.util
import logging
import re
import ssl
import string
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pydantic_core import PydanticCustomError

from amid.records import Record
from amid.sinks.base import SinkError

__all__ = ["BrokerSink", "BrokerState", "ConfirmedIds", "TopicNames", "check_template", "invalid",
           "missing_library", "redact", "redact_url", "tls_context"]

log = logging.getLogger("amid.sinks.broker")

TEMPLATE_FIELDS = ("server", "event")
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")
_NAME_CACHE_LIMIT = 4096  # (server, event) pairs: a few per PBX in practice; bounded all the same


def invalid(message: str, *, field: str | None = None) -> PydanticCustomError:
    """A validation error with a plain message; ``field`` names the key to blame from a model
    check (the config loader's ``amid_field`` convention: the error points at that YAML line)."""
    if field is None:
        return PydanticCustomError("broker_option", "{message}", {"message": message})
    return PydanticCustomError("amid_field", "{message}", {"message": message, "field": field})


def missing_library(module: str, extra: str, sink_type: str) -> str | None:
    """Why the ``sink_type`` sink cannot run here (its client library is not installed), or None."""
    if importlib.util.find_spec(module) is not None:
        return None
    return (f"the {sink_type} sink needs the Python package of the '{extra}' extra, which is not "
            f"installed: install amid as 'asterisk-amid[{extra}]' (with pip)")


def check_template(template: str) -> str:
    """Validate a routing key / subject template; raises ValueError naming the problem."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"bad template {template!r}: {exc}") from None
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        if name not in TEMPLATE_FIELDS:
            raise ValueError(f"unknown placeholder {{{name}}} in {template!r} "
                             f"(known: {', '.join('{' + f + '}' for f in TEMPLATE_FIELDS)})")
        if spec or conversion:
            raise ValueError(f"placeholder {{{name}}} in {template!r} takes no format spec")
    if not template:
        raise ValueError("the template is empty")
    return template


def safe_word(value: str) -> str:
    """``value`` as one word of a dotted name: anything but letters, digits, ``_`` and ``-``
    (the separator ``.``, wildcards ``*`` ``#`` ``>``, spaces) becomes ``_``; empty is ``_``."""
    return _UNSAFE.sub("_", value) or "_"


class TopicNames:
    """Renders a template per record, caching the name per (server, event)."""

    def __init__(self, template: str, *, max_bytes: int) -> None:
        self._template = check_template(template)
        self._max_bytes = max_bytes
        self._cache: dict[tuple[str, str], str] = {}

    def of(self, record: Record) -> str:
        key = (record.server, record.name)
        name = self._cache.get(key)
        if name is None:
            name = self._template.format(server=safe_word(record.server),
                                         event=safe_word(record.name))
            if len(name.encode()) > self._max_bytes:  # the protocol's limit; names are ASCII
                name = name.encode()[:self._max_bytes].decode("ascii", "ignore")
            if len(self._cache) >= _NAME_CACHE_LIMIT:
                self._cache.clear()
            self._cache[key] = name
        return name


class ConfirmedIds:
    """Record ids the broker confirmed during send attempts that failed as a whole.

    The runner retries a failed batch as a whole; what the broker already confirmed need not be
    published again (it would only add duplicates). Emptied when a send succeeds; bounded so a
    sink failing for a long time with ever new records cannot grow it without end.
    """

    LIMIT = 200_000

    def __init__(self) -> None:
        self._ids: set[str] = set()

    def __len__(self) -> int:
        return len(self._ids)

    def pending(self, batch: Iterable[Record]) -> list[Record]:
        """The records of ``batch`` not confirmed yet, in order."""
        if not self._ids:
            return list(batch)
        ids = self._ids
        return [record for record in batch if record.id not in ids]

    def add(self, ids: Iterable[str]) -> None:
        if len(self._ids) > self.LIMIT:
            self._ids.clear()  # only costs duplicates, which consumers must tolerate anyway
        self._ids.update(ids)

    def clear(self) -> None:
        self._ids.clear()


def tls_context(*, verify: bool, ca_file: str | None, cert_file: str | None,
                key_file: str | None) -> ssl.SSLContext:
    """A client TLS context (reads files: call it off the event loop)."""
    # With ca_file only that CA is trusted (not the system store): pinning a private CA.
    context = ssl.create_default_context(cafile=ca_file)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if cert_file is not None:
        context.load_cert_chain(cert_file, key_file)
    return context


def redact_url(url: str) -> str:
    """Only the scheme, host and port of ``url``: safe to log (user info and query may be
    credentials)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "<url>"
    if ":" in host:
        host = f"[{host}]"
    return urlunsplit((parts.scheme, host if port is None else f"{host}:{port}", "", "", ""))


_URL_IN_TEXT = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>]+")


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with every url cut to scheme, host and port and every secret replaced."""
    text = _URL_IN_TEXT.sub(lambda match: redact_url(match.group()), text)
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


class BrokerState(enum.Enum):
    NEW = "new"
    OPEN = "open"
    CLOSED = "closed"


class BrokerSink(abc.ABC):
    """What the amqp and nats sinks do alike.

    ``send`` publishes only the records of a batch the broker has not confirmed yet (a retry of
    a batch that failed part-way), reconnecting first if the connection was lost; subclasses
    say how to connect (:meth:`_connect`), whether the connection is up (:meth:`_connected`),
    how to let go of it (:meth:`_take_connection`), how to publish and wait (:meth:`_publish_all`)
    and what the answers mean (:meth:`_settle`). ``outcomes`` counts what the broker answered
    besides a plain confirm (:class:`~amid.sinks.base.ReportsCounters`).
    """

    kind: str  # "amqp", "nats": the sink type, in messages
    outcome_names: tuple[str, ...] = ()

    def __init__(self, name: str, connect_timeout: float, secrets: list[str]) -> None:
        self.name = name
        self._connect_timeout = connect_timeout
        self._secrets = [s for s in secrets if s]
        self._confirmed = ConfirmedIds()
        self._refused_streak = 0
        self.outcomes: Counter[str] = Counter(dict.fromkeys(self.outcome_names, 0))
        self._state = BrokerState.NEW

    async def start(self) -> None:
        """Prepare (TLS files, credentials) and connect."""
        if self._state is BrokerState.OPEN:
            return
        if self._state is BrokerState.CLOSED:
            raise SinkError(f"{self.kind} {self.name} is closed")
        await self._prepare()
        await self._connect()
        self._state = BrokerState.OPEN

    async def send(self, batch: Sequence[Record]) -> None:
        """Publish ``batch``; return once the broker confirmed every record, else raise."""
        if not batch:
            return
        if self._state is not BrokerState.OPEN:
            raise SinkError(f"{self.kind} {self.name} is {self._state.value}, not open")
        if not self._connected():
            await self._drop_connection()
            await self._connect()  # raises SinkError; the runner backs off and retries
        todo = self._confirmed.pending(batch)
        if not todo:
            self._confirmed.clear()
            return
        answers = await self._publish_all(todo)
        self._settle(todo, answers)

    def sink_counters(self) -> dict[str, int]:
        """:class:`~amid.sinks.base.ReportsCounters`: what the broker answered besides a plain
        confirm, exported as ``amid_sink_operations_total``."""
        return dict(self.outcomes)

    async def close(self) -> None:
        """Close the connection. Idempotent; safe before start."""
        self._state = BrokerState.CLOSED
        await self._drop_connection()

    async def _drop_connection(self) -> None:
        connection = self._take_connection()
        if connection is not None:
            await self._close_quietly(connection)

    async def _close_quietly(self, connection: Any) -> None:
        try:
            async with asyncio.timeout(self._connect_timeout):
                await connection.close()
        except Exception as exc:
            log.debug("%s sink %s: close: %s", self.kind, self.name, self._describe(exc),
                      extra={"sink": self.name})

    def _describe(self, exc: BaseException) -> str:
        text = str(exc) or getattr(exc, "description", None) or ""
        return redact(f"{type(exc).__name__}: {text}".rstrip(": "), self._secrets)

    @abc.abstractmethod
    async def _prepare(self) -> None:
        """Before the first connection: load files (TLS, credentials) off the loop."""

    @abc.abstractmethod
    async def _connect(self) -> None: ...

    @abc.abstractmethod
    def _connected(self) -> bool: ...

    @abc.abstractmethod
    def _take_connection(self) -> Any:
        """The connection (None if there is none), forgotten by the sink from now on."""

    @abc.abstractmethod
    async def _publish_all(self, records: list[Record]) -> list[Any]: ...

    @abc.abstractmethod
    def _settle(self, records: list[Record], answers: list[Any]) -> None: ...
