"""NATS JetStream sink: each record published to a subject, confirmed by the stream's PubAck.

One ``send`` publishes every record of the batch at once (pipelined: all in flight, then every
PubAck awaited) and returns only once the stream acknowledged each one, so a record leaves the
queue or the spool only once JetStream stored it.

Each message: the record's JSON as the payload, subject from ``subject`` (default
``ami.{server}.{event}``, each value made one safe subject token), header ``Nats-Msg-Id`` = the
record id. JetStream drops a message whose id it saw within the stream's duplicate window
(default 2 minutes), so the copies a retry or a spool replay after a crash would add are not
stored twice: the PubAck says ``duplicate`` and the sink counts it.

What the server answers, per record:

==========================================  ===================================================
answer                                      what the sink does
==========================================  ===================================================
PubAck                                      confirmed
PubAck with ``duplicate``                   confirmed (it was stored before), counted
no stream for the subject (no responders)   counted as ``no_stream``; the batch fails and is
                                            retried (nothing stores it: it would be lost)
error (stream full with ``discard: new``,   counted as ``refused``; the batch fails and is
wrong stream, ...)                          retried; after ``refused_attempts`` attempts in a
                                            row with refusals it is dead-lettered
connection lost, no PubAck in ``timeout``   SinkError: retried; the next send reconnects
==========================================  ===================================================

With ``stream`` set, every publish names it (``Nats-Expected-Stream``: a subject captured by
another stream is refused, not stored elsewhere) and the sink checks at start that it exists;
with ``create_stream`` it creates it if missing. An existing stream is never edited or deleted.
Passwords, tokens and the url's user info never appear in logs, errors or metrics.
"""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

import pydantic

from amid.records import Record
from amid.sinks.base import SinkError, SinkRejected
from amid.sinks.broker import (
    BrokerSink,
    BrokerState,
    TopicNames,
    check_template,
    invalid,
    missing_library,
    redact_url,
    tls_context,
)
from amid.units import PositiveDuration, PositiveSize

if TYPE_CHECKING:
    import nats.aio.client
    import nats.js

__all__ = ["NatsSink", "Options", "StreamOptions", "create"]

log = logging.getLogger("amid.sinks.nats")

OUTCOMES = ("duplicate", "refused", "no_stream")
MSG_ID_HEADER = "Nats-Msg-Id"
EXPECTED_STREAM_HEADER = "Nats-Expected-Stream"
NO_RESPONDERS_STATUS = "503"
_MAX_SUBJECT_BYTES = 4096  # far below the server's payload limit; subjects are short anyway


class StreamOptions(pydantic.BaseModel):
    """The stream to create when it does not exist (``create_stream``)."""

    model_config = pydantic.ConfigDict(extra="forbid")

    subjects: list[str] = pydantic.Field(default_factory=lambda: ["ami.>"], min_length=1)
    retention: Literal["limits", "interest", "workqueue"] = "limits"
    storage: Literal["file", "memory"] = "file"
    max_age: PositiveDuration | None = None        # None: kept until a size limit applies
    max_bytes: PositiveSize | None = None
    max_msgs: int | None = pydantic.Field(None, ge=1)
    duplicate_window: PositiveDuration = 120.0
    replicas: int = pydantic.Field(1, ge=1, le=5)


class Options(pydantic.BaseModel):
    """The ``nats`` sink's own config keys."""

    model_config = pydantic.ConfigDict(extra="forbid", hide_input_in_errors=True)

    # Not in repr: a url may carry user:password or a token.
    servers: list[str] = pydantic.Field(default_factory=lambda: ["nats://127.0.0.1:4222"],
                                        min_length=1, repr=False)
    subject: str = "ami.{server}.{event}"
    stream: str | None = None
    create_stream: StreamOptions | None = None
    user: str | None = None
    password: pydantic.SecretStr | None = None   # or password_file (read by the config loader)
    token: pydantic.SecretStr | None = None
    token_file: str | None = None                # read when the sink connects
    creds_file: str | None = None                # a NATS .creds file (JWT + nkey seed); needs nkeys
    connect_timeout: PositiveDuration = 10.0
    timeout: PositiveDuration = 30.0             # for the PubAcks of one whole batch
    refused_attempts: int = pydantic.Field(5, ge=1)
    tls_verify: bool = True
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None

    @pydantic.field_validator("servers", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @pydantic.field_validator("servers")
    @classmethod
    def _check_servers(cls, servers: list[str]) -> list[str]:
        for url in servers:
            try:
                parts = urlsplit(url)
                parts.port  # noqa: B018 - raises ValueError on a bad port
            except ValueError:
                raise invalid(f"{redact_url(url)} is not a valid url (bad port?)") from None
            if parts.scheme not in ("nats", "tls"):
                raise invalid(f"{redact_url(url)}: a server url starts with nats:// or tls://")
            if not parts.hostname:
                raise invalid(f"{redact_url(url)}: the url has no host")
        return servers

    @pydantic.field_validator("subject")
    @classmethod
    def _check_subject(cls, template: str) -> str:
        try:
            check_template(template)
        except ValueError as exc:
            raise invalid(str(exc)) from None
        if any(ch in template for ch in " \t\r\n*>") or ".." in template \
                or template.startswith(".") or template.endswith("."):
            raise invalid("a subject has no spaces, no wildcards (* >) and no empty tokens")
        return template

    @pydantic.field_validator("stream")
    @classmethod
    def _check_stream(cls, name: str | None) -> str | None:
        if name is not None and (not name or any(ch in name for ch in " \t\r\n.*>/\\")):
            raise invalid("a stream name has no spaces, dots, wildcards or slashes")
        return name

    @pydantic.model_validator(mode="after")
    def _check_combinations(self) -> Options:
        why = missing_library("nats", "nats", "nats")
        if why is not None:
            raise invalid(why, field="type")
        if self.create_stream is not None and self.stream is None:
            raise invalid("create_stream needs stream (the name of the stream to create)",
                          field="create_stream")
        given = [k for k in ("token", "token_file", "creds_file") if getattr(self, k) is not None]
        if self.user is not None or self.password is not None:
            given.insert(0, "user")
        if len(given) > 1:
            raise invalid(f"{given[0]} and {given[1]}: choose one way to authenticate",
                          field=given[1])
        if self.creds_file is not None and importlib.util.find_spec("nkeys") is None:
            raise invalid("creds_file needs the nkeys package, which signs with the seed "
                          "(pip install 'asterisk-amid[nats]')", field="creds_file")
        if self.password is not None and self.user is None:
            raise invalid("password needs user", field="password")
        if self.tls_key_file is not None and self.tls_cert_file is None:
            raise invalid("tls_key_file needs tls_cert_file", field="tls_key_file")
        return self


class NatsSink(BrokerSink):
    """Publishes batches to JetStream over one connection, one PubAck per record."""

    kind = "nats"
    outcome_names = OUTCOMES

    def __init__(self, name: str, options: Options) -> None:
        secrets = [urlsplit(url).password or urlsplit(url).username or "" for url in options.servers]
        for secret in (options.password, options.token):
            if secret is not None:
                secrets.append(secret.get_secret_value())
        super().__init__(name, options.connect_timeout, secrets)
        self._options = options
        self._endpoints = ", ".join(redact_url(url) for url in options.servers)
        self._names = TopicNames(options.subject, max_bytes=_MAX_SUBJECT_BYTES)
        self._nc: nats.aio.client.Client | None = None
        self._ack_prefix = ""
        self._pending: dict[str, asyncio.Future[Any]] = {}
        self._tokens = itertools.count()
        self._ssl: Any = None
        self._token: str | None = None
        self._creds: str | None = None
        self._stream_checked = False
        self._lost = asyncio.Event()  # set when the current connection drops

    def __repr__(self) -> str:
        return f"NatsSink(name={self.name!r}, servers={self._endpoints!r}, state={self._state.value})"

    # -- connection ----------------------------------------------------------------------

    async def _prepare(self) -> None:
        """Credentials and TLS files; then :meth:`_connect` connects and checks (or creates)
        the stream when one is named."""
        options = self._options
        try:
            if options.creds_file is not None and self._creds is None:
                # Read here, off the event loop; the client would read the file on each connect.
                self._creds = await asyncio.to_thread(Path(options.creds_file).read_text, "utf-8")
                # The JWT and the nkey seed in it are credentials: never in a message.
                self._secrets.extend(line.strip() for line in self._creds.splitlines()
                                     if len(line.strip()) >= 16 and not line.startswith("-"))
            if options.token_file is not None and self._token is None:
                text = await asyncio.to_thread(Path(options.token_file).read_text, "utf-8")
                self._token = text.removesuffix("\n")
                self._secrets.append(self._token)
            wants_tls = (any(url.startswith("tls://") for url in options.servers)
                         or options.tls_ca_file is not None or options.tls_cert_file is not None)
            if wants_tls and self._ssl is None:
                self._ssl = await asyncio.to_thread(
                    tls_context, verify=options.tls_verify, ca_file=options.tls_ca_file,
                    cert_file=options.tls_cert_file, key_file=options.tls_key_file)
                if not options.tls_verify:
                    log.warning("nats sink %s: TLS certificate verification is OFF for %s",
                                self.name, self._endpoints, extra={"sink": self.name})
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise SinkError(f"nats {self.name}: cannot read its credential or TLS files: "
                            f"{type(exc).__name__}: {exc}") from None

    async def _connect(self) -> None:
        try:
            import nats
        except ImportError:
            raise SinkError(missing_library("nats", "nats", "nats")
                            or "nats cannot be imported") from None
        options = self._options
        credentials: dict[str, Any] = {}
        if options.user is not None:
            credentials["user"] = options.user
            if options.password is not None:
                credentials["password"] = options.password.get_secret_value()
        if options.token is not None:
            credentials["token"] = options.token.get_secret_value()
        elif self._token is not None:
            credentials["token"] = self._token
        if self._creds is not None:
            from nats.aio.client import RawCredentials
            credentials["user_credentials"] = RawCredentials(self._creds)
        if self._ssl is not None:
            credentials["tls"] = self._ssl
        nc = None
        self._lost = asyncio.Event()
        try:
            async with asyncio.timeout(options.connect_timeout):
                # No reconnect inside the client: a lost connection fails the send, and the
                # runner's retry (with its backoff) connects again, so every outage is seen,
                # counted and bounded the same way.
                nc = await nats.connect(
                    servers=options.servers, name=f"amid:{self.name}", allow_reconnect=False,
                    connect_timeout=max(1, round(options.connect_timeout)),
                    error_cb=self._on_error, disconnected_cb=self._on_disconnected,
                    closed_cb=self._on_closed, **credentials)
                if not self._stream_checked:
                    await self._check_stream(nc.jetstream(timeout=options.connect_timeout))
                # PubAcks come back on one subscription, told apart by the reply subject's
                # last token (nats-py's publish_async leaves a refused publish unanswered).
                self._ack_prefix = nc.new_inbox() + "."
                await nc.subscribe(self._ack_prefix + "*", cb=self._on_ack)
        except BaseException as exc:
            if nc is not None:
                await self._close_quietly(nc)
            if not isinstance(exc, Exception):
                raise
            if isinstance(exc, SinkError):
                raise
            if isinstance(exc, TimeoutError):
                why = f"no answer within {options.connect_timeout:g}s"
            else:
                why = self._describe(exc)
            raise SinkError(f"nats {self.name}: cannot connect to {self._endpoints}: {why}") from None
        self._nc = nc
        log.info("nats sink %s: connected to %s", self.name, self._endpoints,
                 extra={"sink": self.name})

    async def _check_stream(self, js: nats.js.JetStreamContext) -> None:
        """The named stream must exist; with ``create_stream`` a missing one is created."""
        from nats.js import api
        from nats.js.errors import NotFoundError
        options = self._options
        if options.stream is None:
            await js.account_info()  # JetStream must be enabled for this account
            self._stream_checked = True
            return
        try:
            info = await js.stream_info(options.stream)
        except NotFoundError:
            wanted = options.create_stream
            if wanted is None:
                raise SinkError(f"nats {self.name}: stream {options.stream!r} does not exist "
                                f"(create it, or set create_stream to let amid create it)") from None
            config = api.StreamConfig(
                name=options.stream, subjects=list(wanted.subjects),
                retention=api.RetentionPolicy(wanted.retention),
                storage=api.StorageType(wanted.storage), max_age=wanted.max_age,
                max_bytes=wanted.max_bytes, max_msgs=wanted.max_msgs,
                duplicate_window=wanted.duplicate_window, num_replicas=wanted.replicas)
            await js.add_stream(config)
            log.info("nats sink %s: created stream %r (subjects %s)", self.name, options.stream,
                     ", ".join(wanted.subjects), extra={"sink": self.name})
        else:
            wanted = options.create_stream
            if wanted is not None and sorted(info.config.subjects or []) != sorted(wanted.subjects):
                log.warning("nats sink %s: stream %r exists with subjects %s, not %s; it is left "
                            "as it is", self.name, options.stream, info.config.subjects,
                            wanted.subjects, extra={"sink": self.name})
        self._stream_checked = True

    async def _on_error(self, exc: Exception) -> None:
        log.debug("nats sink %s: %s", self.name, self._describe(exc), extra={"sink": self.name})

    async def _on_disconnected(self) -> None:
        self._lost.set()
        if self._state is BrokerState.OPEN:
            log.warning("nats sink %s: disconnected from %s", self.name, self._endpoints,
                        extra={"sink": self.name})

    async def _on_closed(self) -> None:
        self._lost.set()
        log.debug("nats sink %s: connection closed", self.name, extra={"sink": self.name})

    def _connected(self) -> bool:
        nc = self._nc
        return nc is not None and nc.is_connected

    def _take_connection(self) -> Any:
        nc, self._nc = self._nc, None
        return nc

    # -- publishing ----------------------------------------------------------------------

    async def _publish_all(self, records: list[Record]) -> list[Any]:
        """Publish ``records`` with a reply subject each and wait for every answer (or the
        timeout, or the connection's loss); the answers are in the futures, in order."""
        nc = self._nc
        assert nc is not None
        options = self._options
        subject = self._names.of
        publish = nc.publish
        headers: dict[str, str] = {}
        if options.stream is not None:
            headers[EXPECTED_STREAM_HEADER] = options.stream
        prefix = self._ack_prefix
        pending = self._pending
        next_token = self._tokens.__next__
        loop = asyncio.get_running_loop()
        acks: list[asyncio.Future[Any]] = []
        try:
            async with asyncio.timeout(options.timeout):
                # Every publish is buffered before the first PubAck is awaited: the client
                # writes them in a few large writes and the acks come back as one stream.
                # Headers and subject add a little to the payload; keep a margin for them.
                max_payload = nc.max_payload - 1024
                for record in records:
                    token = str(next_token())
                    ack = pending[token] = loop.create_future()
                    acks.append(ack)
                    if len(record.json) > max_payload:
                        # The server would close the connection on it: refuse it here.
                        ack.set_result(b'{"error":{"description":"larger than the server\'s '
                                       b'max_payload"}}')
                        continue
                    await publish(subject(record), record.json, reply=prefix + token,
                                  headers={**headers, MSG_ID_HEADER: record.id})
                if acks:
                    await self._until_acked_or_lost(acks)
        except TimeoutError:
            pass  # the acks still missing count as failures in _settle
        except Exception as exc:
            await self._drop_connection()
            raise SinkError(f"nats {self.name}: publish to {self._endpoints} failed: "
                            f"{self._describe(exc)}") from None
        finally:
            for ack in acks:
                if not ack.done():
                    ack.cancel()
            pending.clear()
        return acks

    async def _on_ack(self, msg: Any) -> None:
        """A PubAck (or the server's no-responders status) for the publish named by the token."""
        ack = self._pending.pop(msg.subject[len(self._ack_prefix):], None)
        if ack is None or ack.done():
            return  # late: its batch already gave up on it
        if msg.headers and msg.headers.get("Status") == NO_RESPONDERS_STATUS:
            ack.set_result(None)
        else:
            ack.set_result(msg.data)

    async def _until_acked_or_lost(self, acks: list[asyncio.Future[Any]]) -> None:
        """Wait for every ack, or until the connection is lost (then the rest never come)."""
        all_acked: asyncio.Future[Any] = asyncio.gather(*acks, return_exceptions=True)
        lost: asyncio.Future[Any] = asyncio.ensure_future(self._lost.wait())
        try:
            await asyncio.wait([all_acked, lost], return_when=asyncio.FIRST_COMPLETED)
        finally:
            lost.cancel()
            if not all_acked.done():
                all_acked.cancel()
            else:
                all_acked.result()

    def _settle(self, records: list[Record], acks: list[asyncio.Future[Any]]) -> None:
        """Sort the server's answers; raise unless every record was acknowledged."""
        confirmed: list[str] = []
        duplicates = refused = no_stream = missing = 0
        example = ""
        for record, ack in zip(records, acks, strict=False):
            if ack.cancelled():
                missing += 1
                continue
            answer = ack.result()
            if answer is None:
                no_stream += 1
                example = example or f"no stream captures subject {self._names.of(record)!r}"
                continue
            try:
                reply = json.loads(answer)
            except ValueError:
                reply = {"error": {"description": f"unreadable PubAck {answer[:80]!r}"}}
            error = reply.get("error")
            if error is None:
                confirmed.append(record.id)
                if reply.get("duplicate"):
                    duplicates += 1
            else:
                refused += 1
                example = example or (f"{error.get('description', 'refused')} (code "
                                      f"{error.get('code')}, err_code {error.get('err_code')})")
        missing += len(records) - len(acks)
        self.outcomes["duplicate"] += duplicates
        self.outcomes["refused"] += refused
        self.outcomes["no_stream"] += no_stream
        if not (missing or refused or no_stream):
            self._confirmed.clear()
            self._refused_streak = 0
            return
        self._confirmed.add(confirmed)
        summary = f"{len(confirmed)} of {len(records)} acknowledged"
        if missing:
            raise SinkError(f"nats {self.name}: no PubAck for {missing} records within timeout "
                            f"or before the connection was lost ({self._options.timeout:g}s; "
                            f"{summary})")
        if no_stream:
            raise SinkError(f"nats {self.name}: {example} ({no_stream} records; {summary})")
        self._refused_streak += 1
        if self._refused_streak >= self._options.refused_attempts:
            self._refused_streak = 0
            self._confirmed.clear()
            raise SinkRejected(f"nats {self.name}: the stream refused {refused} records "
                               f"{self._options.refused_attempts} attempts in a row: {example}")
        raise SinkError(f"nats {self.name}: the stream refused {refused} records ({summary}): "
                        f"{example}")


def create(name: str, options: Options | Mapping[str, Any]) -> NatsSink:
    """Build a nats sink (the factory for sink type ``nats``)."""
    if not isinstance(options, Options):
        options = Options.model_validate(dict(options))
    return NatsSink(name, options)
