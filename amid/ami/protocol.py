"""The AMI wire protocol, sans-IO: bytes in, messages out; actions in, bytes out.

Nothing here touches a socket or a clock, so everything is tested with plain bytes.

Framing and decoding are separate steps (frame first, decode second): the :class:`Parser`
splits the byte stream on the blank line that ends every AMI message, and a :class:`Message`
decodes its own fields only when somebody asks for them. Routing needs only the event name,
which is taken from the first line at framing time; a sink that never looks at the fields never
pays for decoding them.

Things real Asterisk does that shape this module (see tests/fixtures/README.md):

* The banner ``Asterisk Call Manager/11.0.0`` is one line with no blank line after it.
* Responses and events are told apart by their *first* line: ``OriginateResponse`` and
  ``ChallengeResponseFailed`` events carry a ``Response:`` field.
* Keys repeat (``Output``, ``Variable``, ``ChanVariable``) and their case varies between events
  (``Uniqueid`` / ``UniqueID``), so fields are ordered pairs with case-insensitive lookup.
* Values are verbatim: only the one space after the colon is dropped, trailing spaces stay.
* Dialplan data can put raw CR/LF and non-UTF-8 bytes into values. Invalid UTF-8 is decoded
  with ``surrogateescape`` so the original bytes stay recoverable; nothing is dropped.
"""

from __future__ import annotations

import enum
import itertools
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, ClassVar, TypeVar, overload

from amid.ami import _accel

__all__ = [
    "PROTOCOL_ERROR_KINDS",
    "ActionIdGenerator",
    "Event",
    "LocalProtocolError",
    "Message",
    "Parser",
    "ParserState",
    "ProtocolError",
    "RemoteProtocolError",
    "Response",
    "encode_action",
    "recover_bytes",
]

BANNER_PREFIX = b"Asterisk Call Manager"
DEFAULT_MAX_MESSAGE_BYTES = 1 << 20
DEFAULT_MAX_FIELDS = 10_000
_MAX_BANNER_BYTES = 256
_FOLLOWS_END = b"--END COMMAND--"
_R_OR_r = (ord("R"), ord("r"))
_CR_LF = (b"\r", b"\n")
_CR_LF_BYTES = (13, 10)
_ACTIVE = _accel.active  # the C functions in use (see amid.ami._accel)
_T = TypeVar("_T")


class ProtocolError(Exception):
    """Base class of AMI protocol errors."""


class LocalProtocolError(ProtocolError):
    """Our caller misused the API (e.g. a CR/LF inside an action value: header injection)."""


# Every ``kind`` a protocol error is counted under (metrics pre-initialise them): the parser's
# three, plus what the session counts: a framed message that is neither response nor event,
# and an event sent before the login succeeded (not routed).
PROTOCOL_ERROR_KINDS = ("bad_banner", "message_too_large", "too_many_fields", "malformed_message",
                        "event_before_login")


class RemoteProtocolError(ProtocolError):
    """The peer sent something that is not AMI. The connection is dead afterwards.

    ``kind`` is a short, bounded label for counters: ``bad_banner``, ``message_too_large``,
    ``too_many_fields``.
    """

    def __init__(self, message: str, *, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


def recover_bytes(value: str) -> bytes:
    """The exact bytes a decoded field value came from (inverse of the parser's decoding)."""
    return value.encode("utf-8", "surrogateescape")


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("utf-8", "surrogateescape")


def _split_lines(text: str) -> list[str]:
    lines = text.split("\r\n")
    if "\n" in text and text.count("\n") != len(lines) - 1:
        # Bare LF somewhere (tolerated from peers): split on LF, drop each line's own CR. The
        # last line has no terminator left (framing removed it): a CR there is data, kept as
        # the CRLF split above keeps it.
        *head, last = text.split("\n")
        lines = [line[:-1] if line.endswith("\r") else line for line in head]
        lines.append(last)
    return lines


def _parse_fields(raw: bytes) -> list[tuple[str, str]]:
    """The fields of a message (the reference rule; the C ``parse_fields`` takes the plain
    ASCII ``Key: value`` CRLF messages and gives the same pairs, tested)."""
    accelerated = _ACTIVE.parse_fields
    if accelerated is not None:
        parsed: list[tuple[str, str]] | None = accelerated(raw)
        if parsed is not None:
            return parsed
    fields: list[tuple[str, str]] = []
    append = fields.append
    for line in _split_lines(_decode(raw)):
        key, sep, value = line.partition(":")
        if not sep:
            # A line with no colon (e.g. raw CR/LF from dialplan data inside a Getvar value):
            # kept under the empty key rather than silently dropped or glued to a neighbour.
            append(("", line))
        elif value[:1] == " ":
            append((key, value[1:]))
        else:
            append((key, value))
    return fields


_NEEDLES: dict[str, bytes] = {}


def _needle(key: str) -> bytes:
    """``b"uniqueid:"`` for ``"Uniqueid"``, or b"" for a key the byte scan cannot look up
    exactly as the decoded fields would (non-ASCII, empty, or holding ':' or a line break)."""
    if key and key.isascii() and ":" not in key and "\n" not in key and "\r" not in key:
        needle = key.lower().encode() + b":"
    else:
        needle = b""
    if len(_NEEDLES) < 4096:  # keys come from callers, but stay bounded anyway
        _NEEDLES[key] = needle
    return needle


class Message:
    """One AMI message: ordered ``(key, value)`` pairs, looked up case-insensitively.

    ``name`` is the value of the first line (the event name, the response status or the
    action name) and ``kind`` what the first line's key says the message is. Fields are decoded
    on first access.
    """

    __slots__ = ("raw", "name", "_fields", "_index")
    kind: ClassVar[str] = "unknown"

    def __init__(self, raw: bytes, name: str | None = None) -> None:
        self.raw = raw
        if name is None:
            name = _first_value(raw)
        self.name = name
        self._fields: list[tuple[str, str]] | None = None
        self._index: dict[str, str] | None = None

    @classmethod
    def from_fields(cls, fields: Iterable[tuple[str, str]]) -> Message:
        """Build a message from pairs (for tests, simulators and synthetic messages)."""
        pairs = list(fields)
        raw = b"\r\n".join(f"{k}: {v}".encode("utf-8", "surrogateescape") for k, v in pairs)
        msg = _message_for(raw)
        msg._fields = pairs
        return msg

    @property
    def fields(self) -> list[tuple[str, str]]:
        """All fields in wire order, keys verbatim, values verbatim (one space after ':' removed)."""
        fields = self._fields
        if fields is None:
            fields = self._fields = _parse_fields(self.raw)
        return fields

    def _lookup(self) -> dict[str, str]:
        index = self._index
        if index is None:
            index = {}
            for key, value in self.fields:
                index.setdefault(key.lower(), value)
            self._index = index
        return index

    @overload
    def get(self, key: str) -> str | None: ...
    @overload
    def get(self, key: str, default: _T) -> str | _T: ...

    def get(self, key: str, default: Any = None) -> Any:
        """The first value of ``key`` (case-insensitive), or ``default``."""
        if self._index is None and self._fields is None:
            needle = _NEEDLES.get(key)
            if needle is None:
                needle = _needle(key)
            if needle and self.raw.isascii():
                # One lookup need not decode every field: find the line in the bytes (routing
                # and handlers typically read one or two fields of an event).
                return self._scan(needle, default)
        return self._lookup().get(key.lower(), default)

    def _scan(self, needle: bytes, default: _T) -> str | _T:
        raw = self.raw
        low = raw.lower()
        if low.startswith(needle):
            start = len(needle)
        else:
            start = low.find(b"\n" + needle)
            if start < 0:
                return default
            start += len(needle) + 1
        end = raw.find(b"\n", start)
        value = raw[start:] if end < 0 else raw[start:end]
        if end >= 0 and value.endswith(b"\r"):
            value = value[:-1]
        if value[:1] == b" ":
            value = value[1:]
        return value.decode("ascii")

    def getall(self, key: str) -> list[str]:
        """Every value of ``key`` (case-insensitive), in wire order."""
        wanted = key.lower()
        return [v for k, v in self.fields if k.lower() == wanted]

    def __getitem__(self, key: str) -> str:
        try:
            return self._lookup()[key.lower()]
        except KeyError:
            raise KeyError(key) from None

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key.lower() in self._lookup()

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self.fields)

    def __len__(self) -> int:
        return len(self.fields)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Message) and type(self) is type(other) and self.fields == other.fields

    __hash__ = None  # type: ignore[assignment]

    def to_dict(self) -> dict[str, str | list[str]]:
        """Fields as a dict in wire order; a repeated key maps to a list of its values in order."""
        out: dict[str, Any] = {}
        for key, value in self.fields:
            if key in out:
                prev = out[key]
                if isinstance(prev, list):
                    prev.append(value)
                else:
                    out[key] = [prev, value]
            else:
                out[key] = value
        return out

    @property
    def action_id(self) -> str | None:
        return self.get("ActionID")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {len(self.raw)} bytes)"


class Response(Message):
    """A response to an action (first line ``Response:``).

    ``events`` holds the list events of an ``EventList: start`` response once the session has
    collected them up to the list-complete event.
    """

    __slots__ = ("events", "list_complete")
    kind: ClassVar[str] = "response"

    def __init__(self, raw: bytes, name: str | None = None) -> None:
        super().__init__(raw, name)
        self.events: list[Event] = []
        self.list_complete: Event | None = None

    @property
    def is_success(self) -> bool:
        """True for ``Success``, ``Goodbye``, ``Follows`` (Asterisk's non-error statuses)."""
        return self.name.lower() in ("success", "goodbye", "follows", "pong")

    @property
    def is_error(self) -> bool:
        return self.name.lower() == "error"

    @property
    def is_list_start(self) -> bool:
        return (self.get("EventList") or "").lower() == "start"

    @property
    def message(self) -> str | None:
        return self.get("Message")

    @property
    def output(self) -> list[str]:
        """The CLI output of a ``Command`` action, one string per line.

        Asterisk >= 14 sends one ``Output:`` field per line; older versions answer
        ``Response: Follows`` with the raw text up to ``--END COMMAND--``.
        """
        if self.name.lower() != "follows":
            return self.getall("Output")
        lines = _split_lines(_decode(self.raw))
        body: list[str] = []
        in_header = True
        for line in lines:
            if in_header:
                key = line.partition(":")[0].lower()
                if key in ("response", "privilege", "actionid"):
                    continue
                in_header = False
            if line.endswith(_FOLLOWS_END.decode()):
                rest = line[: -len(_FOLLOWS_END)]
                if rest:
                    body.append(rest)
                break
            body.append(line)
        return body


class Event(Message):
    """An event (first line ``Event:``), with the envelope the session stamps on it."""

    __slots__ = ("server", "epoch", "seq", "received_at")
    kind: ClassVar[str] = "event"

    def __init__(self, raw: bytes, name: str | None = None) -> None:
        # Slots set directly, not through super().__init__: this runs once per event.
        self.raw = raw
        self.name = _first_value(raw) if name is None else name
        self._fields = None
        self._index = None
        self.server: str = ""
        self.epoch: int = 0
        self.seq: int = 0
        self.received_at: float = 0.0


class Action(Message):
    """An action as a server receives it (first line ``Action:``); used by the simulator."""

    __slots__ = ()
    kind: ClassVar[str] = "action"


_KINDS: dict[bytes, type[Message]] = {b"event": Event, b"response": Response, b"action": Action}


def _first_line(raw: bytes) -> tuple[bytes | None, str]:
    """The first line's key (None when it has no colon) and its value, one space after the
    colon removed (the whole line when there is no colon)."""
    end = raw.find(b"\n")
    if end < 0:
        first = raw  # a one-line message: framing removed its terminator, a CR left is data
    else:
        first = raw[:end - 1] if end and raw[end - 1] == 13 else raw[:end]
    colon = first.find(b":")
    if colon < 0:
        return None, _decode(first)
    value = first[colon + 1:]
    if value[:1] == b" ":
        value = value[1:]
    return first[:colon], _decode(value)


def _first_value(raw: bytes) -> str:
    return _first_line(raw)[1]


def _message_for(raw: bytes) -> Message:
    # The kind comes from the first line's key only: never from the presence of Response:.
    key, name = _first_line(raw)
    if key is None:
        return Message(raw, name)
    return _KINDS.get(key.strip().lower(), Message)(raw, name)


def _ami_major(banner: str) -> int:
    version = banner.rpartition("/")[2]
    head = version.split(".", 1)[0]
    return int(head) if head.isdigit() else 0


class ParserState(enum.Enum):
    AWAITING_BANNER = "awaiting_banner"
    MESSAGES = "messages"
    ERROR = "error"


class Parser:
    """Splits an AMI byte stream into messages. Feed it whatever the socket gave you.

    ``expect_banner`` is true on the client side (Asterisk opens with its banner) and false
    on the server side. Bounds: a message over ``max_message_bytes`` or with more than
    ``max_fields`` lines raises :class:`RemoteProtocolError`, and so does any later ``feed``:
    after a protocol error the connection is dead.
    """

    __slots__ = ("state", "banner", "max_message_bytes", "max_fields", "_buf", "_scan_from",
                 "_error", "messages_total", "bytes_total", "_legacy_follows")

    def __init__(self, *, expect_banner: bool = True,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 max_fields: int = DEFAULT_MAX_FIELDS) -> None:
        self.state = ParserState.AWAITING_BANNER if expect_banner else ParserState.MESSAGES
        self.banner: str | None = None
        self.max_message_bytes = max_message_bytes
        self.max_fields = max_fields
        self._buf = b""
        self._scan_from = 0
        self._error: RemoteProtocolError | None = None
        # Asterisk < 14 (AMI < 3) answers Command with "Response: Follows" and raw text that
        # may hold blank lines; later versions never do, so only their banner enables it.
        self._legacy_follows = False
        self.messages_total = 0
        self.bytes_total = 0

    @property
    def ami_version(self) -> str | None:
        """``11.0.0`` from the banner ``Asterisk Call Manager/11.0.0``."""
        if self.banner is None:
            return None
        return self.banner.rpartition("/")[2] or None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a complete message."""
        return len(self._buf)

    def _fail(self, message: str, kind: str) -> RemoteProtocolError:
        self.state = ParserState.ERROR
        self._error = RemoteProtocolError(message, kind=kind)
        self._buf = b""
        return self._error

    def _stop(self, out: list[Message], message: str, kind: str) -> list[Message]:
        """Fail the stream, but hand over the messages completed before the bad one first."""
        error = self._fail(message, kind)
        self.messages_total += len(out)
        if out:
            return out
        raise error

    @property
    def error(self) -> RemoteProtocolError | None:
        """The protocol error that ended this stream, if any. ``feed`` returns the messages
        completed before the error first and raises it on the next call."""
        return self._error

    def feed(self, data: bytes) -> list[Message]:
        """Add received bytes; return every message they complete, in order."""
        if self._error is not None:
            raise RemoteProtocolError(f"connection already failed: {self._error}", kind=self._error.kind)
        self.bytes_total += len(data)
        buf = self._buf + data if self._buf else data
        if self.state is ParserState.AWAITING_BANNER:
            nl = buf.find(b"\n")
            if nl < 0:
                if len(buf) > _MAX_BANNER_BYTES or not BANNER_PREFIX.startswith(buf[:len(BANNER_PREFIX)]):
                    raise self._fail(f"expected the AMI banner, got {buf[:60]!r}", "bad_banner")
                self._buf = buf
                return []
            line = buf[:nl].rstrip(b"\r")
            # The same bound as above, so the verdict never depends on where reads split.
            if nl > _MAX_BANNER_BYTES or not line.startswith(BANNER_PREFIX):
                raise self._fail(f"expected the AMI banner, got {line[:60]!r}", "bad_banner")
            self.banner = _decode(line)
            self._legacy_follows = _ami_major(self.banner) < 3
            self.state = ParserState.MESSAGES
            buf = buf[nl + 1:]
            self._scan_from = 0
        frame_crlf = _ACTIVE.frame_crlf
        if frame_crlf is not None and not self._legacy_follows:
            # The C framing takes a read with no bare LF and no message near a bound (the
            # stream as Asterisk writes it) and builds its Events; it declines (None) anything
            # else, which the reference framing below does by the exact rules.
            framed = frame_crlf(buf, self.max_message_bytes, self.max_fields)
            if framed is not None:
                return self._framed(buf, *framed)
        return self._feed_general(buf)

    def _framed(self, buf: bytes, messages: list[Any], consumed: int, others: int
                ) -> list[Message]:
        """Take what the C framing made of a read: ``messages`` holds its Events, and the other
        messages (other kinds, stray blank lines) still as bytes (``others`` counts those),
        which become messages here as :meth:`_feed_general` makes them."""
        if others:
            out: list[Message] = []
            append = out.append
            for item in messages:
                if type(item) is not bytes:
                    append(item)
                    continue
                if not item or item[:1] in _CR_LF:
                    item = item.lstrip(b"\r\n")  # stray blank lines between messages
                    if not item:
                        continue
                append(_message_for(item))
            messages = out
        # Stray blank lines before the unfinished message are not part of it (as in the
        # reference framing, so the rest and its bounds are the same whoever framed).
        rest = (buf[consumed:] if consumed else buf).lstrip(b"\r\n")
        self._buf = rest
        self._scan_from = max(0, len(rest) - 3)
        self.messages_total += len(messages)
        return messages

    def _feed_general(self, buf: bytes) -> list[Message]:
        """Frame ``buf`` (everything unframed so far) allowing bare-LF terminators, stray blank
        lines and legacy ``Response: Follows`` output. This is the reference framing: the C
        framing gives the same messages for what it takes and hands anything unusual (a bare
        LF, a bound reached) over to it.

        A message's size is that of its bytes without the blank line that ends it and without
        the stray blank lines before it: the same whatever the read boundaries were."""
        out: list[Message] = []
        pos = 0
        scan = self._scan_from
        size = len(buf)
        max_bytes = self.max_message_bytes
        max_fields = self.max_fields
        find = buf.find
        # Where the next bare-LF terminator ("\n\n") is; searched once per feed, then reused,
        # so a pure-CRLF stream pays one failed search per read, not one per message.
        lf_lf = find(b"\n\n", scan)
        while True:
            if pos < size and buf[pos] in _CR_LF_BYTES:
                # Stray blank lines between messages (also halves of one split by a read).
                while pos < size and buf[pos] in _CR_LF_BYTES:
                    pos += 1
                if scan < pos:
                    scan = pos
            if (self._legacy_follows and pos < size and buf[pos] in _R_OR_r
                    and buf[pos:pos + 17].lower() == b"response: follows"):
                end = self._follows_end(buf, pos)
                if end is None:
                    break
                stop, nxt = end
            else:
                crlf = find(b"\n\r\n", scan)
                if lf_lf != -1 and lf_lf < pos:
                    lf_lf = find(b"\n\n", pos)
                if crlf == -1 and lf_lf == -1:
                    break
                if lf_lf == -1 or (crlf != -1 and crlf < lf_lf):
                    stop, nxt = crlf, crlf + 3
                else:
                    stop, nxt = lf_lf, lf_lf + 2
            if stop > pos and buf[stop - 1] == 13:
                stop -= 1
            if stop - pos > max_bytes:
                return self._stop(out, f"message of {stop - pos} bytes exceeds the limit of "
                                       f"{max_bytes}", "message_too_large")
            raw = buf[pos:stop]
            pos = scan = nxt
            if raw.count(b"\n") >= max_fields:
                return self._stop(out, f"message has more than {self.max_fields} lines",
                                  "too_many_fields")
            out.append(_message_for(raw))
        rest = size - pos
        # The unfinished message can still end in a partial terminator (up to 3 bytes of
        # "\r\n\r\n"): only a tail longer than the limit by more than that is over it for sure.
        if rest > max_bytes + 3:
            return self._stop(out, f"incomplete message of over {max_bytes} bytes exceeds the "
                                   f"limit of {max_bytes}", "message_too_large")
        self._buf = buf[pos:] if rest else b""
        # Resume the terminator search a little before the end of what we already scanned.
        self._scan_from = max(0, rest - 3)
        self.messages_total += len(out)
        return out

    def _follows_end(self, buf: bytes, pos: int) -> tuple[int, int] | None:
        # Legacy Command output (Asterisk < 14) may contain blank lines: it ends at the
        # --END COMMAND-- marker, not at the first blank line.
        marker = buf.find(_FOLLOWS_END, pos)
        if marker == -1:
            return None
        after = marker + len(_FOLLOWS_END)
        for term in (b"\r\n\r\n", b"\n\n", b"\r\n\n", b"\n\r\n"):
            if buf.startswith(term, after):
                return after, after + len(term)
        if len(buf) - after < 4:
            return None
        # Marker not followed by a blank line: end the message at the next blank line.
        nxt = buf.find(b"\n\r\n", after)
        if nxt == -1:
            return None
        return nxt, nxt + 3


def _check(text: str, what: str) -> None:
    if "\r" in text or "\n" in text:
        # The value itself is not quoted: it may be a secret.
        raise LocalProtocolError(f"{what} contains CR or LF (header injection refused)")


def _encode_str(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def encode_action(name: str, fields: Iterable[tuple[str, Any]] | Mapping[str, Any] = (), *,
                  action_id: str | None = None) -> bytes:
    """Serialise an action. Any CR or LF in a key or value, or a ``:`` in a key, raises
    :class:`LocalProtocolError`: a value must never be able to start a new header or message.

    ``fields`` may be a mapping or pairs; a list value repeats its key (e.g. ``Variable``).
    """
    _check(name, "action name")
    if not name:
        raise LocalProtocolError("action name is empty")
    lines = [f"Action: {name}"]
    if action_id is not None:
        action_id = _encode_str(action_id)
        _check(action_id, "ActionID")
        lines.append(f"ActionID: {action_id}")
    items = fields.items() if isinstance(fields, Mapping) else fields
    for key, value in items:
        key = _encode_str(key)
        _check(key, "key")
        if ":" in key or not key:
            raise LocalProtocolError(f"key {key!r} is empty or contains ':'")
        for one in (value if isinstance(value, (list, tuple)) else (value,)):
            text = _encode_str(one)
            _check(text, f"value of {key!r}")
            lines.append(f"{key}: {text}")
    lines.append("\r\n")
    return "\r\n".join(lines).encode("utf-8", "surrogateescape")


class ActionIdGenerator:
    """ActionIDs unique per process: a prefix plus a counter (never time or random).

    The default prefix carries the pid, so two amid processes on one Asterisk never mistake
    each other's ``OriginateResponse`` events (which Asterisk broadcasts) for their own.
    """

    __slots__ = ("prefix", "_counter")

    def __init__(self, prefix: str | None = None) -> None:
        self.prefix = f"amid-{os.getpid()}-" if prefix is None else prefix
        _check(self.prefix, "ActionID prefix")
        self._counter = itertools.count(1)

    def __call__(self) -> str:
        return f"{self.prefix}{next(self._counter)}"


# The C accelerator (when built) makes Events itself: it learns their slots here, once.
if _accel.speedups is not None:
    _accel.speedups.bind_event(Event, Event(b"Event: x"))
