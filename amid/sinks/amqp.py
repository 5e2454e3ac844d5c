"""AMQP 0-9-1 sink (RabbitMQ): each record published to an exchange with publisher confirms.

One ``send`` publishes every record of the batch at once (pipelined: all in flight, then all
confirms awaited) and returns only once the broker confirmed each one, so a record leaves the
queue or the spool only once RabbitMQ has it (persistent delivery: on disk in a durable queue).

Each message: the record's JSON as the body, ``content_type`` ``application/json``,
``delivery_mode`` 2 (persistent), ``message_id`` = the record id (consumers de-duplicate on it),
headers ``server`` and ``event`` (a headers exchange can route on them), routing key from
``routing_key`` (default ``ami.{server}.{event}``, each value made one safe topic word).

What the broker answers, per record:

==========================================  ===================================================
broker answer                               what the sink does
==========================================  ===================================================
ack                                         confirmed
returned (``mandatory``: no queue bound)    confirmed by the broker, counted as ``unroutable``
                                            and logged (at most every 10 s): nothing bound
                                            means nobody wanted it; an alternate exchange on
                                            the exchange keeps such records instead
nack (e.g. a full queue with                counted as ``nacked``; the batch fails (SinkError),
``x-overflow: reject-publish``)             the runner retries it with backoff; after
                                            ``refused_attempts`` attempts in a row with nacks
                                            the batch is dead-lettered (SinkRejected)
connection or channel lost, timeout         SinkError: the runner retries; the next send
                                            reconnects
==========================================  ===================================================

A retry re-publishes only the records the broker has not confirmed yet (see
:class:`~amid.sinks.broker.ConfirmedIds`); duplicates then come only from publishes whose confirm
was lost with the connection (and from a restart after ``kill -9``), and carry the same
``message_id``.

The exchange is declared passively by default (it must exist: amid changes nothing on the
broker); with ``exchange_type`` set it is declared (durable) if missing. The url's password and
``password`` never appear in logs, errors or metrics.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

import pydantic

from amid.records import Record
from amid.sinks.base import SinkError, SinkRejected
from amid.sinks.broker import (
    BrokerSink,
    TopicNames,
    check_template,
    invalid,
    missing_library,
    redact_url,
    tls_context,
)
from amid.units import PositiveDuration

if TYPE_CHECKING:
    import aio_pika.abc
    import aiormq.abc

__all__ = ["AmqpSink", "Options", "create"]

log = logging.getLogger("amid.sinks.amqp")

OUTCOMES = ("unroutable", "nacked")
CONTENT_TYPE = "application/json"
_MAX_ROUTING_KEY_BYTES = 255     # AMQP shortstr
_UNROUTABLE_LOG_INTERVAL = 10.0  # seconds between warnings about returned records
# What _publish_pipelined uses of an aiormq channel (present since aiormq 6); without them the
# sink falls back to one basic_publish per record.
_PIPELINE_INTERNALS = frozenset({"confirmations", "message_id_delivery_tag", "delivery_tag",
                                 "write_queue", "max_content_size", "number"})


class Options(pydantic.BaseModel):
    """The ``amqp`` sink's own config keys."""

    model_config = pydantic.ConfigDict(extra="forbid", hide_input_in_errors=True)

    # Not in repr: the url may carry user:password.
    url: str = pydantic.Field("amqp://127.0.0.1:5672/", repr=False)
    username: str | None = None
    password: pydantic.SecretStr | None = None   # or password_file (read by the config loader)
    exchange: str = "amq.topic"
    exchange_type: Literal["topic", "direct", "fanout", "headers"] | None = None
    routing_key: str = "ami.{server}.{event}"
    mandatory: bool = True
    persistent: bool = True
    connect_timeout: PositiveDuration = 10.0
    confirm_timeout: PositiveDuration = 30.0   # for the confirms of one whole batch
    heartbeat: int = pydantic.Field(30, ge=0, le=65535)  # seconds; 0 turns heartbeats off
    refused_attempts: int = pydantic.Field(5, ge=1)
    tls_verify: bool = True
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None

    @pydantic.field_validator("url")
    @classmethod
    def _check_url(cls, url: str) -> str:
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            raise invalid("the url is not valid (bad port?)") from None
        if parts.scheme not in ("amqp", "amqps"):
            raise invalid("the url must start with amqp:// or amqps://")
        if not parts.hostname:
            raise invalid("the url has no host")
        return url

    @pydantic.field_validator("routing_key")
    @classmethod
    def _check_routing_key(cls, template: str) -> str:
        try:
            return check_template(template)
        except ValueError as exc:
            raise invalid(str(exc)) from None

    @pydantic.model_validator(mode="after")
    def _check_combinations(self) -> Options:
        why = missing_library("aio_pika", "amqp", "amqp")
        if why is not None:
            raise invalid(why, field="type")
        tls_keys = [k for k in ("tls_ca_file", "tls_cert_file", "tls_key_file")
                    if getattr(self, k) is not None]
        if tls_keys and urlsplit(self.url).scheme != "amqps":
            raise invalid(f"{tls_keys[0]} needs an amqps:// url", field=tls_keys[0])
        if self.tls_key_file is not None and self.tls_cert_file is None:
            raise invalid("tls_key_file needs tls_cert_file", field="tls_key_file")
        if self.password is not None and urlsplit(self.url).password is not None:
            raise invalid("a password in the url and a password key: choose one", field="password")
        if self.exchange == "" and self.exchange_type is not None:
            raise invalid("the default exchange (\"\") cannot be declared", field="exchange_type")
        return self


_FRAME = struct.Struct(">BHI")           # frame type, channel, payload size
_HEADER_HEAD = struct.Struct(">HHQH")    # class id, weight, body size, property flags
_FRAME_END = b"\xce"
_BASIC_CLASS, _PUBLISH_METHOD = 60, 40
# Properties sent: content_type, headers, delivery_mode, message_id (bits 15, 13, 12, 7).
_PROPERTY_FLAGS = 0x8000 | 0x2000 | 0x1000 | 0x0080


def _shortstr(text: str) -> bytes:
    raw = text.encode("utf-8")
    if len(raw) > 255:
        raise ValueError(f"longer than 255 bytes: {text[:40]!r}...")
    return bytes((len(raw),)) + raw


def _longstr(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack(">I", len(raw)) + raw


class PublishEncoder:
    """The AMQP frames of one publish (method, content header, body), encoded directly.

    pamqp encodes the same frames (tests compare the bytes) at several times the cost; at tens
    of thousands of records a second that cost is most of the sink's CPU. What only depends on
    the server and event (method frame, headers table) is encoded once per pair.
    """

    def __init__(self, channel_number: int, *, exchange: str, names: TopicNames,
                 mandatory: bool, persistent: bool, max_content_size: int) -> None:
        self.channel_number = channel_number
        self._exchange = _shortstr(exchange)
        self._names = names
        self._mandatory = b"\x01" if mandatory else b"\x00"
        self._delivery_mode = b"\x02" if persistent else b"\x01"
        self._max_content_size = max_content_size
        self._per_pair: dict[tuple[str, str], tuple[bytes, bytes]] = {}

    def _pair(self, record: Record) -> tuple[bytes, bytes]:
        key = (record.server, record.name)
        pair = self._per_pair.get(key)
        if pair is None:
            method = (struct.pack(">HHH", _BASIC_CLASS, _PUBLISH_METHOD, 0) + self._exchange
                      + _shortstr(self._names.of(record)) + self._mandatory)
            table = b"".join(_shortstr(name) + b"S" + _longstr(value)
                             for name, value in sorted({"event": record.name,
                                                        "server": record.server}.items()))
            properties = (_shortstr(CONTENT_TYPE) + struct.pack(">I", len(table)) + table
                          + self._delivery_mode)
            pair = (_FRAME.pack(1, self.channel_number, len(method)) + method + _FRAME_END,
                    properties)
            if len(self._per_pair) >= 4096:
                self._per_pair.clear()
            self._per_pair[key] = pair
        return pair

    def frames(self, record: Record) -> bytes:
        """Method, content header and body frames of ``record``, concatenated."""
        method_frame, properties = self._pair(record)
        body = record.json
        header = (_HEADER_HEAD.pack(_BASIC_CLASS, 0, len(body), _PROPERTY_FLAGS) + properties
                  + _shortstr(record.id))
        parts = [method_frame, _FRAME.pack(2, self.channel_number, len(header)), header,
                 _FRAME_END]
        step = self._max_content_size
        for start in range(0, len(body), step):
            chunk = body[start:start + step]
            parts += (_FRAME.pack(3, self.channel_number, len(chunk)), chunk, _FRAME_END)
        return b"".join(parts)


class AmqpSink(BrokerSink):
    """Publishes batches over one connection and one confirm-mode channel."""

    kind = "amqp"
    outcome_names = OUTCOMES

    def __init__(self, name: str, options: Options) -> None:
        super().__init__(name, options.connect_timeout, [
            urlsplit(options.url).password or "",
            options.password.get_secret_value() if options.password else ""])
        self._options = options
        self._endpoint = redact_url(options.url)
        self._names = TopicNames(options.routing_key, max_bytes=_MAX_ROUTING_KEY_BYTES)
        self._unroutable_unlogged = 0
        self._unroutable_example = ""
        self._unroutable_logged_at = -_UNROUTABLE_LOG_INTERVAL
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self._channel: aiormq.abc.AbstractChannel | None = None
        self._encoder: PublishEncoder | None = None
        self._ssl: Any = None

    def __repr__(self) -> str:
        return f"AmqpSink(name={self.name!r}, url={self._endpoint!r}, state={self._state.value})"

    # -- connection ----------------------------------------------------------------------

    async def _prepare(self) -> None:
        """TLS files (``amqps://``); then :meth:`_connect` opens a confirm-mode channel and
        checks (or declares) the exchange."""
        if urlsplit(self._options.url).scheme == "amqps" and self._ssl is None:
            options = self._options
            try:
                # Reads CA and key files from disk: keep it off the event loop.
                self._ssl = await asyncio.to_thread(
                    tls_context, verify=options.tls_verify, ca_file=options.tls_ca_file,
                    cert_file=options.tls_cert_file, key_file=options.tls_key_file)
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                raise SinkError(f"amqp {self.name}: cannot load TLS files: {exc}") from None
            if not options.tls_verify:
                log.warning("amqp sink %s: TLS certificate verification is OFF for %s",
                            self.name, self._endpoint, extra={"sink": self.name})

    def _url(self) -> Any:
        # aio-pika's own url type (yarl: a dependency of aio-pika and of aiohttp)
        from yarl import URL
        url = URL(self._options.url)
        if self._options.username is not None:
            url = url.with_user(self._options.username)
        if self._options.password is not None:
            url = url.with_password(self._options.password.get_secret_value())
        return url.update_query(heartbeat=self._options.heartbeat, name=f"amid:{self.name}")

    async def _connect(self) -> None:
        try:
            import aio_pika
        except ImportError:
            raise SinkError(missing_library("aio_pika", "amqp", "amqp")
                            or "aio_pika cannot be imported") from None
        options = self._options
        connection = None
        try:
            async with asyncio.timeout(options.connect_timeout):
                connection = await aio_pika.connect(self._url(), ssl_context=self._ssl,
                                                    timeout=options.connect_timeout)
                channel = await connection.channel(publisher_confirms=True,
                                                   on_return_raises=False)
                if options.exchange:
                    await channel.declare_exchange(
                        options.exchange, options.exchange_type or "topic",
                        passive=options.exchange_type is None, durable=True)
                self._channel = await channel.get_underlay_channel()
        except BaseException as exc:
            if connection is not None:
                await self._close_quietly(connection)
            if not isinstance(exc, Exception):
                raise
            raise SinkError(self._connect_error(exc)) from None
        self._connection = connection
        log.info("amqp sink %s: connected to %s, exchange %r", self.name, self._endpoint,
                 options.exchange, extra={"sink": self.name})

    def _connect_error(self, exc: Exception) -> str:
        from aiormq.exceptions import ChannelNotFoundEntity
        text = self._describe(exc)
        if isinstance(exc, ChannelNotFoundEntity):
            text = (f"exchange {self._options.exchange!r} does not exist on {self._endpoint} (it is "
                    f"declared passively: create it, or set exchange_type to declare it): {text}")
        elif isinstance(exc, TimeoutError):
            text = f"no answer from {self._endpoint} within {self._options.connect_timeout:g}s"
        return f"amqp {self.name}: cannot connect to {self._endpoint}: {text}"

    def _connected(self) -> bool:
        connection, channel = self._connection, self._channel
        return (connection is not None and not connection.is_closed
                and channel is not None and not channel.is_closed)

    def _take_connection(self) -> Any:
        connection, self._connection, self._channel = self._connection, None, None
        return connection

    # -- publishing ----------------------------------------------------------------------

    async def _publish_all(self, records: list[Record]) -> list[Any]:
        """Publish ``records`` and wait for every confirm; the broker's answer per record (an
        ack, a returned message, or the exception the publish ended with)."""
        channel = self._channel
        assert channel is not None
        options = self._options
        try:
            async with asyncio.timeout(options.confirm_timeout):
                # Every publish is written before the first confirm is awaited: one round trip
                # per batch, not per record.
                if _PIPELINE_INTERNALS.issubset(vars(channel)):
                    return await self._publish_pipelined(channel, records)
                return await asyncio.gather(
                    *(self._publish_one(channel, record) for record in records),
                    return_exceptions=True)
        except TimeoutError:
            # Confirms that never came leave the channel in an unknown state: start afresh.
            await self._drop_connection()
            raise SinkError(f"amqp {self.name}: no confirm for {len(records)} records within "
                            f"confirm_timeout ({options.confirm_timeout:g}s)") from None

    async def _publish_one(self, channel: aiormq.abc.AbstractChannel, record: Record) -> Any:
        """The library's own publish, one record at a time (used if its internals differ from
        what :meth:`_publish_pipelined` expects)."""
        from aiormq import spec
        options = self._options
        return await channel.basic_publish(
            record.json, exchange=options.exchange, routing_key=self._names.of(record),
            mandatory=options.mandatory, properties=spec.Basic.Properties(
                content_type=CONTENT_TYPE, delivery_mode=2 if options.persistent else 1,
                message_id=record.id, headers={"event": record.name, "server": record.server}))

    async def _publish_pipelined(self, channel: Any, records: list[Record]) -> list[Any]:
        """Write the whole batch as one frame sequence (one socket write, not one per record),
        registering each confirm the way aiormq's ``basic_publish`` does."""
        from aiormq.abc import ChannelFrame
        encoder = self._encoder
        if encoder is None or encoder.channel_number != channel.number:
            encoder = self._encoder = PublishEncoder(
                channel.number, exchange=self._options.exchange, names=self._names,
                mandatory=self._options.mandatory, persistent=self._options.persistent,
                max_content_size=channel.max_content_size)
        frames = bytearray()
        confirms: list[asyncio.Future[Any]] = []
        by_message_id = channel.message_id_delivery_tag
        for record in records:
            frames += encoder.frames(record)
        async with channel.lock:  # no other publish may take delivery tags in between
            # The write queue is bounded: wait for room first. Cancelled there, nothing was
            # queued and no tag taken; once it is queued, the tags are taken with no await in
            # between, before the writer task can send a byte of it.
            await channel.write_queue.put(ChannelFrame(payload=bytes(frames), should_close=False))
            for record in records:
                channel.delivery_tag += 1
                confirm = channel.create_future()
                channel.confirmations[channel.delivery_tag] = confirm
                by_message_id[record.id] = channel.delivery_tag  # a return names the message id
                confirms.append(confirm)
        try:
            await asyncio.wait(confirms)
        finally:
            for record in records:
                by_message_id.pop(record.id, None)
            for confirm in confirms:
                confirm.cancel()  # no-op once done; a timeout or cancel leaves none behind
        return [_answer(confirm) for confirm in confirms]

    def _settle(self, records: list[Record], results: list[Any]) -> None:
        """Sort the broker's answers; raise unless every record was confirmed."""
        from aiormq import spec
        from aiormq.abc import DeliveredMessage
        from aiormq.exceptions import DeliveryError
        confirmed: list[str] = []
        unroutable = nacked = 0
        failure: BaseException | None = None
        for record, result in zip(records, results, strict=False):
            if isinstance(result, spec.Basic.Ack):
                confirmed.append(record.id)
            elif isinstance(result, DeliveredMessage):   # returned, then confirmed
                confirmed.append(record.id)
                unroutable += 1
                self._unroutable_example = self._names.of(record)
            elif isinstance(result, DeliveryError):
                nacked += 1
            elif isinstance(result, BaseException):
                failure = failure or result
            else:  # not in confirm mode? cannot happen with publisher_confirms=True
                failure = failure or SinkError(f"unexpected publish result {type(result).__name__}")
        if unroutable:
            self.outcomes["unroutable"] += unroutable
            self._log_unroutable(unroutable)
        if nacked:
            self.outcomes["nacked"] += nacked
        if failure is None and not nacked:
            self._confirmed.clear()
            self._refused_streak = 0
            return
        self._confirmed.add(confirmed)
        if failure is not None:
            # aiormq ends the confirms of a closed channel or connection with CancelledError.
            why = ("the channel or connection closed" if isinstance(failure, asyncio.CancelledError)
                   else self._describe(failure))
            raise SinkError(f"amqp {self.name}: publish to {self._endpoint} failed "
                            f"({len(confirmed)} of {len(records)} confirmed): {why}")
        self._refused_streak += 1
        if self._refused_streak >= self._options.refused_attempts:
            self._refused_streak = 0
            self._confirmed.clear()
            raise SinkRejected(f"amqp {self.name}: the broker refused (nack) {nacked} records "
                               f"{self._options.refused_attempts} attempts in a row")
        raise SinkError(f"amqp {self.name}: the broker refused (nack) {nacked} of "
                        f"{len(records)} records (e.g. a full queue with reject-publish)")

    def _log_unroutable(self, count: int) -> None:
        self._unroutable_unlogged += count
        now = time.monotonic()
        if now - self._unroutable_logged_at >= _UNROUTABLE_LOG_INTERVAL:
            log.warning("amqp sink %s: %d records returned unroutable by exchange %r (e.g. routing "
                        "key %r): no queue is bound for them", self.name, self._unroutable_unlogged,
                        self._options.exchange, self._unroutable_example,
                        extra={"sink": self.name})
            self._unroutable_unlogged = 0
            self._unroutable_logged_at = now


def _answer(confirm: asyncio.Future[Any]) -> Any:
    """What a finished confirm says: the broker's frame, a returned message, or an exception
    (returned, never raised: a CancelledError here must not cancel the caller)."""
    if confirm.cancelled():
        return asyncio.CancelledError()
    return confirm.exception() or confirm.result()


def create(name: str, options: Options | Mapping[str, Any]) -> AmqpSink:
    """Build an amqp sink (the factory for sink type ``amqp``)."""
    if not isinstance(options, Options):
        options = Options.model_validate(dict(options))
    return AmqpSink(name, options)
