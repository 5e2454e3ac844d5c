"""The record JSON (see amid.records for the shape): one rule, and its C accelerator.

The rule is written once: :func:`record_dict` is a record's dict and :func:`encode_record` its
JSON bytes (``pydantic_core.to_json``, with the fallback for bytes that were not UTF-8).

Where the C accelerator is in use (see :mod:`amid.ami._accel`), its ``record_json`` builds the
same bytes in one pass for the usual message (ASCII ``Key: value`` lines, no escape needed but
quotes; repeated keys become arrays) and declines (None or False) anything else, which the
rule above then encodes. The envelope texts it puts in (id, server, event name) are escaped
here by ``to_json`` itself, so they are the reference's bytes by construction. The C is tested
against :func:`encode_record` byte for byte (tests/test_speedups.py, tests/test_protocol.py).
"""

from __future__ import annotations

import base64
import time
from typing import Any

from pydantic_core import PydanticSerializationError, to_json

from amid.ami import _accel
from amid.ami.protocol import Event, recover_bytes

_ACTIVE = _accel.active  # the C functions in use

_last_second: tuple[int, str] = (-1, "")


def format_iso(ts: float) -> str:
    """Unix seconds -> ``2026-11-28T03:21:41.214512Z`` (UTC, microseconds)."""
    global _last_second
    whole = int(ts)
    micros = round((ts - whole) * 1_000_000)
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
format_iso_cached = _iso  # for other hot paths (syslog headers)
receive_time_bytes = _iso.bytes  # the ISO bytes of a receive time, cached per value


def record_dict(event: Event, record_id: str) -> dict[str, Any]:
    """The record of a wire event as a dict: the documented JSON shape."""
    return {"id": record_id, "server": event.server, "epoch": event.epoch, "seq": event.seq,
            "received_at": _iso(event.received_at), "event": event.name,
            "fields": event.to_dict()}


def record_json(event: Event, run: str) -> bytes:
    """The record JSON of a wire event whose id is ``server:run:epoch:seq``:
    ``encode_record(record_dict(event, id))``, built in C where it takes the event (the
    daemon's hot path; the id string is not even built)."""
    build = _ACTIVE.record_json
    if build is not None:
        seq = event.seq
        parts = record_head_mid(event.server, run, event.epoch)
        name = _json_text(event.name)
        if parts is not None and name is not None and type(seq) is int:
            built: bytes | None = build(parts[0], parts[1], seq, receive_time_bytes(event.received_at),
                                        name, event.raw)
            if built:
                return built
    return encode_record(record_dict(event, f"{event.server}:{run}:{event.epoch}:{event.seq}"))


def event_json(event: Event, record_id: str) -> bytes:
    """The record JSON of an event with this id: ``encode_record(record_dict(event,
    record_id))``, built in C where it takes the event."""
    build = _ACTIVE.record_json
    if build is not None:
        epoch, seq = event.epoch, event.seq
        ident = _escaped(record_id) if type(record_id) is str else None
        server, name = _json_text(event.server), _json_text(event.name)
        if (ident is not None and server is not None and name is not None
                and type(epoch) is int and type(seq) is int):
            mid = b'","server":"%s","epoch":%d,"seq":' % (server, epoch)
            built: bytes | None = build(b'{"id":"' + ident, mid, seq,
                                        receive_time_bytes(event.received_at), name, event.raw,
                                        False)
            if built:
                return built
    return encode_record(record_dict(event, record_id))


def _escaped(text: str) -> bytes | None:
    """``text`` as :func:`encode_record` writes it between a JSON string's quotes, or None
    when that needs the fallback (a lone surrogate)."""
    try:
        return to_json(text)[1:-1]
    except PydanticSerializationError:
        return None


_MISSING: Any = object()
_json_texts: dict[str, bytes | None] = {}


def _json_text(text: object) -> bytes | None:
    """:func:`_escaped` for the texts that repeat on every event (server names, event names),
    cached; None for anything that is no str (a library user's value: the reference shows it)."""
    if type(text) is not str:
        return None
    known: bytes | None = _json_texts.get(text, _MISSING)
    if known is _MISSING:
        known = _escaped(text)
        if len(_json_texts) < 4096:  # event names come from the wire: bound the cache
            _json_texts[text] = known
    return known


_parts_cache: dict[tuple[str, str, int], tuple[bytes, bytes] | None] = {}


def record_head_mid(server: object, run: object, epoch: object) -> tuple[bytes, bytes] | None:
    """The envelope of one connection's wire records around their sequence number, as the C
    record builders take it: ``head`` is ``{"id":"<server>:<run>:<epoch>:`` and ``mid``
    ``","server":"<server>","epoch":<epoch>,"seq":``. None when the reference must encode
    them (no str, a lone surrogate, an epoch that is no int). Cached: they change only on
    reconnect."""
    if type(server) is not str or type(run) is not str or type(epoch) is not int:
        return None
    key = (server, run, epoch)
    parts = _parts_cache.get(key, _MISSING)
    if parts is _MISSING:
        ident, name = _escaped(f"{server}:{run}:{epoch}:"), _json_text(server)
        parts = None if ident is None or name is None else (
            b'{"id":"' + ident, b'","server":"%s","epoch":%d,"seq":' % (name, epoch))
        if len(_parts_cache) >= 64:  # one entry per (server, epoch) seen: keep only recent ones
            _parts_cache.clear()
        _parts_cache[key] = parts
    return parts


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
