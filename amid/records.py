"""Record: the one JSON shape every sink receives.

A record is an AMI event plus its envelope::

    {"id": "pbx1:3f9c1a7e:1:42", "server": "pbx1", "epoch": 1, "seq": 42,
     "received_at": "2026-11-28T03:21:41.214512Z", "event": "Newchannel",
     "fields": {"Event": "Newchannel", "Privilege": "call,all", "Channel": "PJSIP/100-00000001", ...}}

* ``fields`` holds the AMI fields verbatim: original key spelling and order, values untouched
  (trailing spaces kept); a key that repeats (``Variable``, ``ChanVariable``, ``Output``) becomes a
  JSON array of its values in order.
* A value that was not valid UTF-8 on the wire is shown with U+FFFD in ``fields`` and its exact
  bytes are kept, base64-encoded, in ``fields_b64`` (present only when needed): nothing is lost.
  A key that is not UTF-8 is shown with each bad byte as ``\\xNN`` (distinct keys stay distinct;
  should that spelling equal another key of the event, ``#2`` is appended).
* ``id`` is unique and stable: ``server:run:epoch:seq`` (``run`` is random per daemon start). A
  receiver that sees an id twice (at-least-once delivery) can drop the copy.
"""

from __future__ import annotations

import calendar
import re
import time
from collections.abc import Sequence
from typing import Any

from pydantic_core import from_json as _from_json

from amid._encode import (
    encode_record,
    event_json,
    format_iso,
    receive_time_bytes,
    record_dict,
    record_head_mid,
    record_json,
)
from amid.ami import _accel
from amid.ami.protocol import Event

__all__ = ["Record", "format_iso"]

_ACTIVE = _accel.active  # the C functions in use


class Record:
    """An event as sinks see it. Cheap to create; JSON is built once, on first use."""

    __slots__ = ("_id", "name", "server", "received_at", "_json", "_data", "_event", "size", "_run")

    def __init__(self, *, id: str, name: str, server: str, received_at: float,
                 json_bytes: bytes | None = None, data: dict[str, Any] | None = None,
                 event: Event | None = None) -> None:
        self._id: str | None = id
        self._run = ""
        self.name = name
        self.server = server
        self.received_at = received_at
        self._json = json_bytes
        self._data = data
        self._event = event
        #: Bytes this record accounts for in queue bounds, fixed at creation: its JSON length,
        #: or for a record straight from the wire an estimate from the AMI message (see
        #: :meth:`of_event`), so that queueing an event on the read path never encodes it.
        self.size: int = len(self.json) if json_bytes is not None or event is None else \
            _estimated_size(event)

    @classmethod
    def of_event(cls, event: Event, run: str) -> Record:
        """The record of an event from the wire; its id is ``server:run:epoch:seq``.

        This runs for every event on the AMI read path, so nothing is formatted here: the id
        and the JSON are built when a sink first asks for them.
        """
        record = cls.__new__(cls)
        record._id = None
        record._run = run
        record.name = event.name
        record.server = event.server
        record.received_at = event.received_at
        record._json = None
        record._data = None
        record._event = event
        record.size = _estimated_size(event)
        return record

    @property
    def id(self) -> str:
        """Unique and stable: receivers drop a record whose id they have seen."""
        ident = self._id
        if ident is None:  # only a record of_event() made leaves the id for later
            event = self._event
            assert event is not None
            ident = self._id = f"{event.server}:{self._run}:{event.epoch}:{event.seq}"
        return ident

    @property
    def json(self) -> bytes:
        """Compact UTF-8 JSON of the record, without a trailing newline."""
        if self._json is None:
            if self._event is not None:  # from the event (in C where it can), even after .data
                if self._id is None:  # the usual case: no one needed the id string yet
                    self._json = record_json(self._event, self._run)
                else:
                    self._json = event_json(self._event, self._id)
            else:
                self._json = encode_record(self.data)
        return self._json

    @classmethod
    def of_events(cls, events: Sequence[Event], run: str) -> list[Record]:
        """``[Record.of_event(event, run) for event in events]`` (the router's read path)."""
        make = _ACTIVE.records_of  # the same, in C, for exactly this class (see amid.ami._accel)
        if make is not None and cls is Record:
            records: list[Record] | None = make(events, run)
            if records is not None:
                return records
        of_event = cls.of_event
        return [of_event(event, run) for event in events]

    @staticmethod
    def jsons(records: Sequence[Record]) -> list[bytes]:
        """``[record.json for record in records]``: a sink's batch, encoded in one C call
        where the accelerator is in use (the records of a read share their envelope parts)."""
        encode = _ACTIVE.records_json
        if encode is not None:
            built: list[bytes] | None = encode(records, record_head_mid, receive_time_bytes)
            if built is not None:
                return built
        return [record.json for record in records]

    @property
    def seq(self) -> int | None:
        """The per-connection sequence number (without building :attr:`data`)."""
        if self._event is not None:
            return self._event.seq
        seq: int | None = self.data.get("seq")
        return seq

    @property
    def data(self) -> dict[str, Any]:
        """The record as a dict (the documented JSON shape)."""
        if self._data is None:
            if self._event is not None:
                self._data = record_dict(self._event, self.id)
            elif self._json is not None:
                self._data = _from_json(self._json)
            else:
                raise TypeError("a Record is made from its JSON, its data or its event")
        return self._data

    @classmethod
    def from_json(cls, raw: bytes) -> Record:
        """Rebuild a record from its JSON (e.g. read back from a spool).

        The envelope amid writes is read off the front of the bytes; :attr:`data` is decoded
        only if a sink asks for it (a file or a webhook sink only needs the bytes)."""
        envelope = _ENVELOPE.match(raw)
        if envelope is not None:
            ident, server, at, name = (part.decode() for part in envelope.groups())
            return cls(id=ident, name=name, server=server, received_at=_parse_iso(at),
                       json_bytes=bytes(raw))
        data = _from_json(raw)
        return cls(id=data["id"], name=data["event"], server=data["server"],
                   received_at=_parse_iso(data["received_at"]), json_bytes=bytes(raw), data=data)

    @classmethod
    def synthetic(cls, *, id: str, server: str, name: str, fields: dict[str, Any],
                  received_at: float | None = None, epoch: int = 0, seq: int = 0) -> Record:
        """A record amid makes itself (e.g. ``AmidGap``), in the same shape as a real event."""
        ts = time.time() if received_at is None else received_at
        data = {"id": id, "server": server, "epoch": epoch, "seq": seq,
                "received_at": format_iso(ts), "event": name,
                "fields": {"Event": name, **fields}}
        return cls(id=id, name=name, server=server, received_at=ts, data=data)

    def __repr__(self) -> str:
        return f"Record(id={self.id!r}, name={self.name!r})"


def _estimated_size(event: Event) -> int:
    """Queue-bound size of a wire event before its JSON exists: the AMI message's length, plus
    about 2 bytes a line for quotes and commas, plus an envelope under 256 bytes (an event
    whose values need many JSON escapes can be larger; the spool sizes by the real JSON)."""
    raw = len(event.raw)
    return raw + (raw >> 2) + 256


# The envelope as amid writes it, values without escapes (anything else: the full parse).
_ENVELOPE = re.compile(rb'\{"id":"([^"\\]*)","server":"([^"\\]*)","epoch":-?\d+,"seq":-?\d+,'
                       rb'"received_at":"([^"\\]*)","event":"([^"\\]*)","fields":\{')
_ISO_SECONDS: dict[str, int] = {}  # "2026-11-28T03:21:41" -> unix seconds (records of a spool share them)


def _parse_iso(text: str) -> float:
    base, _, frac = text.rstrip("Z").partition(".")
    secs = _ISO_SECONDS.get(base)
    if secs is None:
        secs = calendar.timegm(time.strptime(base, "%Y-%m-%dT%H:%M:%S"))
        if len(_ISO_SECONDS) >= 4096:
            _ISO_SECONDS.clear()
        _ISO_SECONDS[base] = secs
    return secs + (int(frac) / 10 ** len(frac) if frac else 0.0)


# The C accelerator (when built) makes Records itself: it learns their slots here, once.
if _accel.speedups is not None:
    _accel.speedups.bind_record(Record)
