"""RELP, the Reliable Event Logging Protocol (rsyslog's ``imrelp``), client side, sans-IO.

:class:`RelpClient` never touches a socket: commands go in and come out as bytes to write
(:meth:`~RelpClient.open`, :meth:`~RelpClient.syslog`, :meth:`~RelpClient.close`), and the bytes
the server sends go in (:meth:`~RelpClient.receive_data`) and come out as events. The syslog sink
drives it over a socket; the tests drive it with plain bytes.

The protocol (librelp's ``doc/relp.md``): every frame is ``TXNR SP COMMAND SP DATALEN [SP DATA]
LF``. The client numbers its commands from 1 (after 999,999,999 comes 1 again); the server answers
each with ``TXNR rsp DATALEN CODE [SP TEXT] [LF DATA]``, code 200 for OK, anything else an error.
A session starts with ``open`` carrying offers (``relp_version=0``, ``commands=syslog``) and ends
with ``close``; the server may send the hint ``0 serverclose 0`` before it closes. Several
``syslog`` commands may be outstanding at once, up to a window. Answers are matched to commands by
their txnr only, never by their order.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NoReturn

__all__ = [
    "Accepted",
    "Closed",
    "Event",
    "LocalProtocolError",
    "Opened",
    "Refused",
    "RelpClient",
    "RelpError",
    "RemoteProtocolError",
    "ServerClose",
    "State",
]

TXNR_MAX = 999_999_999
RELP_VERSION = 0  # what librelp (and so rsyslog) speaks: the "experimental" 0, never 1 in practice
SOFTWARE = "amid"
# An answer from the server is a few bytes (the open answer lists offers); anything this large is
# garbage, not a reason to buffer without bound.
MAX_SERVER_FRAME = 64 * 1024
_MAX_HEADER = 9 + 1 + 32 + 1 + 9  # TXNR SP COMMAND SP DATALEN, at their longest


class RelpError(Exception):
    """Base of this module's errors."""


class LocalProtocolError(RelpError):
    """Our caller misused the client (a command in the wrong state, a full window)."""


class RemoteProtocolError(RelpError):
    """The server sent something RELP does not allow; the session is dead."""


class State(enum.Enum):
    """Where the session is. The legal moves are in ``_MOVES``."""

    IDLE = "idle"          # nothing sent yet
    OPENING = "opening"    # "open" sent, its answer not yet here
    OPEN = "open"          # syslog commands may be sent
    CLOSING = "closing"    # "close" sent (or the server said it closes): no new commands
    CLOSED = "closed"      # the answer to "close" came, or the server ended the session
    BROKEN = "broken"      # a protocol error or a refused open: the connection is finished


_MOVES: dict[State, frozenset[State]] = {
    State.IDLE: frozenset({State.OPENING, State.BROKEN}),
    State.OPENING: frozenset({State.OPEN, State.CLOSED, State.BROKEN}),
    State.OPEN: frozenset({State.CLOSING, State.CLOSED, State.BROKEN}),
    State.CLOSING: frozenset({State.CLOSED, State.BROKEN}),
    State.CLOSED: frozenset({State.BROKEN}),
    State.BROKEN: frozenset(),
}


# -- events --------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Opened:
    """The server accepted ``open``; ``offers`` are its answer (name -> value)."""

    offers: dict[str, str]


@dataclass(frozen=True, slots=True)
class Accepted:
    """The server answered 200 to the ``syslog`` command ``txnr``: the message is delivered."""

    txnr: int


@dataclass(frozen=True, slots=True)
class Refused:
    """The server answered ``code`` (not 200) to command ``txnr`` (``command`` names it)."""

    txnr: int
    command: str
    code: int
    text: str


@dataclass(frozen=True, slots=True)
class ServerClose:
    """The server's hint that it is closing the session: no more answers will come."""


@dataclass(frozen=True, slots=True)
class Closed:
    """The server answered our ``close``: the connection may be closed now."""


Event = Opened | Accepted | Refused | ServerClose | Closed


# -- the client ----------------------------------------------------------------------------------

class RelpClient:
    """The client half of one RELP session (one TCP connection), without I/O.

    ``window`` bounds the ``syslog`` commands awaiting an answer (:attr:`window_free`).
    """

    def __init__(self, *, window: int = 128) -> None:
        if not 1 <= window <= 100_000:
            raise ValueError(f"window must be 1..100000, got {window}")
        self.window = window
        self.state = State.IDLE
        self._next_txnr = 1
        # txnr -> command, for every command sent and not yet answered
        self._outstanding: dict[int, str] = {}
        self._outstanding_syslogs = 0
        self._buffer = bytearray()

    # -- commands (bytes out) ---------------------------------------------------------------

    def open(self) -> bytes:
        """The ``open`` command with our offers; only in state IDLE."""
        self._check(State.IDLE, "open")
        offers = (f"relp_version={RELP_VERSION}\nrelp_software={SOFTWARE}\n"
                  f"commands=syslog").encode()
        frame = self._command("open", offers)
        self._move(State.OPENING)
        return frame

    def syslog(self, message: bytes) -> tuple[int, bytes]:
        """A ``syslog`` command carrying ``message``: its txnr and its bytes.

        Only once the session is open and while the window has room.
        """
        self._check(State.OPEN, "syslog")
        if not self.window_free:
            raise LocalProtocolError(f"the window of {self.window} outstanding commands is full")
        txnr = self._next_txnr
        frame = self._command("syslog", message)
        self._outstanding_syslogs += 1
        return txnr, frame

    def close(self) -> bytes:
        """The ``close`` command; no command may follow it."""
        self._check(State.OPEN, "close")
        frame = self._command("close", b"")
        self._move(State.CLOSING)
        return frame

    @property
    def window_free(self) -> int:
        """How many more ``syslog`` commands may be sent before an answer must come."""
        return self.window - self._outstanding_syslogs if self.state is State.OPEN else 0

    @property
    def outstanding(self) -> dict[int, str]:
        """Commands sent and not answered yet (txnr -> command name), oldest first."""
        return dict(self._outstanding)

    # -- the server's bytes (events out) -------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes read from the connection; return the events they complete.

        ``b""`` means the connection ended. Raises :class:`RemoteProtocolError` (and the session
        is BROKEN from then on) on anything RELP does not allow.
        """
        if self.state is State.BROKEN:
            raise RemoteProtocolError("the session is broken")
        if not data:
            if self._buffer:
                self._fail("connection ended inside a frame")
            if self.state is not State.CLOSED:
                self._move(State.CLOSED)
            return []
        self._buffer += data
        events: list[Event] = []
        while (frame := self._next_frame()) is not None:
            event = self._handle(*frame)
            if event is not None:
                events.append(event)
        return events

    # -- internals -----------------------------------------------------------------------------

    def _check(self, state: State, command: str) -> None:
        if self.state is not state:
            raise LocalProtocolError(f"cannot send {command!r} in state {self.state.value}")

    def _move(self, state: State) -> None:
        if state not in _MOVES[self.state]:
            raise LocalProtocolError(f"no move from {self.state.value} to {state.value}")
        self.state = state

    def _command(self, command: str, data: bytes) -> bytes:
        txnr = self._next_txnr
        self._next_txnr = 1 if txnr == TXNR_MAX else txnr + 1
        if txnr in self._outstanding:  # a billion commands behind: the window forbids it
            raise LocalProtocolError(f"txnr {txnr} is still outstanding")
        self._outstanding[txnr] = command
        if data:
            return b"%d %s %d %b\n" % (txnr, command.encode(), len(data), data)
        return b"%d %s 0\n" % (txnr, command.encode())

    def _fail(self, reason: str) -> NoReturn:
        self.state = State.BROKEN
        self._buffer.clear()
        raise RemoteProtocolError(reason)

    def _next_frame(self) -> tuple[int, str, bytes] | None:
        """The next complete frame in the buffer (txnr, command, data), or None for "need more"."""
        buffer = self._buffer
        # The header ends at the space after DATALEN, or at the LF when DATALEN is 0.
        first = buffer.find(b" ")
        second = buffer.find(b" ", first + 1) if first >= 0 else -1
        if second < 0:
            if len(buffer) > _MAX_HEADER:
                self._fail(f"no RELP header in {bytes(buffer[:_MAX_HEADER])!r}")
            return None
        end = second + 1
        while end < len(buffer) and 0x30 <= buffer[end] <= 0x39:
            end += 1
        if end == len(buffer):
            if end - second > 10 or end > _MAX_HEADER:
                self._fail(f"RELP header too long: {bytes(buffer[:_MAX_HEADER])!r}")
            return None
        txnr_text, command_text, length_text = (bytes(buffer[:first]),
                                                bytes(buffer[first + 1:second]),
                                                bytes(buffer[second + 1:end]))
        if not (_is_number(txnr_text) and _is_number(length_text)
                and 1 <= len(command_text) <= 32 and command_text.isalpha()):
            self._fail(f"malformed RELP header {bytes(buffer[:end + 1])!r}")
        txnr, length = int(txnr_text), int(length_text)
        if length > MAX_SERVER_FRAME:
            self._fail(f"RELP frame of {length} bytes is larger than {MAX_SERVER_FRAME}")
        if length == 0:
            if buffer[end] != 0x0A:
                self._fail(f"RELP frame without data must end after its header: "
                           f"{bytes(buffer[:end + 1])!r}")
            del buffer[:end + 1]
            return txnr, command_text.decode("ascii"), b""
        if buffer[end] != 0x20:
            self._fail(f"no space after RELP DATALEN: {bytes(buffer[:end + 1])!r}")
        if len(buffer) < end + 1 + length + 1:
            return None
        data = bytes(buffer[end + 1:end + 1 + length])
        if buffer[end + 1 + length] != 0x0A:
            self._fail(f"RELP frame {txnr} does not end with LF after {length} bytes of data")
        del buffer[:end + 1 + length + 1]
        return txnr, command_text.decode("ascii"), data

    def _handle(self, txnr: int, command: str, data: bytes) -> Event | None:
        if command == "serverclose":
            if txnr != 0:
                self._fail(f"serverclose must come with txnr 0, got {txnr}")
            if self.state in (State.OPEN, State.OPENING):
                self._move(State.CLOSING)
            return ServerClose()
        if command != "rsp":
            # Hints (txnr 0) we do not know are ignored, as the spec lets a client do; a
            # server never sends other commands.
            if txnr == 0:
                return None
            self._fail(f"unexpected RELP command {command!r} from the server")
        sent = self._outstanding.pop(txnr, None)
        if sent is None:
            self._fail(f"answer to txnr {txnr}, which is not outstanding")
        if sent == "syslog":
            self._outstanding_syslogs -= 1
        code, text, payload = _parse_rsp(data, sent)
        if code is None:
            self._fail(f"malformed answer to {sent!r} txnr {txnr}: {data[:80]!r}")
        if sent == "close":
            self._move(State.CLOSED)
            return Closed()
        if sent == "open":
            if code != 200:
                self._move(State.BROKEN)
                return Refused(txnr, sent, code, text)
            offers = _parse_offers(payload)
            if "relp_version" not in offers:
                self._fail("the server's open answer has no relp_version offer")
            if "syslog" not in offers.get("commands", "").split(","):
                self.state = State.BROKEN
                return Refused(txnr, sent, code, "the server does not offer the syslog command")
            if self.state is State.OPENING:
                self._move(State.OPEN)
            return Opened(offers)
        if code == 200:
            return Accepted(txnr)
        return Refused(txnr, sent, code, text)


def _is_number(text: bytes) -> bool:
    return 1 <= len(text) <= 9 and text.isdigit()


def _parse_rsp(data: bytes, command: str) -> tuple[int | None, str, bytes]:
    """``CODE [SP TEXT] [LF DATA]`` -> (code, text, data); code None if malformed.

    librelp answers ``close`` with no data at all: that is a 200.
    """
    if not data:
        return (200, "", b"") if command == "close" else (None, "", b"")
    line, _, payload = data.partition(b"\n")
    code_text, _, text = line.partition(b" ")
    if len(code_text) != 3 or not code_text.isdigit():
        return None, "", b""
    return int(code_text), text.decode("utf-8", "replace"), payload


def _parse_offers(payload: bytes) -> dict[str, str]:
    offers = {}
    for line in payload.decode("utf-8", "replace").split("\n"):
        if line:
            name, _, value = line.partition("=")
            offers[name.strip()] = value.strip()
    return offers
