"""TLS as amid's users spell it, once: ``{ca_file, verify, cert_file, key_file, server_hostname}``.

One model (:class:`TlsSettings`) and one builder (:func:`client_context`) for every TLS client
in amid: the AMI session, the syslog and webhook sinks, the CLI.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

__all__ = ["TlsSettings", "client_context"]


@dataclass(frozen=True)
class TlsSettings:
    """How to talk TLS to one peer. ``ca_file`` alone is trusted when given (pinning a private
    CA), else the system store; ``verify=False`` turns certificate and name checks off;
    ``cert_file``/``key_file`` present a client certificate; ``server_hostname`` is the name
    checked in the server's certificate (and sent as SNI) when it differs from the host."""

    ca_file: str | None = None
    verify: bool = True
    cert_file: str | None = None
    key_file: str | None = None
    server_hostname: str | None = None

    def __post_init__(self) -> None:
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("key_file needs cert_file")


def client_context(settings: TlsSettings | None = None) -> ssl.SSLContext:
    """A client TLS context for ``settings`` (defaults: system CAs, verification on).

    Reads the files now: a missing or bad file raises OSError or ssl.SSLError here, at start,
    not at the first connection. (Blocking file reads: call it from a thread in a running loop
    if that matters.)"""
    settings = settings or TlsSettings()
    context = ssl.create_default_context(cafile=settings.ca_file)
    if not settings.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if settings.cert_file:
        context.load_cert_chain(settings.cert_file, settings.key_file)
    return context
