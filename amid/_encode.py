"""Building and encoding the record JSON (see amid.records for the shape).

This is the daemon's hot path (event -> JSON bytes), kept in one place that benchmarks target.

Fast path: most AMI messages are plain ``Key: Value`` lines of UTF-8 without backslashes or
control characters (quotes get a backslash), with no repeated key and exactly one ``": "`` per
line. For those, the JSON object of the fields is the message bytes with ``\\r\\n`` turned
into ``","`` and ``": "`` into ``":"``: a handful of C-level byte operations instead of a
Python loop over the fields.
Everything else (escaping needed, repeated keys, odd lines, invalid UTF-8) takes the general
path through a dict and ``pydantic_core.to_json``. Both produce the same JSON (tested).

``amid._speedups`` (optional C, built by ``pip install`` when a compiler is there) builds the
whole record in one pass for ASCII messages without escapes other than quotes, repeated keys
(arrays) and ``": "`` inside values included; it hands anything else back to the Python code
here, and gives the same bytes as the general path, so the output never depends on it (tested).
"""

from __future__ import annotations

import base64
import time
from typing import Any

from pydantic_core import PydanticSerializationError, from_json, to_json

from amid.ami.protocol import Event, recover_bytes

from amid._accel import speedups

# The C accelerator, when in use (see amid._accel); else the pure-Python path below.
_fields_json_c = speedups.fields_json if speedups is not None else None
_record_json_c = speedups.record_json if speedups is not None else None

# Every byte that may stand in a JSON string as it is: not a control character (CR and LF are
# the line separators and are checked by counting), not '"', not '\\', not DEL.
_SAFE_BYTES = bytes(b for b in range(256) if not (b < 0x20 or b in b'"\\\x7f')) + b"\r\n"
_SAFE_BYTES_NO_CRLF = _SAFE_BYTES[:-2]


_last_second: tuple[int, str] = (-1, "")


def format_iso(ts: float) -> str:
    """Unix seconds -> ``2026-11-28T03:21:41.214512Z`` (UTC, microseconds)."""
    global _last_second
    whole = int(ts)
    micros = int(round((ts - whole) * 1_000_000))
    if micros == 1_000_000:
        whole, micros = whole + 1, 0
    # Every read gets its own receive time, but the seconds part changes once a second: it is
    # kept (one tuple, replaced whole, so threads never see half of it).
    last = _last_second
    if last[0] != whole:
        last = _last_second = (whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)))
    return f"{last[1]}.{micros:06d}Z"


class _IsoCache:
    """format_iso with a memory of the last value: all events of one read share their receive
    time, so most calls are a comparison. The memory is one tuple, replaced whole."""

    __slots__ = ("last",)

    def __init__(self) -> None:
        self.last: tuple[float | None, str, bytes] = (None, "", b"")

    def __call__(self, ts: float) -> str:
        last = self.last
        if ts != last[0]:
            text = format_iso(ts)
            last = self.last = (ts, text, text.encode())
        return last[1]

    def bytes(self, ts: float) -> bytes:
        last = self.last
        if ts != last[0]:
            self(ts)
            last = self.last
        return last[2]


_iso = _IsoCache()
_iso_bytes = _iso.bytes
format_iso_cached = _iso  # for other hot paths (syslog headers)


def fields_json_fast(raw: bytes) -> bytes | None:
    """The JSON object of a message's fields, or None when the general path is needed: the
    C accelerator's answer when it has one, else :func:`fields_json_fast_py`'s."""
    if _fields_json_c is not None:
        body = _fields_json_c(raw)
        if body is not None:
            return body or None  # False: the Python fast path would refuse it too
    return fields_json_fast_py(raw)


def fields_json_fast_py(raw: bytes) -> bytes | None:
    """The JSON object of a message's fields, or None when the general path is needed.

    With no byte that JSON must escape but quotes (given a backslash each), turning ``\r\n``
    into ``","`` and ``": "`` into
    ``":"`` yields valid JSON exactly when every line holds exactly one ``": "`` (keys and
    values must alternate). The Rust JSON parser checks that, and UTF-8, in one call; its
    dict then shows a repeated key (fewer entries than lines) or a colon inside a key (where
    the general rule would cut the key at the first colon): both take the general path.
    """
    unsafe = raw.translate(None, _SAFE_BYTES)
    if unsafe:
        # Quotes alone (CallerID: "Alice" <100>) only need a backslash each.
        if unsafe.strip(b'"'):
            return None
        raw = raw.replace(b'"', b'\\"')
    body = b'{"' + raw.replace(b"\r\n", b'","').replace(b": ", b'":"') + b'"}'
    try:
        keys = from_json(body)
    except ValueError:
        return None
    if len(keys) != raw.count(b"\n") + 1:
        return None
    # A colon in a key: only possible when some colon is not one of the separators.
    if raw.count(b":") != len(keys) and ":" in "".join(keys):
        return None
    return body


_RECORD = (b'{"id":"%s","server":"%s","epoch":%d,"seq":%d,"received_at":"%s","event":"%s",'
           b'"fields":%s}')


_MISSING = object()
_plain_text: dict[str, bytes | None] = {}


def _plain_bytes(text: Any) -> bytes | None:
    """``text`` as UTF-8 when it may stand in a JSON string unescaped, else None. Cached: the
    texts asked about (server names, the run id, event names) repeat on every event."""
    known = _plain_text.get(text, _MISSING) if type(text) is str else None
    if known is not _MISSING:
        return known  # type: ignore[return-value]
    try:
        plain: bytes | None = text.encode()
    except UnicodeEncodeError:  # a lone surrogate
        plain = None
    if plain is not None and plain.translate(None, _SAFE_BYTES_NO_CRLF):
        plain = None
    if len(_plain_text) < 4096:  # event names come from the wire: bound the cache
        _plain_text[text] = plain
    return plain


class _RecordParts:
    """One connection's record JSON with the per-event parts left out, for both builders:
    ``head`` (``{"id":"server:run:epoch:``) and ``mid`` (``","server":…,"seq":``) for the C
    one, and the same as a ``%`` template for Python."""

    __slots__ = ("head", "mid", "template")

    def __init__(self, server: bytes, run: bytes, epoch: int) -> None:
        self.head = b'{"id":"%s:%s:%d:' % (server, run, epoch)
        self.mid = b'","server":"%s","epoch":%d,"seq":' % (server, epoch)
        self.template = (self.head.replace(b"%", b"%%") + b"%d" + self.mid.replace(b"%", b"%%")
                         + b'%d,"received_at":"%s","event":"%s","fields":%s}')


_parts_cache: dict[tuple[str, str, int], _RecordParts | None] = {}


def _record_parts(server: str, run: str, epoch: int) -> _RecordParts | None:
    """The parts of one connection's records; None when the server name or the run id needs
    JSON escaping (the general path then). Cached: they change only on reconnect."""
    key = (server, run, epoch)
    parts = _parts_cache.get(key, _MISSING)
    if parts is _MISSING:
        server_b, run_b = _plain_bytes(server), _plain_bytes(run)
        parts = None if server_b is None or run_b is None else _RecordParts(server_b, run_b, epoch)
        if len(_parts_cache) >= 64:  # one entry per (server, epoch) seen: keep only recent ones
            _parts_cache.clear()
        _parts_cache[key] = parts
    return parts  # type: ignore[return-value]


def record_head_mid(server: str, run: str, epoch: int) -> tuple[bytes, bytes] | None:
    """A connection's ``head`` and ``mid`` parts (see :class:`_RecordParts`), or None when
    its records take the general path: what the C ``records_json`` asks per connection."""
    parts = _record_parts(server, run, epoch)
    return None if parts is None else (parts.head, parts.mid)


receive_time_bytes = _iso_bytes  # the ISO bytes of a receive time, cached per value


def record_json(event: Event, run: str) -> bytes:
    """The record JSON of a wire event whose id is ``server:run:epoch:seq``: the same bytes as
    ``event_json(event, id)``, without building the id string (the daemon's hot path)."""
    epoch, seq = event.epoch, event.seq
    if type(epoch) is int and type(seq) is int:
        parts = _record_parts(event.server, run, epoch)
        name = _plain_bytes(event.name)
        if parts is not None and name is not None:
            received = _iso_bytes(event.received_at)
            if _record_json_c is not None:
                built = _record_json_c(parts.head, parts.mid, seq, received, name, event.raw)
                if built:
                    return built
                fields = None if built is False else fields_json_fast_py(event.raw)
            else:
                fields = fields_json_fast_py(event.raw)
            if fields is not None:
                return parts.template % (seq, seq, received, name, fields)
    return encode_record(record_dict(event, f"{event.server}:{run}:{epoch}:{seq}"))


def event_json(event: Event, record_id: str) -> bytes:
    """The record JSON of an event (fast path when the message allows it)."""
    fields = fields_json_fast(event.raw)
    if fields is not None and type(event.epoch) is int and type(event.seq) is int:
        # The id, the server name and the event name (normally the first field's value) may
        # have been set by a library user to anything (quotes, line breaks, lone surrogates):
        # those take the general path.
        texts = (record_id, event.server, event.name)
        try:
            # (not str: a library user's value; the general path shows it as JSON has it)
            outside = "".join(texts).encode() if all(type(t) is str for t in texts) else b"\n"
        except UnicodeEncodeError:
            outside = b"\n"
        if not outside.translate(None, _SAFE_BYTES_NO_CRLF):
            return _RECORD % (record_id.encode(), event.server.encode(), event.epoch, event.seq,
                              _iso_bytes(event.received_at), event.name.encode(), fields)
    return encode_record(record_dict(event, record_id))


def record_dict(event: Event, record_id: str) -> dict[str, Any]:
    return {"id": record_id, "server": event.server, "epoch": event.epoch, "seq": event.seq,
            "received_at": _iso(event.received_at), "event": event.name,
            "fields": event.to_dict()}


def encode_record(data: dict[str, Any]) -> bytes:
    """Compact JSON bytes. Values holding undecodable bytes (kept as surrogate escapes) are
    shown with U+FFFD and their exact bytes are added under ``fields_b64``."""
    try:
        return to_json(data)
    except PydanticSerializationError:
        return to_json(_clean_invalid_utf8(data))


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def _bytes_of(text: str) -> bytes:
    """The bytes a string stands for: exact for what the parser decoded (undecodable bytes
    kept as surrogate escapes); a lone surrogate set by other code becomes replaceable bytes
    instead of an exception."""
    try:
        return recover_bytes(text)
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


def _replace(text: str) -> str:
    return _bytes_of(text).decode("utf-8", "replace")


def _shown_keys(keys: list[str]) -> dict[str, str]:
    """How each key is shown. A key holding undecodable bytes is shown with each such byte as
    ``\\xNN`` (unlike U+FFFD, two keys that differ only in those bytes stay two keys); in the
    rare case that this equals another key of the message, ``#2``, ``#3``… is appended, so
    every key keeps its own entry, its values in order and its ``fields_b64`` beside it."""
    taken = {key for key in keys if not _has_surrogates(key)}
    shown: dict[str, str] = {}
    for key in keys:
        if key in taken and key not in shown:
            shown[key] = key
            continue
        base = _bytes_of(key).decode("utf-8", "backslashreplace")
        candidate, n = base, 2
        while candidate in taken:
            candidate, n = f"{base}#{n}", n + 1
        taken.add(candidate)
        shown[key] = candidate
    return shown


def _clean_invalid_utf8(data: dict[str, Any]) -> dict[str, Any]:
    fields = data.get("fields", {})
    shown_keys = _shown_keys(list(fields))
    clean: dict[str, Any] = {}
    raw: dict[str, Any] = {}
    for key, value in fields.items():
        values = value if isinstance(value, list) else [value]
        shown = shown_keys[key]
        if shown != key or any(_has_surrogates(v) for v in values):
            raw[shown] = ([base64.b64encode(_bytes_of(v)).decode() for v in values]
                          if isinstance(value, list) else base64.b64encode(_bytes_of(value)).decode())
            value = [_replace(v) for v in values] if isinstance(value, list) else _replace(value)
        clean[shown] = value
    out = {k: (_replace(v) if isinstance(v, str) and _has_surrogates(v) else v)
           for k, v in data.items() if k != "fields"}
    out["fields"] = clean
    if raw:
        out["fields_b64"] = raw
    return out
