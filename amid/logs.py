"""Logging setup: readable text on stderr, JSON lines on stdout, or native journald fields.

Log calls carry structure through ``extra``::

    log.warning("delivery failed, retrying", extra={"server": "pbx1", "sink": "webhook"})

- ``text``: one line per record, the extras appended as ``server=pbx1 sink=webhook``. When stderr is the journal
  (systemd sets ``$JOURNAL_STREAM``), the line starts with a ``<N>`` priority prefix instead of a timestamp, so
  journald keeps the level.
- ``json``: one JSON object per line with ``ts``, ``level``, ``logger``, ``message``, the extras, and ``exc`` when
  an exception is attached (the container default).
- ``journal``: ``systemd.journal.JournalHandler`` (the ``asterisk-amid[systemd]`` extra) with
  ``PRIORITY`` and the extras as upper-case fields (``SERVER``, ``SINK``). Without systemd-python or a
  running journald, text on stderr.

Every handler installed here redacts the values of AMI ``Secret:`` and ``Key:`` fields from messages and
tracebacks, so a secret cannot leak through a debug dump of raw AMI traffic.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

# The one rate-limited log of amid lives in amid.ami; re-exported here.
from amid.ami.ratelog import RateLimitedLog

__all__ = [
    "JsonFormatter",
    "RateLimitedLog",
    "SecretRedactingFilter",
    "TextFormatter",
    "build_journal_handler",
    "redact_secrets",
    "setup_logging",
]

LogFormat = Literal["text", "json", "journal"]

#: Where journald listens for native messages; libsystemd has it compiled in.
JOURNAL_SOCKET = "/run/systemd/journal/socket"

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_RECORD_ATTRIBUTES = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}

# Marks the handlers this module installed so that reconfiguring replaces them and leaves others alone.
_OWNED_MARK = "_amid_logs_handler"


def record_extras(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a log call passed with ``extra=``, in the order given."""
    return {key: value for key, value in record.__dict__.items() if key not in _RECORD_ATTRIBUTES}


# ---------------------------------------------------------------------------------------------------- redaction

# An AMI "Secret:" or "Key:" header as it appears in a message: a raw line ("Secret: x\r\n"), a line inside the
# repr of bytes ("...\\r\\nSecret: x\\r\\n"), or the repr of a dict or (key, value) pair ("'Secret': 'x'").
# Not part of a longer name, so that "servers[0].secret: field required" or "ami-secret:" stay readable.
_SECRET_FIELD = re.compile(
    r"""(?imx)
    (
        (?:(?<![\w.\[\]-])|(?<=\\n)) (?:secret|key) [ \t]* : [ \t]*   # header, raw or escaped
      | (['"]) (?:secret|key) \2 \s* [:,] \s* b?['"]?           # repr of a mapping or a pair
    )
    [^\r\n\\'"]+                                       # the value, up to line end, escape or quote
    """
)
_REDACTED = "***"


def redact_secrets(text: str) -> str:
    """``text`` with the values of ``Secret:`` and ``Key:`` fields replaced by ``***``."""
    return _SECRET_FIELD.sub(lambda match: match.group(1) + _REDACTED, text)


class SecretRedactingFilter(logging.Filter):
    """Rewrites a record's message and traceback so no AMI secret or login key reaches a log (defence in depth)."""

    _exception_formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            return True
        redacted = redact_secrets(message)
        if redacted != message:
            record.msg = redacted
            record.args = None
        if record.exc_info and not record.exc_text:
            # Formatters reuse exc_text when it is set, so redacting it here covers every handler.
            record.exc_text = self._exception_formatter.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_secrets(record.exc_text)
        return True


# ---------------------------------------------------------------------------------------------------- formatters


def _iso_timestamp(created: float) -> str:
    """RFC 3339 UTC with milliseconds, e.g. ``2024-05-01T12:00:00.123Z``."""
    return datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _logfmt_value(value: Any) -> str:
    text = str(value)
    if text == "" or any(char in text for char in ' "=\n\t'):
        return json.dumps(text, ensure_ascii=False)
    return text


# syslog(3) priorities for the "<N>" prefix journald reads from a service's stderr (sd-daemon(3)).
def _syslog_priority(levelno: int) -> int:
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


class TextFormatter(logging.Formatter):
    """``2024-05-01T12:00:00.123Z WARNING amid.sinks: message server=pbx1 sink=webhook`` plus any traceback.

    With ``journal_prefix`` the timestamp (journald adds its own) is replaced by a ``<N>`` priority prefix.
    """

    def __init__(self, *, journal_prefix: bool = False) -> None:
        super().__init__()
        self.journal_prefix = journal_prefix

    def format(self, record: logging.LogRecord) -> str:
        line = f"{record.levelname} {record.name}: {record.getMessage()}"
        extras = record_extras(record)
        if extras:
            line += " " + " ".join(f"{key}={_logfmt_value(value)}" for key, value in extras.items())
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line += "\n" + record.exc_text
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        if self.journal_prefix:
            # journald splits on newlines; a traceback's lines keep the record's priority only with a prefix each.
            prefix = f"<{_syslog_priority(record.levelno)}>"
            return "\n".join(prefix + part for part in line.split("\n"))
        return f"{_iso_timestamp(record.created)} {line}"


class JsonFormatter(logging.Formatter):
    """One compact JSON object per record: ``ts``, ``level``, ``logger``, ``message``, the extras, ``exc``.

    The four core keys win over an extra of the same name. Values JSON cannot encode are written with ``str()``.
    """

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "ts": _iso_timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record_extras(record).items():
            document.setdefault(key, value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            document["exc"] = record.exc_text
        if record.stack_info:
            document["stack"] = self.formatStack(record.stack_info)
        return json.dumps(document, ensure_ascii=False, separators=(",", ":"), default=str)


# ---------------------------------------------------------------------------------------------------- journald

# journald accepts field names of upper-case letters, digits and underscores, not starting with an underscore
# (those are trusted fields journald sets itself).
_JOURNAL_FIELD_NAME = re.compile(r"[A-Z0-9][A-Z0-9_]*")
# JournalHandler adds these; args may hold a secret (CODE_ARGS) and EXCEPTION_INFO is a repr of a tuple.
_JOURNAL_FIELDS_DROPPED = frozenset({"CODE_ARGS", "EXCEPTION_INFO"})


def _journal_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """JournalHandler's keyword arguments turned into valid journal fields.

    JournalHandler passes every attribute of the record; keep its own upper-case fields, turn the ``extra=``
    fields (``server``, ``sink``...) into upper-case ones, and drop the rest of the record's internals.
    """
    result: dict[str, Any] = {}
    for key, value in fields.items():
        if value is None or key in _JOURNAL_FIELDS_DROPPED:
            continue
        if key in _RECORD_ATTRIBUTES:
            continue
        name = key.upper()
        if _JOURNAL_FIELD_NAME.fullmatch(name) and name not in result:
            result[name] = value
    return result


def build_journal_handler(sender: Callable[..., Any] | None = None) -> logging.Handler:
    """A ``JournalHandler`` sending ``MESSAGE``, ``PRIORITY``, ``SYSLOG_IDENTIFIER=amid`` and the extras as fields.

    ``sender`` receives ``(MESSAGE, **fields)`` after the fields are cleaned; it defaults to
    ``systemd.journal.send``. Raises ImportError when systemd-python is not installed.
    """
    from systemd import journal  # optional extra asterisk-amid[systemd]

    deliver = journal.send if sender is None else sender

    def send_clean_fields(MESSAGE: str, **fields: Any) -> Any:
        return deliver(MESSAGE, **_journal_fields(fields))

    handler = journal.JournalHandler(sender_function=send_clean_fields, SYSLOG_IDENTIFIER="amid")
    handler.setFormatter(logging.Formatter("%(message)s"))
    return handler


def _stream_is_journal(stream: TextIO, environ: Mapping[str, str]) -> bool:
    """True when ``stream`` is the journal stream systemd connected to the service (``$JOURNAL_STREAM``)."""
    device_inode = environ.get("JOURNAL_STREAM", "")
    device, _, inode = device_inode.partition(":")
    if not device.isdigit() or not inode.isdigit():
        return False
    try:
        status = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return False  # not a real file (e.g. io.StringIO in tests)
    return status.st_dev == int(device) and status.st_ino == int(inode)


# ---------------------------------------------------------------------------------------------------- setup


def _parse_level(level: str | int) -> int:
    if isinstance(level, int):
        return level
    text = level.strip()
    if text.isdigit():
        return int(text)
    value = logging.getLevelNamesMapping().get(text.upper())
    if value is None:
        raise ValueError(f"unknown log level {level!r}; use debug, info, warning, error or critical")
    return value


def _build_handler(
    format: LogFormat,
    text_stream: TextIO,
    json_stream: TextIO,
    environ: Mapping[str, str],
    journal_handler: Callable[[], logging.Handler],
    journal_socket: str,
) -> tuple[logging.Handler, str | None]:
    """The handler for ``format``, and why text was used instead of the journal (None if it was not)."""
    if format == "json":
        handler = logging.StreamHandler(json_stream)
        handler.setFormatter(JsonFormatter())
        return handler, None
    fallback_reason = None
    if format == "journal":
        try:
            handler_for_journal = journal_handler()
        except ImportError:
            fallback_reason = "systemd-python is not installed (pip install 'asterisk-amid[systemd]')"
        else:
            # libsystemd would fail every send (and logging print a traceback per record) without journald.
            if os.path.exists(journal_socket):
                return handler_for_journal, None
            fallback_reason = f"journald is not running ({journal_socket} is missing)"
    handler = logging.StreamHandler(text_stream)
    handler.setFormatter(TextFormatter(journal_prefix=_stream_is_journal(text_stream, environ)))
    return handler, fallback_reason


def set_log_level(level: str | int) -> None:
    """Set the level of amid's logging (at start, and when a reload changes ``log.level``)."""
    numeric_level = _parse_level(level)
    logging.getLogger().setLevel(numeric_level)
    # aiohttp logs every request at INFO; a Prometheus scrape every 15 s would drown the daemon's own lines.
    logging.getLogger("aiohttp.access").setLevel(max(numeric_level, logging.WARNING))


def setup_logging(
    format: LogFormat,
    level: str | int = "info",
    *,
    stream_text: TextIO | None = None,
    stream_json: TextIO | None = None,
    environ: Mapping[str, str] | None = None,
    journal_handler: Callable[[], logging.Handler] = build_journal_handler,
    journal_socket: str = JOURNAL_SOCKET,
) -> logging.Handler:
    """Configure the root logger for ``format`` at ``level`` and return the handler installed.

    Idempotent: calling it again replaces the handler it installed before and leaves other handlers (pytest's,
    an embedding application's) alone. ``stream_text`` defaults to the current ``sys.stderr``, ``stream_json``
    to the current ``sys.stdout``; ``environ`` (default ``os.environ``) is read for ``$JOURNAL_STREAM``.
    ``journal_handler`` builds the journal handler (raises ImportError without systemd-python) and
    ``journal_socket`` is where journald listens; the journal is used only if both are there.
    Raises ValueError for an unknown format or level.
    """
    if format not in ("text", "json", "journal"):
        raise ValueError(f"unknown log format {format!r}; use text, json or journal")
    numeric_level = _parse_level(level)
    environ = os.environ if environ is None else environ
    text_stream = sys.stderr if stream_text is None else stream_text
    json_stream = sys.stdout if stream_json is None else stream_json

    handler, fallback_reason = _build_handler(format, text_stream, json_stream, environ, journal_handler,
                                              journal_socket)
    handler.addFilter(SecretRedactingFilter())
    setattr(handler, _OWNED_MARK, True)

    root = logging.getLogger()
    for previous in [h for h in root.handlers if getattr(h, _OWNED_MARK, False)]:
        root.removeHandler(previous)
        previous.close()  # a StreamHandler never closes the stream it was given
    root.addHandler(handler)
    set_log_level(numeric_level)

    if fallback_reason is not None:
        logging.getLogger(__name__).warning("journal logging unavailable: %s; logging text to stderr", fallback_reason)
    return handler
