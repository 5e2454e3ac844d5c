"""Building and encoding the record JSON (see amid.records for the shape).

Kept apart from records.py so the hot path (event -> dict -> JSON bytes) lives in one place
that benchmarks can target.
"""

from __future__ import annotations

import base64
from typing import Any

from pydantic_core import PydanticSerializationError, to_json

from amid.ami.protocol import Event, recover_bytes


def record_dict(event: Event, record_id: str) -> dict[str, Any]:
    from amid.records import format_iso
    return {"id": record_id, "server": event.server, "epoch": event.epoch, "seq": event.seq,
            "received_at": format_iso(event.received_at), "event": event.name,
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


def _replace(text: str) -> str:
    return recover_bytes(text).decode("utf-8", "replace")


def _clean_invalid_utf8(data: dict[str, Any]) -> dict[str, Any]:
    fields = data.get("fields", {})
    clean: dict[str, Any] = {}
    raw: dict[str, Any] = {}
    for key, value in fields.items():
        values = value if isinstance(value, list) else [value]
        if _has_surrogates(key) or any(_has_surrogates(v) for v in values):
            raw[_replace(key)] = ([base64.b64encode(recover_bytes(v)).decode() for v in values]
                                  if isinstance(value, list) else base64.b64encode(recover_bytes(value)).decode())
            value = [_replace(v) for v in values] if isinstance(value, list) else _replace(value)
        clean[_replace(key) if _has_surrogates(key) else key] = value
    out = {k: (_replace(v) if isinstance(v, str) and _has_surrogates(v) else v)
           for k, v in data.items() if k != "fields"}
    out["fields"] = clean
    if raw:
        out["fields_b64"] = raw
    return out
