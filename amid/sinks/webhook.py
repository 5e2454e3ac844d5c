"""Webhook sink: POST batches of records to an HTTP(S) endpoint, signed per Standard Webhooks.

One ``send`` is one POST. The sink never retries and never queues (the SinkRunner in front of it
does both); it only turns the outcome of the one attempt into the SinkError family:

============================================  ===============================================
outcome                                       raised
============================================  ===============================================
2xx                                           nothing: delivered
connection error, timeout, TLS failure        ``SinkError``
408, 429, 5xx                                 ``SinkError(retry_after=<Retry-After, capped>)``
3xx (redirects are never followed)            ``SinkError`` (fix the url; the batch is fine)
410 Gone                                      ``SinkDisabled``: the endpoint asked us to stop
any other 4xx                                 ``SinkRejected`` (status + short body excerpt)
============================================  ===============================================

Signing (https://www.standardwebhooks.com) is on whenever a secret is set: ``webhook-id`` is
derived from the batch's record ids, so a retried batch carries the same id and the receiver can
drop the copy; ``webhook-timestamp`` is the time of this attempt; ``webhook-signature`` holds one
``v1,<base64 HMAC-SHA256>`` per secret, so secrets can be rotated without downtime.

Error messages name the endpoint by scheme, host and port only (the rest of a url may be a
credential) and never include a secret or a configured header value.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import email.utils
import enum
import hashlib
import hmac
import logging
import re
import ssl
import time
from collections.abc import Mapping, Sequence
from datetime import UTC
from importlib.metadata import PackageNotFoundError, version
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import pydantic
from multidict import CIMultiDict
from pydantic_core import PydanticCustomError

from amid.ami.address import format_host
from amid.ami.tls import TlsSettings, client_context
from amid.records import Record
from amid.sinks.base import SinkDisabled, SinkError, SinkRejected
from amid.units import PositiveDuration

__all__ = ["RETRY_AFTER_CAP", "Options", "WebhookSink", "create", "parse_retry_after",
           "signing_keys", "webhook_id"]

log = logging.getLogger("amid.sinks.webhook")

RETRY_AFTER_CAP = 3600.0
"""Longest Retry-After we honour, in seconds: a peer cannot park the sink for a day."""

_ERROR_BODY_READ = 1024          # bytes of an error response we read for the message
_ERROR_EXCERPT_CHARS = 200       # characters of it we show
_SUCCESS_BODY_DRAIN = 64 * 1024  # a 2xx body up to this size is read so the connection is reused

# Idle pooled connections are dropped before common server keep-alive timeouts (Apache and
# Node.js: 5 s) so a POST rarely lands on a connection the server is closing; POST is not
# retried by aiohttp, so such a race would cost a failed attempt and a backoff.
_IDLE_CONNECTION_TTL = 4.0

try:
    _AMID_VERSION = version("amid")
except PackageNotFoundError:  # a source tree that is not installed
    _AMID_VERSION = "0"

_SIGNATURE_HEADERS = ("webhook-id", "webhook-timestamp", "webhook-signature")
_CONTENT_TYPES = {"json": "application/json", "ndjson": "application/x-ndjson"}


def _invalid(message: str, *, field: str | None = None) -> PydanticCustomError:
    """A validation error with a plain message (no "Value error, " prefix).

    From a model-level check, ``field`` names the key to blame (the config loader's
    ``amid_field`` convention), so the message points at the right YAML line.
    """
    if field is None:
        return PydanticCustomError("webhook_option", "{message}", {"message": message})
    return PydanticCustomError("amid_field", "{message}", {"message": message, "field": field})


class Options(pydantic.BaseModel):
    """The ``webhook`` sink's own config keys."""

    # Secrets and header values (e.g. Authorization) must not be echoed in config errors.
    model_config = pydantic.ConfigDict(extra="forbid", hide_input_in_errors=True)

    #: The sink's ``batch.max_wait`` unless the config says otherwise: an HTTP request costs
    #: far more than a file write, and with Asterisk's one-event writes a busy PBX would
    #: otherwise make one request every few milliseconds (10k events/s: about 400 a second).
    default_batch_max_wait: ClassVar[float] = 0.010

    # Not in repr: a url may carry a token (in the path, query or user info), headers too.
    url: str = pydantic.Field(repr=False)
    body: Literal["json", "ndjson"] = "json"
    headers: dict[str, str] = pydantic.Field(default_factory=dict, repr=False)
    secret: pydantic.SecretStr | list[pydantic.SecretStr] | None = None
    timeout: PositiveDuration = 10.0          # per request, connect to last byte of the answer
    connect_timeout: PositiveDuration = 5.0
    tls_verify: bool = True
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    max_connections: int = pydantic.Field(4, ge=1)

    @pydantic.field_validator("url")
    @classmethod
    def _check_url(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise _invalid("the url must start with http:// or https://")
        if not parts.hostname:
            raise _invalid("the url has no host")
        try:
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            raise _invalid("the url has an invalid port") from None
        return url

    @pydantic.field_validator("headers")
    @classmethod
    def _check_headers(cls, headers: dict[str, str]) -> dict[str, str]:
        for name, value in headers.items():
            if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name):
                raise _invalid(f"{name!r} is not a valid header name")
            if any(ch in value for ch in "\r\n\0"):
                raise _invalid(f"the value of {name!r} contains CR, LF or NUL")
            if name.lower() in _SIGNATURE_HEADERS:
                raise _invalid(f"{name!r} is set by the sink itself (Standard Webhooks)")
        return headers

    @pydantic.field_validator("secret")
    @classmethod
    def _check_secret(cls, secret: Any) -> Any:
        # A field check (not in the model check below, which runs only when every field is
        # valid): a bad secret is reported next to the sink's other problems.
        try:
            signing_keys(secret)
        except ValueError as exc:  # the message names the problem, never the secret
            raise _invalid(str(exc)) from None
        return secret

    @pydantic.model_validator(mode="after")
    def _check_tls_and_credentials(self) -> Options:
        tls_keys = [k for k in ("tls_ca_file", "tls_cert_file", "tls_key_file")
                    if getattr(self, k) is not None]
        if tls_keys and urlsplit(self.url).scheme != "https":
            raise _invalid(f"{tls_keys[0]} needs an https:// url", field=tls_keys[0])
        if (urlsplit(self.url).username is not None
                and any(name.lower() == "authorization" for name in self.headers)):
            raise _invalid("credentials in the url and an Authorization header: choose one",
                           field="headers")
        if self.tls_key_file is not None and self.tls_cert_file is None:
            raise _invalid("tls_key_file needs tls_cert_file", field="tls_key_file")
        return self


def signing_keys(secret: pydantic.SecretStr | Sequence[pydantic.SecretStr] | None) -> list[bytes]:
    """HMAC keys for the configured secret(s), in order.

    ``whsec_<base64>`` is the Standard Webhooks serialisation: the key is the decoded bytes.
    Anything else is used as the key verbatim (UTF-8). Raises ValueError without the secret.
    """
    if secret is None:
        return []
    secrets = [secret] if isinstance(secret, pydantic.SecretStr) else list(secret)
    if not secrets:
        raise ValueError("an empty list signs nothing; omit the key instead")
    keys = []
    for position, item in enumerate(secrets, 1):
        text = item.get_secret_value()
        if text.startswith("whsec_"):
            try:
                key = base64.b64decode(text[len("whsec_"):], validate=True)
            except binascii.Error:
                raise ValueError(
                    f"secret #{position}: the part after whsec_ is not valid base64") from None
        else:
            key = text.encode("utf-8")
        if not key:
            raise ValueError(f"secret #{position} is empty")
        keys.append(key)
    return keys


def webhook_id(batch: Sequence[Record]) -> str:
    """A ``webhook-id`` that is the same every time this exact batch is sent.

    Derived from every record id, so a retry of the batch can be dropped by the receiver while a
    different batch never shares the id. Hex only: the id must not contain ``.`` (it is a field
    of the signed content).
    """
    ids = "".join([record.id + "\n" for record in batch]).encode("utf-8", "surrogatepass")
    return f"msg_{hashlib.sha256(ids).hexdigest()[:32]}"


def sign(keys: Sequence[bytes], message_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value: ``v1,<base64>`` per key, space separated."""
    signed = f"{message_id}.{timestamp}.".encode("ascii") + body
    return " ".join(
        "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode("ascii")
        for key in keys)


def encode_body(batch: Sequence[Record], body_format: str) -> bytes:
    """The request body: a JSON array of the records, or one record per line (NDJSON)."""
    if body_format == "ndjson":
        return b"\n".join(Record.jsons(batch)) + b"\n"
    return b"[" + b",".join(Record.jsons(batch)) + b"]"


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delta-seconds or HTTP-date), or None.

    The result is clamped to ``[0, RETRY_AFTER_CAP]``; an unparseable value gives None.
    """
    if value is None:
        return None
    value = value.strip()
    if re.fullmatch(r"[0-9]+", value):
        digits = value.lstrip("0") or "0"
        # A longer number is far past the cap (and could overflow a float, or int()'s limit).
        seconds = float(int(digits)) if len(digits) <= 12 else RETRY_AFTER_CAP
    else:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when.tzinfo is None:  # an HTTP-date is GMT by definition
            when = when.replace(tzinfo=UTC)
        seconds = when.timestamp() - (time.time() if now is None else now)
    return min(max(seconds, 0.0), RETRY_AFTER_CAP)


def redact_url(url: str) -> str:
    """Only the scheme, host and port of ``url``: safe to put in logs and messages.

    The rest may be a credential: user info, a query token, or a path that is itself the
    secret (many services hand out webhook urls like ``/services/<token>``).
    """
    parts = urlsplit(url)
    host = format_host(parts.hostname or "")
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, netloc, "", "", ""))


_URL_IN_TEXT = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>]+")


def _redact_or_hide(url: str) -> str:
    try:
        return redact_url(url)
    except ValueError:  # unparseable (e.g. bad port): show nothing of it
        return "<url>"


def _excerpt(raw: bytes) -> str:
    """A one-line, truncated, printable excerpt of a response body."""
    text = " ".join(raw.decode("utf-8", errors="replace").split())
    text = "".join(ch if ch.isprintable() else "?" for ch in text)
    if len(text) > _ERROR_EXCERPT_CHARS:
        text = text[:_ERROR_EXCERPT_CHARS] + "…"
    return text


def error_for_status(status: int, reason: str, retry_after: str | None, body: bytes,
                     endpoint: str) -> SinkError:
    """The exception a non-2xx HTTP answer maps to (a 2xx means delivered: no exception)."""
    answered = f"POST {endpoint} answered {status} {reason}".rstrip()
    if status == 410:
        return SinkDisabled(f"{answered}: the endpoint asked us to stop sending (410 Gone)")
    if status in (408, 429) or status >= 500:
        return SinkError(answered, retry_after=parse_retry_after(retry_after))
    if 400 <= status < 500:
        excerpt = _excerpt(body)
        return SinkRejected(f"{answered}: {excerpt}" if excerpt else answered)
    if 300 <= status < 400:
        return SinkError(f"{answered}: redirects are not followed; set url to the final address")
    return SinkError(f"{answered}: unexpected status")


class _State(enum.Enum):
    NEW = "new"
    OPEN = "open"
    CLOSED = "closed"


class WebhookSink:
    """Delivers each batch with one HTTP POST over a pooled, keep-alive aiohttp session."""

    def __init__(self, name: str, options: Options) -> None:
        self.name = name
        self._options = options
        self._url = options.url
        self._endpoint = redact_url(options.url)
        self._keys = signing_keys(options.secret)
        self._static_headers = CIMultiDict({
            "content-type": _CONTENT_TYPES[options.body],
            "user-agent": f"amid/{_AMID_VERSION}",
        })
        for header, value in options.headers.items():
            self._static_headers[header] = value  # replaces case-insensitively
        self._session: aiohttp.ClientSession | None = None
        self._state = _State.NEW

    def __repr__(self) -> str:
        return f"WebhookSink(name={self.name!r}, url={self._endpoint!r}, state={self._state.value})"

    async def start(self) -> None:
        """Create the HTTP session (no request is made). Raises SinkError on bad TLS files."""
        if self._state is _State.OPEN:
            return
        ssl_context: ssl.SSLContext | bool = True
        if urlsplit(self._url).scheme == "https":
            try:
                # Reads CA and key files from disk: keep it off the event loop.
                ssl_context = await asyncio.to_thread(self._make_ssl_context)
            except (OSError, ssl.SSLError) as exc:
                raise SinkError(f"webhook {self.name}: cannot load TLS files: {exc}") from None
        connector = aiohttp.TCPConnector(limit=self._options.max_connections, ssl=ssl_context,
                                         keepalive_timeout=_IDLE_CONNECTION_TTL)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self._options.timeout,
                                          sock_connect=self._options.connect_timeout),
            cookie_jar=aiohttp.DummyCookieJar(),  # a webhook is stateless; never replay cookies
            raise_for_status=False,
        )
        self._state = _State.OPEN

    def _make_ssl_context(self) -> ssl.SSLContext:
        options = self._options
        # With tls_ca_file only that CA is trusted (not the system store): pinning a private CA.
        if not options.tls_verify:
            log.warning("webhook sink %s: TLS certificate verification is OFF for %s",
                        self.name, self._endpoint)
        return client_context(TlsSettings(ca_file=options.tls_ca_file, verify=options.tls_verify,
                                          cert_file=options.tls_cert_file,
                                          key_file=options.tls_key_file))

    async def send(self, batch: Sequence[Record]) -> None:
        """POST ``batch`` once; return when the endpoint answered 2xx, raise SinkError otherwise."""
        if not batch:
            return
        if self._state is not _State.OPEN or self._session is None:
            raise SinkError(f"webhook {self.name} is {self._state.value}, not open")
        body = encode_body(batch, self._options.body)
        headers = self._request_headers(webhook_id(batch), body)
        try:
            async with self._session.post(self._url, data=body, headers=headers,
                                          allow_redirects=False) as response:
                if 200 <= response.status < 300:
                    await self._drain(response)
                    return
                try:
                    error_body = await response.content.read(_ERROR_BODY_READ)
                except (aiohttp.ClientError, TimeoutError, OSError):
                    error_body = b""
                raise error_for_status(response.status, response.reason or "",
                                       response.headers.get("Retry-After"), error_body,
                                       self._endpoint)
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            # ValueError: aiohttp refusing a request it cannot build; Options rule out the
            # known causes, and whatever is left must still surface as a SinkError.
            # ``from None``: aiohttp exceptions may carry the full url (credentials, query).
            raise SinkError(f"POST {self._endpoint} failed: {self._describe(exc)}") from None

    def _request_headers(self, message_id: str, body: bytes) -> CIMultiDict[str]:
        headers = self._static_headers.copy()
        if self._keys:
            timestamp = int(time.time())  # the time of this attempt, as the spec asks
            headers["webhook-id"] = message_id
            headers["webhook-timestamp"] = str(timestamp)
            headers["webhook-signature"] = sign(self._keys, message_id, timestamp, body)
        return headers

    @staticmethod
    async def _drain(response: aiohttp.ClientResponse) -> None:
        """Read a small 2xx body so the connection goes back to the pool.

        A larger body is left unread: aiohttp then closes that connection, which is cheaper than
        reading megabytes we ignore. Errors here do not matter: the 2xx already confirmed delivery.
        """
        remaining = _SUCCESS_BODY_DRAIN
        try:
            while remaining > 0 and not response.content.at_eof():
                chunk = await response.content.read(remaining)
                if not chunk:
                    break
                remaining -= len(chunk)
        except (aiohttp.ClientError, TimeoutError, OSError):
            pass

    def _describe(self, exc: BaseException) -> str:
        if isinstance(exc, TimeoutError):
            what = (f"timed out (timeout {self._options.timeout}s, "
                    f"connect_timeout {self._options.connect_timeout}s)")
        else:
            what = str(exc) or "no details"
        # aiohttp texts may quote the url, with its query; strip that from any url in them.
        what = _URL_IN_TEXT.sub(lambda match: _redact_or_hide(match.group()), what)
        return f"{type(exc).__name__}: {what}"

    async def close(self) -> None:
        """Close the session and its connections. Idempotent; safe before start."""
        session, self._session = self._session, None
        self._state = _State.CLOSED
        if session is not None:
            await session.close()


def create(name: str, options: Options | Mapping[str, Any]) -> WebhookSink:
    """Build a webhook sink (the factory for sink type ``webhook``).

    ``options`` may be an :class:`Options` or the raw mapping of the sink's config keys.
    """
    if not isinstance(options, Options):
        options = Options.model_validate(dict(options))
    return WebhookSink(name, options)
