"""What the two message-broker sinks (``amqp``, ``nats``) share, written once.

* :class:`TopicNames`: a record's routing key or subject from a template such as
  ``ami.{server}.{event}``, each value made safe to be one word of a dotted topic name.
* :class:`ConfirmedIds`: the ids the broker already confirmed while a batch failed part-way, so
  the runner's retry of that batch re-publishes only what was not confirmed.
* TLS contexts, a check that the client library is installed, and redaction of credentials.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import ssl
import string
from collections.abc import Iterable
from urllib.parse import urlsplit, urlunsplit

from pydantic_core import PydanticCustomError

from amid.records import Record

__all__ = ["ConfirmedIds", "TopicNames", "check_template", "invalid",
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
