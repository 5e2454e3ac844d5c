"""Prototypes of hot-path changes, measured side by side with the shipped code (``--prototypes``).

Nothing in amid imports this module. Each prototype keeps amid's semantics (lossless fields,
bounded buffers, bare-LF tolerance, legacy ``Response: Follows``) by taking a fast path only when
the bytes are the plain common case and falling back to the shipped code otherwise; the
equivalence is checked on the benchmark streams before anything is timed.
"""

from __future__ import annotations

from typing import Any

from amid.ami.protocol import Event, Message, Parser, ParserState, _message_for, _parse_fields


class FastFramingParser(Parser):
    """Parser whose ``feed`` frames a pure-CRLF buffer with one C-level ``bytes.split``.

    Fast path only when the banner was seen, no error happened and every LF in the buffer is
    preceded by a CR (so the only terminator is CRLF CRLF and bare-LF handling cannot apply).
    ``Event: X`` messages are built inline; anything else goes through the shipped
    ``_message_for``; a legacy ``Response: Follows`` (whose body may hold blank lines) hands
    the rest of the buffer to the shipped ``Parser.feed``. The size and line-count bounds are
    checked only when the buffer is big enough to break them.
    """

    __slots__ = ()

    def feed(self, data: bytes) -> list[Message]:
        buf = self._buf + data if self._buf else data
        if (self.state is not ParserState.MESSAGES or self._error is not None
                or buf.count(b"\n") != buf.count(b"\r\n")):
            return super().feed(data)
        self.bytes_total += len(data)
        *complete, rest = buf.split(b"\r\n\r\n")
        max_bytes = self.max_message_bytes
        max_fields = self.max_fields
        check_bounds = len(buf) > max_bytes or len(buf) >= max_fields
        out: list[Message] = []
        append = out.append
        for i, raw in enumerate(complete):
            if check_bounds:
                if len(raw) > max_bytes:
                    raise self._fail(f"message of {len(raw)} bytes exceeds the limit of {max_bytes}",
                                     "message_too_large")
                # A message with max_fields lines has at least that many bytes.
                if len(raw) >= max_fields and raw.count(b"\n") >= max_fields:
                    raise self._fail(f"message has more than {max_fields} lines", "too_many_fields")
            if raw[:7] == b"Event: ":
                end = raw.find(b"\r\n")
                append(Event(raw, raw[7:end if end >= 0 else len(raw)]
                             .decode("utf-8", "surrogateescape")))
                continue
            if raw[:1] in (b"\r", b"\n"):
                raw = raw.lstrip(b"\r\n")  # stray blank lines between messages
                if not raw:
                    continue
            if raw[:17].lower() == b"response: follows":
                # Its body may contain blank lines: let the shipped parser frame the rest.
                remainder = b"\r\n\r\n".join(complete[i:] + [rest])
                self._buf, self._scan_from = b"", 0
                self.bytes_total -= len(remainder)
                self.messages_total += len(out)
                return out + super().feed(remainder)
            append(_message_for(raw))
        if len(rest) > max_bytes:
            raise self._fail(f"incomplete message of {len(rest)} bytes exceeds the limit of "
                             f"{max_bytes}", "message_too_large")
        self._buf = rest
        self._scan_from = max(0, len(rest) - 3)
        self.messages_total += len(out)
        return out


def fast_parse_fields(raw: bytes) -> list[tuple[str, str]]:
    """``_parse_fields`` with a fast path for valid UTF-8, CRLF-only, ``Key: value`` lines."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return _parse_fields(raw)
    lines = text.split("\r\n")
    if text.count("\n") != len(lines) - 1:
        return _parse_fields(raw)
    fields = []
    append = fields.append
    for line in lines:
        key, sep, value = line.partition(": ")
        if not sep or ":" in key:
            return _parse_fields(raw)  # "Key:value", "Key:", no colon, or "K:ey: v"
        append((key, value))
    return fields


_TRICKY = (b"Event: A\r\nK: v \r\nK: w\r\n\r\n\r\nEvent: B\nX: y\n\nResponse: Follows\r\n"
           b"Privilege: Command\r\nline 1\r\n\r\nline 3\r\n--END COMMAND--\r\n\r\n"
           b"event: lower\r\nKey:novalue\r\nK:ey: v\r\nno colon\r\n\r\n"
           b"Event: Bad\xff\xfeUTF8\r\nV: \xe2\x82\r\n\r\nEvent: C\r\nA: b\r\n\r\n")


def _tricky_reads() -> list[list[bytes]]:
    whole = [_TRICKY]
    bytewise = [_TRICKY[i:i + 1] for i in range(len(_TRICKY))]
    sevens = [_TRICKY[i:i + 7] for i in range(0, len(_TRICKY), 7)]
    return [whole, bytewise, sevens]


def check_equivalence(chunks: list[bytes]) -> None:
    """The prototypes give exactly what the shipped code gives on these reads (and on a tricky
    stream with bare LF, legacy Follows, odd keys and invalid UTF-8, fed three ways)."""
    for reads in [chunks, *_tricky_reads()]:
        _check_reads(reads)


def _check_reads(chunks: list[bytes]) -> None:
    shipped, fast = Parser(expect_banner=False), FastFramingParser(expect_banner=False)
    got_a: list[Message] = []
    got_b: list[Message] = []
    for data in chunks:
        got_a += shipped.feed(data)
        got_b += fast.feed(data)
    if [(type(m), m.raw, m.name) for m in got_a] != [(type(m), m.raw, m.name) for m in got_b]:
        raise AssertionError("FastFramingParser frames differently")
    if (shipped.buffered, shipped.messages_total, shipped.bytes_total) != \
            (fast.buffered, fast.messages_total, fast.bytes_total):
        raise AssertionError("FastFramingParser counts differently")
    check_raw_get(got_a)
    for m in got_a:
        if fast_parse_fields(m.raw) != m.fields:
            raise AssertionError(f"fast_parse_fields differs on {m.raw[:60]!r}")


_MISSING = object()


def raw_get(self: Message, key: str, default: Any = None) -> Any:
    """``Message.get`` that, on a message whose fields are not decoded yet, finds the value in
    the raw bytes (one ``lower`` + ``find`` in C) instead of decoding and indexing every field.

    Exactly the shipped semantics (first occurrence, case-insensitive, one space after the colon
    dropped, CRLF or bare LF): the raw path is taken only for ASCII messages and plain ASCII
    keys; anything else uses the shipped lookup.
    """
    raw = self.raw
    if self._fields is not None or not raw.isascii() or not key.isascii() or not key \
            or ":" in key or "\r" in key or "\n" in key:
        return _SHIPPED_GET(self, key, default)
    wanted = key.lower().encode("ascii")
    low = raw.lower()
    if low.startswith(wanted + b":"):
        start = len(wanted) + 1
    else:
        at = low.find(b"\n" + wanted + b":")
        if at < 0:
            return default
        start = at + len(wanted) + 2
    end = raw.find(b"\n", start)
    value = raw[start:] if end < 0 else raw[start:end]
    if value[-1:] == b"\r":
        value = value[:-1]
    if value[:1] == b" ":
        value = value[1:]
    return value.decode("ascii")


_SHIPPED_GET = Message.get


def install() -> None:
    """Use the prototypes in this process (``receive_client amid-proto``): the session builds
    ``FastFramingParser`` and ``Message.get`` reads undecoded messages from their raw bytes."""
    import amid.ami.session as session
    session.Parser = FastFramingParser
    Message.get = raw_get


def check_raw_get(messages: list[Message]) -> None:
    keys = ("Uniqueid", "UNIQUEID", "linkedid", "Event", "Value", "Missing", "Privilege", "K", "V")
    for m in messages:
        for key in keys:
            fresh = type(m)(m.raw, m.name)
            if raw_get(fresh, key, _MISSING) != _SHIPPED_GET(m, key, _MISSING):
                raise AssertionError(f"raw_get({key!r}) differs on {m.raw[:60]!r}")
