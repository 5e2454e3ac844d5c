"""Syslog sink: RFC 5424 (default) or RFC 3164 messages over udp, tcp, tls, relp or unix datagrams.

Every record becomes one syslog message whose MSG part is the record's JSON. The framing is
written by hand (no library gets RFC 5424 right); the transports are in
:mod:`amid.sinks.syslog_transport`, RELP's protocol in :mod:`amid.sinks.relp`.

Transports, chosen by ``address``, and what each one's "delivered" means (``send`` returns only
once every message of the batch is delivered, else it raises SinkError and the runner retries):

* ``udp://host:port`` (default port 514): one datagram per record; delivered = the kernel took
  it (best effort: nothing acknowledges a datagram). A message longer than ``udp_max_bytes`` is
  cut on a UTF-8 character boundary and counted in ``stats.truncated_total``. An ICMP "port
  unreachable" for an earlier datagram fails the next ``send``.
* ``unix:///dev/log``: a unix datagram socket, like syslog(3). Same size limit as udp; a
  receiver that went away fails at once.
* ``tcp://host:port`` (514) and ``tls://host:port`` (6514): a stream with RFC 6587 octet-counting
  framing (``LEN SP MSG``) or, optionally, LF-terminated frames. TLS verifies the server by
  default. Delivered = the peer's TCP acknowledged every byte of the batch (Linux SIOCOUTQ; with
  TLS, the ciphertext of every message). If the connection breaks first, the messages the peer
  had acknowledged are known and are not sent again; the others are, on a new connection. What
  the receiver's kernel acknowledged but the receiver process never handled (it crashed with
  the bytes in its socket buffer or its memory) cannot be seen from here: plain syslog has no
  acknowledgement above TCP.
* ``relp://host:port`` and ``relp+tls://host:port`` (RELP in TLS from the first byte, as rsyslog's
  ``imrelp`` with ``tls="on"``): delivered = the receiver answered ``200 OK`` to the message's
  own ``syslog`` command (end to end). Unanswered messages are sent again on
  a new session; a message the receiver took whose answer was lost can arrive twice.

Like every sink, this one never queues (the SinkRunner does). A broken connection is dropped and
the next ``send`` opens a new one. A stream the peer has already closed (its FIN or RST is waiting
in the kernel) is noticed before anything is written to it and replaced at once, so an idle
connection that a server or firewall closed costs no failed batch.
"""

from __future__ import annotations

import asyncio
import fnmatch
import os
import socket
import ssl
import string
import time
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import pydantic

from amid._encode import format_iso_cached
from amid.ami.address import format_host
from amid.ami.tls import TlsSettings, client_context
from amid.records import Record
from amid.sinks.base import SinkError
from amid.sinks.syslog_transport import (
    IO_ERRORS,
    Channel,
    DatagramChannel,
    ReceiverRefused,
    RelpChannel,
    ServerClosed,
    StreamChannel,
    Wire,
    describe,
)
from amid.units import PositiveDuration, Size, TlsSetting

__all__ = [
    "FACILITIES",
    "SD_ID",
    "SEVERITIES",
    "Endpoint",
    "Formatter",
    "Options",
    "SyslogSink",
    "SyslogStats",
    "create",
    "format_rfc3164",
    "format_rfc5424",
    "frame_octet_counting",
    "parse_address",
    "truncate_utf8",
]

# RFC 5424 section 6.2.1, tables 1 and 2.
FACILITIES: dict[str, int] = {
    "kern": 0, "user": 1, "mail": 2, "daemon": 3, "auth": 4, "syslog": 5, "lpr": 6, "news": 7,
    "uucp": 8, "cron": 9, "authpriv": 10, "ftp": 11, "ntp": 12, "security": 13, "console": 14,
    "solaris-cron": 15, "local0": 16, "local1": 17, "local2": 18, "local3": 19, "local4": 20,
    "local5": 21, "local6": 22, "local7": 23,
}
SEVERITIES: dict[str, int] = {
    "emerg": 0, "alert": 1, "crit": 2, "err": 3, "warning": 4, "notice": 5, "info": 6, "debug": 7,
}
# Spellings people know from other tools, accepted in config and mapped to the RFC names.
_SEVERITY_ALIASES = {"emergency": "emerg", "critical": "crit", "error": "err", "warn": "warning",
                     "informational": "info"}

# Our SD-ID: a name "@" a private enterprise number, as RFC 5424 section 7.2.2 requires for
# non-IANA SD-IDs. 32473 is the PEN that RFC 5612 reserves for documentation and examples.
SD_ID = "amid@32473"

# RFC 5424 section 6: maximum lengths of the header fields.
HOSTNAME_MAX = 255
APP_NAME_MAX = 48
PROCID_MAX = 128
MSGID_MAX = 32
# RFC 3164 section 4.1.3: the TAG is at most 32 alphanumeric characters.
TAG_MAX = 32
NILVALUE = "-"

DEFAULT_PORTS = {"udp": 514, "tcp": 514, "tls": 6514}
RELP_TRANSPORTS = frozenset({"relp", "relp+tls"})
TLS_TRANSPORTS = frozenset({"tls", "relp+tls"})
# Largest UDP payload over IPv4 (65535 - 8 byte UDP header - 20 byte IP header).
UDP_PAYLOAD_MAX = 65507
# RFC 3164's month abbreviations: English whatever the process locale is (strftime's %b is not).
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_MSGID_FIELDS = frozenset({"event", "server"})


# -- options --------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where messages go: ``transport`` is an address scheme; ``path`` is for unix only."""

    transport: Literal["udp", "tcp", "tls", "relp", "relp+tls", "unix"]
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.transport == "unix":
            return f"unix://{self.path}"
        return f"{self.transport}://{format_host(self.host)}:{self.port}"


def parse_address(address: str) -> Endpoint:
    """Parse ``udp://host:port``, ``tcp://…``, ``tls://…``, ``relp://…``, ``relp+tls://…``, ``unix://…``.

    The port may be left out (514 for udp and tcp, 6514 for tls) except for relp, which has no
    well-known port; IPv6 hosts go in brackets. Raises ValueError.
    """
    parts = urllib.parse.urlsplit(address)
    scheme = parts.scheme.lower()
    if scheme == "unix":
        if parts.netloc or not parts.path.startswith("/"):
            raise ValueError(f"unix address needs an absolute path, e.g. unix:///dev/log, "
                             f"got {address!r}")
        return Endpoint("unix", path=parts.path)
    if scheme not in DEFAULT_PORTS and scheme not in RELP_TRANSPORTS:
        raise ValueError(f"address must start with udp://, tcp://, tls://, relp://, relp+tls:// "
                         f"or unix://, got {address!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ValueError(f"address must be {scheme}://host:port with nothing else, "
                         f"got {address!r}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"address has an invalid port: {address!r}") from None
    if not parts.hostname:
        raise ValueError(f"address has no host: {address!r}")
    if not port and scheme in RELP_TRANSPORTS:
        raise ValueError(f"relp address needs a port (RELP has no well-known one, rsyslog's "
                         f"examples use 2514 or 20514), got {address!r}")
    return Endpoint(scheme, host=parts.hostname, port=port or DEFAULT_PORTS[scheme])  # type: ignore[arg-type]


def _facility_code(value: str | int) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, int):
        if not 0 <= value <= 23:
            raise ValueError(f"facility number must be 0..23, got {value}")
        return value
    code = FACILITIES.get(value.strip().lower())
    if code is None:
        raise ValueError(f"unknown facility {value!r}; use one of {', '.join(FACILITIES)} "
                         f"or a number 0..23")
    return code


def _severity_code(value: str | int) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, int):
        if not 0 <= value <= 7:
            raise ValueError(f"severity number must be 0..7, got {value}")
        return value
    name = value.strip().lower()
    code = SEVERITIES.get(_SEVERITY_ALIASES.get(name, name))
    if code is None:
        raise ValueError(f"unknown severity {value!r}; use one of {', '.join(SEVERITIES)} "
                         f"or a number 0..7")
    return code


class Options(pydantic.BaseModel, extra="forbid", frozen=True, validate_default=True):
    """The syslog sink's own config keys. Facility and severities are numbers once validated."""

    address: str
    format: Literal["rfc5424", "rfc3164"] = "rfc5424"
    facility: int | str = "local0"
    severity: int | str = "info"
    # Event-name glob -> severity; the first matching glob wins (case-insensitive, like AMI names).
    severity_map: dict[str, int | str] = {}
    app_name: str = "amid"
    hostname: str | None = None
    msgid: str = "{event}"
    message: Literal["json"] = "json"
    structured_data: bool = True
    # RFC 5426: receivers must take 480 bytes and should take 2048; RFC 3164 allows 1024 at most.
    # Unset: 2048, or 1024 for rfc3164. Applies to unix datagrams too.
    udp_max_bytes: Annotated[Size, pydantic.Field(ge=480, le=UDP_PAYLOAD_MAX)] | None = None
    tcp_framing: Literal["octet-counting", "lf"] = "octet-counting"
    tls: TlsSetting = None  # {ca_file, verify, cert_file, key_file, server_hostname}, as servers'
    # The flat spellings (tls_server_name deprecated: tls: {server_hostname: …}).
    tls_ca_file: str | None = None
    tls_verify: bool = True
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_server_name: str | None = None
    # RELP: messages sent and not yet answered, at most (librelp's default window is 128).
    relp_window: Annotated[int, pydantic.Field(ge=1, le=10_000)] = 128
    connect_timeout: PositiveDuration = 5.0
    # Bounds one send: writing the batch and waiting for its confirmation (tcp/tls: the peer's
    # TCP acknowledgement; relp: the receiver's answers).
    send_timeout: PositiveDuration = 10.0

    @pydantic.field_validator("address")
    @classmethod
    def _check_address(cls, value: str) -> str:
        parse_address(value)
        return value

    @pydantic.field_validator("facility")
    @classmethod
    def _check_facility(cls, value: int | str) -> int:
        return _facility_code(value)

    @pydantic.field_validator("severity")
    @classmethod
    def _check_severity(cls, value: int | str) -> int:
        return _severity_code(value)

    @pydantic.field_validator("severity_map")
    @classmethod
    def _check_severity_map(cls, value: dict[str, int | str]) -> dict[str, int]:
        return {glob: _severity_code(severity) for glob, severity in value.items()}

    @pydantic.field_validator("msgid")
    @classmethod
    def _check_msgid(cls, value: str) -> str:
        try:
            fields = {name for _, name, _, _ in string.Formatter().parse(value) if name is not None}
        except ValueError as exc:
            raise ValueError(f"invalid msgid template {value!r}: {exc}") from None
        unknown = fields - _MSGID_FIELDS
        if unknown:
            raise ValueError(f"msgid template may use {{event}} and {{server}} only, "
                             f"got {', '.join('{' + f + '}' for f in sorted(unknown))}")
        return value

    @pydantic.model_validator(mode="after")
    def _check_transport_keys(self) -> Options:
        transport = parse_address(self.address).transport
        tls_keys = ("tls", "tls_ca_file", "tls_cert_file", "tls_key_file", "tls_server_name",
                    "tls_verify")
        flat = [key for key in tls_keys[1:] if key in self.model_fields_set]
        if self.tls is not None and flat:
            raise ValueError(f"give TLS settings once: tls: {{…}} or {', '.join(flat)}")
        if transport not in TLS_TRANSPORTS:
            misplaced = [key for key in tls_keys if key in self.model_fields_set]
            if misplaced:
                raise ValueError(f"{', '.join(misplaced)} only apply to a tls:// or relp+tls:// "
                                 f"address")
        if transport not in ("tcp", "tls") and "tcp_framing" in self.model_fields_set:
            raise ValueError("tcp_framing only applies to a tcp:// or tls:// address")
        if transport not in RELP_TRANSPORTS and "relp_window" in self.model_fields_set:
            raise ValueError("relp_window only applies to a relp:// or relp+tls:// address")
        if self.tls_key_file and not self.tls_cert_file:
            raise ValueError("tls_key_file needs tls_cert_file")
        if self.udp_max_bytes is None:
            default = 1024 if self.format == "rfc3164" else 2048
            object.__setattr__(self, "udp_max_bytes", default)  # frozen: set once, here
        return self

    @property
    def tls_settings(self) -> TlsSettings:
        """The TLS settings, from ``tls:`` or the flat ``tls_*`` keys."""
        if self.tls is not None:
            return self.tls.settings
        return TlsSettings(ca_file=self.tls_ca_file, verify=self.tls_verify,
                           cert_file=self.tls_cert_file, key_file=self.tls_key_file,
                           server_hostname=self.tls_server_name)

    def deprecations(self) -> list[str]:
        """Old spellings used (see amid.units.DeprecatedKeys)."""
        if "tls_server_name" in self.model_fields_set:
            return ["tls_server_name is deprecated: use tls: {server_hostname: …}"]
        return []

    @property
    def endpoint(self) -> Endpoint:
        """``address``, parsed."""
        return parse_address(self.address)


# -- formatting (pure) ----------------------------------------------------------------------------

def severity_for(event: str, opts: Options) -> int:
    """The severity code for an event name: the first matching ``severity_map`` glob, else default."""
    folded = event.casefold()
    for glob, severity in opts.severity_map.items():
        if fnmatch.fnmatchcase(folded, glob.casefold()):
            return int(severity)
    return int(opts.severity)


def _priority(name: str, opts: Options) -> int:
    return int(opts.facility) * 8 + severity_for(name, opts)


def _header_field(value: str | None, max_len: int) -> str:
    """An RFC 5424 header field: PRINTUSASCII only (others become ``_``), cut to ``max_len``.

    Replacing rather than dropping keeps the field's length and shape recognisable; a space or
    control character inside a header field would otherwise shift every field after it.
    """
    if not value:
        return NILVALUE
    cleaned = "".join(ch if "!" <= ch <= "~" else "_" for ch in value[:max_len])
    return cleaned or NILVALUE


def _sd_param_value(value: str) -> str:
    """RFC 5424 section 6.3.3: inside PARAM-VALUE, ``"``, ``\\`` and ``]`` are backslash-escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def _rfc3164_timestamp(ts: float) -> str:
    """``Mmm dd hh:mm:ss`` in UTC, the day padded with a space (RFC 3164 section 4.1.2).

    RFC 3164 has no time zone; UTC is the one reading that does not depend on where, or in which
    DST period, the receiver happens to be.
    """
    t = time.gmtime(int(ts))
    return f"{_MONTHS[t.tm_mon - 1]} {t.tm_mday:>2} {t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}"


def _tag(app_name: str) -> str:
    tag = "".join(ch for ch in app_name if ch.isascii() and ch.isalnum())[:TAG_MAX]
    return tag or "amid"


_MAX_CACHED_PAIRS = 4096  # event names come from the wire: bound what is remembered


class Formatter:
    """Formats the records of one sink as syslog messages (without transport framing).

    Everything but the timestamp, the sequence number and the id depends only on the options,
    the event name and the server, so it is built once per (event name, server) pair and
    remembered (a bounded cache): a message then costs a few string joins.
    """

    def __init__(self, opts: Options, *, hostname: str, procid: int | str | None = None) -> None:
        self.opts = opts
        self._host = _header_field(hostname, HOSTNAME_MAX)
        self._procid = _header_field(None if procid is None else str(procid), PROCID_MAX)
        self._app = _header_field(opts.app_name, APP_NAME_MAX)
        self._pid_3164 = f"[{self._procid}]" if procid is not None else ""
        self._tag = _tag(opts.app_name)
        self._parts: dict[tuple[str, str], tuple[str, str, str]] = {}
        self.format = self._rfc5424 if opts.format == "rfc5424" else self._rfc3164

    def _parts_for(self, name: str, server: str) -> tuple[str, str, str]:
        key = (name, server)
        parts = self._parts.get(key)
        if parts is None:
            opts = self.opts
            pri = _priority(name, opts)
            if opts.format == "rfc5424":
                msgid = _header_field(opts.msgid.format_map({"event": name, "server": server}),
                                      MSGID_MAX)
                parts = (f"<{pri}>1 ", f" {self._host} {self._app} {self._procid} {msgid} ",
                         f'[{SD_ID} server="{_sd_param_value(server)}"')
            else:
                parts = (f"<{pri}>", f" {self._host} {self._tag}{self._pid_3164}: ", "")
            if len(self._parts) < _MAX_CACHED_PAIRS:
                self._parts[key] = parts
        return parts

    def _rfc5424(self, record: Record) -> bytes:
        pri, middle, sd_start = self._parts_for(record.name, record.server)
        if self.opts.structured_data:
            seq = record.seq
            seq_param = f' seq="{seq}"' if seq is not None else ""
            sd = f'{sd_start}{seq_param} id="{_sd_param_value(record.id)}"]'
        else:
            sd = NILVALUE
        header = f"{pri}{format_iso_cached(record.received_at)}{middle}{sd} "
        return header.encode("utf-8") + record.json

    def _rfc3164(self, record: Record) -> bytes:
        pri, rest, _ = self._parts_for(record.name, record.server)
        head = f"{pri}{_rfc3164_timestamp(record.received_at)}{rest}"
        return head.encode("ascii") + record.json


def format_rfc5424(record: Record, opts: Options, *, hostname: str,
                   procid: int | str | None = None) -> bytes:
    """One RFC 5424 message (without transport framing) for ``record``.

    ``<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID [amid@32473 …] JSON``. The timestamp is the
    record's receive time in UTC with microseconds. Header fields are PRINTUSASCII, cut to the RFC
    limits, and ``-`` when empty. The MSG is the record JSON without a BOM: RFC 5424 allows
    MSG-ANY, and consumers that parse the JSON would trip over one.
    """
    return Formatter(opts.model_copy(update={"format": "rfc5424"}), hostname=hostname,
                     procid=procid).format(record)


def format_rfc3164(record: Record, opts: Options, *, hostname: str,
                   procid: int | str | None = None) -> bytes:
    """One RFC 3164 (BSD syslog) message: ``<PRI>Mmm dd hh:mm:ss HOSTNAME TAG[PID]: JSON``.

    TAG is the app name reduced to at most 32 ASCII alphanumerics; ``[PID]`` is the conventional
    start of CONTENT that receivers (rsyslog, syslog-ng) parse as the process id.
    """
    return Formatter(opts.model_copy(update={"format": "rfc3164"}), hostname=hostname,
                     procid=procid).format(record)


def truncate_utf8(data: bytes, limit: int) -> bytes:
    """``data`` cut to at most ``limit`` bytes without splitting a UTF-8 character.

    Valid UTF-8 in, valid UTF-8 out: the cut moves back over continuation bytes (``10xxxxxx``)
    to the start of the character it would have split.
    """
    if len(data) <= limit:
        return data
    cut = limit
    while cut > 0 and (data[cut] & 0xC0) == 0x80:
        cut -= 1
    return data[:cut]


def frame_octet_counting(message: bytes) -> bytes:
    """RFC 6587 section 3.4.1 octet-counting frame: ``MSG-LEN SP SYSLOG-MSG``."""
    return b"%d %b" % (len(message), message)


def frame_lf(message: bytes) -> bytes:
    """RFC 6587 section 3.4.2 non-transparent frame: the message and a LF.

    The record JSON never holds a raw LF, but a header or SD value could (e.g. a server name),
    and a LF there would split the frame in two, so any LF becomes a space.
    """
    return message.replace(b"\n", b" ") + b"\n"


# -- stats ----------------------------------------------------------------------------------------

@dataclass(slots=True)
class SyslogStats:
    """The sink's own counters, exported through :meth:`SyslogSink.sink_counters` and
    :attr:`SyslogSink.truncated_total` (what it sent is the runner's ``amid_sink_sent_*``).

    * ``messages_total``: messages confirmed in the transport's sense (see the module docstring),
      each counted once, including those confirmed by an attempt that failed later on.
    * ``truncated_total``: datagrams cut to ``udp_max_bytes``.
    * ``reconnects_total``: connections opened after the first one; ``connect_failures_total``:
      connection attempts that failed.
    * ``resent_total``: records sent again because the attempt that carried them failed before
      they were confirmed (tcp/tls: the peer's TCP had not acknowledged them; relp: no ``200``).
      Only these can arrive twice, and only if the receiver got them without the confirmation
      reaching us.
    * ``confirmed_not_resent_total``: records of a failed attempt that had been confirmed all the
      same (tcp/tls: acknowledged before the reset; relp: answered 200), and so were left out
      when the batch was retried.
    * ``refused_total``: RELP commands the receiver answered with an error code (e.g. 500);
      ``server_closes_total``: RELP sessions the receiver ended while a batch was in flight.
    """

    messages_total: int = 0
    truncated_total: int = 0
    reconnects_total: int = 0
    connect_failures_total: int = 0
    resent_total: int = 0
    confirmed_not_resent_total: int = 0
    refused_total: int = 0
    server_closes_total: int = 0


# -- the sink -------------------------------------------------------------------------------------

class SyslogSink:
    """Delivers records as syslog messages. Build it with :func:`create`."""

    def __init__(self, name: str, options: Options, *, hostname: str | None = None,
                 procid: int | None = None) -> None:
        self.name = name
        self.options = options
        self.stats = SyslogStats()
        self._endpoint = options.endpoint
        self._hostname = hostname or options.hostname or socket.gethostname()
        self._procid = os.getpid() if procid is None else procid
        self._format = Formatter(options, hostname=self._hostname, procid=self._procid).format
        self._ssl = (_client_ssl_context(options) if self._endpoint.transport in TLS_TRANSPORTS
                     else None)
        self._channel: Channel | None = None
        self._connected_once = False
        self._closed = False
        # Of the last attempt that failed, by record id: what was confirmed all the same (left
        # out when the runner retries the batch) and what was not (counted as re-sent then).
        self._confirmed_ids: set[str] = set()
        self._fresh_confirmed_ids: set[str] = set()  # by the very last attempt
        self._unconfirmed_ids: set[str] = set()
        # One batch at a time on the wire: frames of two batches must never interleave.
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"SyslogSink(name={self.name!r}, address={str(self._endpoint)!r})"

    @property
    def truncated_total(self) -> int:
        """Messages cut to ``udp_max_bytes`` (:class:`~amid.sinks.base.ReportsTruncation`)."""
        return self.stats.truncated_total

    def sink_counters(self) -> dict[str, int]:
        """:class:`~amid.sinks.base.ReportsCounters`: ``amid_sink_operations_total``."""
        stats = self.stats
        return {"confirmed": stats.messages_total,
                "reconnect": stats.reconnects_total, "connect_failure": stats.connect_failures_total,
                "resend": stats.resent_total, "confirmed_not_resent": stats.confirmed_not_resent_total,
                "refused": stats.refused_total, "server_close": stats.server_closes_total}

    async def start(self) -> None:
        """Open the socket (resolving and connecting); raise SinkError if that fails."""
        async with self._lock:
            self._check_open()
            await self._ensure_channel()

    async def send(self, batch: Sequence[Record]) -> None:
        """Send one message per record, in order; return once all of them are delivered.

        Delivered means, by transport: udp/unix, the kernel took the datagram; tcp/tls, the
        peer's TCP acknowledged every byte (Linux; elsewhere, the kernel took them); relp, the
        receiver answered 200 to every message. Raises SinkError if the connection cannot be
        opened, breaks, or the confirmation does not come within ``send_timeout``; the
        connection is then dropped and the next call opens a new one. Records of a failed
        attempt that were confirmed all the same are not sent again when the same records
        come back (the runner's retry).
        """
        if not batch:
            return
        async with self._lock:
            self._check_open()
            records = self._not_yet_confirmed(batch)
            if not records:  # a failed attempt had delivered all of them after all
                self._confirmed_ids = set()
                return
            messages = [self._format(record) for record in records]
            payloads = [self._frame(message) for message in messages]
            channel = await self._ensure_channel()
            try:
                async with asyncio.timeout(self.options.send_timeout):
                    await channel.send(payloads)
            except IO_ERRORS as exc:
                # A partly written frame would corrupt the stream: this connection is finished.
                self._note_failed_attempt(records, messages, payloads, channel.confirmed, exc)
                self._drop_channel()
                what = "timed out" if isinstance(exc, TimeoutError) else describe(exc)
                confirmed = len(channel.confirmed)
                raise SinkError(
                    f"syslog sink {self.name!r}: sending to {self._endpoint} failed: {what} "
                    f"({confirmed} of {len(records)} messages confirmed; the rest will be sent "
                    f"again)") from exc
            except asyncio.CancelledError:
                # Abandoned (the runner's attempt_timeout, shutdown): the runner sends the batch
                # again, on a new connection; the rest of it must not follow on this one.
                self._note_failed_attempt(records, messages, payloads, channel.confirmed, None)
                self._drop_channel()
                raise
            self._confirmed_ids = set()
            # Counted once a message is delivered, not per attempt; framing only ever adds bytes.
            self.stats.messages_total += len(payloads)
            self.stats.truncated_total += sum(len(p) < len(m) for p, m in zip(payloads, messages, strict=False))

    async def close(self) -> None:
        """Close the connection (a RELP session with ``close``). Idempotent; safe before start."""
        self._closed = True
        channel, self._channel = self._channel, None
        if channel is None:
            return
        try:
            async with asyncio.timeout(self.options.send_timeout):
                await channel.close()
        except IO_ERRORS:
            channel.abort()
        except BaseException:  # cancelled by the caller's tighter bound (a reload): abort anyway
            channel.abort()
            raise

    # -- internals ----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise SinkError(f"syslog sink {self.name!r} is closed")

    def _not_yet_confirmed(self, batch: Sequence[Record]) -> list[Record]:
        """``batch`` without the records earlier failed attempts delivered all the same."""
        confirmed, self._confirmed_ids = self._confirmed_ids, set()
        fresh, self._fresh_confirmed_ids = self._fresh_confirmed_ids, set()
        unconfirmed, self._unconfirmed_ids = self._unconfirmed_ids, set()
        if not confirmed:
            records = list(batch)
        else:
            records = [r for r in batch if r.id not in confirmed]
            # Carried over while the same records keep coming back (the runner's retries).
            self._confirmed_ids = {r.id for r in batch if r.id in confirmed}
            self.stats.confirmed_not_resent_total += sum(1 for r in batch if r.id in fresh)
        if unconfirmed:
            self.stats.resent_total += sum(1 for r in records if r.id in unconfirmed)
        return records

    def _note_failed_attempt(self, records: Sequence[Record], messages: Sequence[bytes],
                             payloads: Sequence[bytes], confirmed: frozenset[int],
                             exc: BaseException | None) -> None:
        self._fresh_confirmed_ids = {records[i].id for i in confirmed}
        self._confirmed_ids |= self._fresh_confirmed_ids
        self._unconfirmed_ids = {r.id for i, r in enumerate(records) if i not in confirmed}
        self._count_delivered(messages, payloads, confirmed)
        if isinstance(exc, ReceiverRefused):
            self.stats.refused_total += 1
        elif isinstance(exc, ServerClosed):
            self.stats.server_closes_total += 1

    def _count_delivered(self, messages: Sequence[bytes], payloads: Sequence[bytes],
                         indices: Iterable[int]) -> None:
        stats = self.stats
        for i in indices:
            stats.messages_total += 1
            stats.truncated_total += len(payloads[i]) < len(messages[i])

    def _frame(self, message: bytes) -> bytes:
        transport = self._endpoint.transport
        if transport in ("udp", "unix"):
            # udp_max_bytes is never None once Options validated (its format sets the default)
            return truncate_utf8(message, self.options.udp_max_bytes)  # type: ignore[arg-type]
        if transport in RELP_TRANSPORTS:
            return message  # RELP frames count their own bytes
        if self.options.tcp_framing == "lf":
            return frame_lf(message)
        return frame_octet_counting(message)

    async def _ensure_channel(self) -> Channel:
        channel = self._channel
        if channel is not None and not channel.is_stale():
            return channel
        if channel is not None:
            self._drop_channel()
        try:
            async with asyncio.timeout(self.options.connect_timeout):
                channel = await self._connect()
        except IO_ERRORS as exc:
            self.stats.connect_failures_total += 1
            what = "timed out" if isinstance(exc, TimeoutError) else describe(exc)
            raise SinkError(f"syslog sink {self.name!r}: cannot connect to {self._endpoint}: "
                            f"{what}") from exc
        if self._connected_once:
            self.stats.reconnects_total += 1
        self._connected_once = True
        self._channel = channel
        return channel

    async def _connect(self) -> Channel:
        loop = asyncio.get_running_loop()
        ep = self._endpoint
        if ep.transport in ("udp", "unix"):
            address: Any
            if ep.transport == "unix":
                family, address = socket.AF_UNIX, ep.path
            else:
                infos = await loop.getaddrinfo(ep.host, ep.port, type=socket.SOCK_DGRAM)
                family, address = infos[0][0], infos[0][4]
            sock = socket.socket(family, socket.SOCK_DGRAM)
            try:
                sock.setblocking(False)
                # Immediate for datagram sockets; a unix path nobody listens on fails here.
                await loop.sock_connect(sock, address)
            except BaseException:
                sock.close()
                raise
            return DatagramChannel(sock)
        wire = await Wire.connect(ep.host, ep.port, ssl_context=self._ssl,
                                  server_hostname=self.options.tls_settings.server_hostname or ep.host)
        if ep.transport not in RELP_TRANSPORTS:
            return StreamChannel(wire)
        try:
            return await RelpChannel.open(wire, window=self.options.relp_window)
        except BaseException:
            wire.close()
            raise

    def _drop_channel(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            channel.abort()


def _client_ssl_context(options: Options) -> ssl.SSLContext:
    """A client TLS context: system CAs (or the CA file), verification on unless disabled."""
    return client_context(options.tls_settings)


def create(name: str, options: Options | Mapping[str, Any]) -> SyslogSink:
    """The factory the daemon uses: a sink named ``name`` (not yet started).

    ``options`` is an :class:`Options` or the raw mapping of the sink's config keys (validated
    here, raising pydantic's ValidationError). TLS files are read here, so a missing CA file or
    key fails at startup (OSError / ssl.SSLError), not at the first send.
    """
    if not isinstance(options, Options):
        options = Options.model_validate(options)
    return SyslogSink(name, options)
