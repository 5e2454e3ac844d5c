"""Everything that configures one AMI session, as one frozen value.

:class:`~amid.ami.session.AMIClient` takes these as keyword arguments (the documented library
API) or as one :class:`SessionSettings` (``AMIClient.from_settings``), which is what the daemon
builds from its validated config: one object handed over instead of two dozen arguments.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from amid.ami.address import parse_host
from amid.ami.protocol import DEFAULT_MAX_MESSAGE_BYTES
from amid.ami.tls import TlsSettings

__all__ = ["DEFAULT_PORT", "SessionSettings", "event_mask"]

DEFAULT_PORT = 5038


def event_mask(events: bool | str | Sequence[str]) -> str:
    """The ``Events:`` value of the Login action."""
    if events is True:
        return "on"
    if events is False:
        return "off"
    if isinstance(events, str):
        return events
    return ",".join(events) if events else "off"


@dataclass(frozen=True)
class SessionSettings:
    """One session's settings; durations in seconds. See README "The library".

    ``reconnect_stable_after``: a connection that logged in and was lost sooner than this
    counts as a failed attempt for the reconnect backoff (a peer that accepts the login and
    then hangs up is retried ever more slowly, not every ``reconnect_min_delay``).
    ``max_malformed``/``malformed_window``: more malformed messages than ``max_malformed``
    within ``malformed_window`` seconds drop the connection as a ``protocol_error``.
    ``read_coalesce``: after a small read, leave the socket that long before reading again,
    so one read carries many events (Asterisk writes each event on its own); 0 reads at once.
    """

    host: str
    port: int
    username: str
    secret: str = field(repr=False)
    auth: Literal["md5", "plain"] = "md5"
    tls: TlsSettings | None = None
    name: str = ""
    events: bool | str | tuple[str, ...] = True
    filters: tuple[str, ...] = ()
    ping_interval: float = 20.0
    ping_timeout: float = 5.0
    connect_timeout: float = 10.0
    action_timeout: float = 10.0
    list_timeout: float = 60.0
    login_timeout: float = 10.0
    reconnect: bool = True
    reconnect_min_delay: float = 1.0
    reconnect_max_delay: float = 60.0
    reconnect_stable_after: float = 10.0
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_malformed: int = 100
    malformed_window: float = 60.0
    handler_queue_size: int = 10_000
    read_coalesce: float = 0.0

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:  # the socket layer would wrap it silently (99999 -> 34463)
            raise ValueError(f"port {self.port} is not in 1-65535")
        if self.auth not in ("md5", "plain"):
            raise ValueError(f"auth must be 'md5' or 'plain', not {self.auth!r}")
        if not 0 <= self.reconnect_min_delay <= self.reconnect_max_delay:
            raise ValueError("need 0 <= reconnect_min_delay <= reconnect_max_delay")
        if self.max_malformed < 0:
            raise ValueError("max_malformed must not be negative")
        if not self.name:
            object.__setattr__(self, "name", f"{self.host}:{self.port}")
        if not isinstance(self.events, (bool, str)):
            object.__setattr__(self, "events", tuple(self.events))
        object.__setattr__(self, "filters", tuple(self.filters))

    @classmethod
    def for_address(cls, host: str, port: int | None = None, *,
                    default_port: int = DEFAULT_PORT, **settings: object) -> SessionSettings:
        """``host`` may carry the port (``pbx:5039``, ``[::1]:5038``) when ``port`` is None."""
        if port is None:
            host, port = parse_host(host, default_port)
        return cls(host=host, port=port, **settings)  # type: ignore[arg-type]

    @property
    def event_mask(self) -> str:
        return event_mask(self.events)
