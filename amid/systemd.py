"""The systemd notify protocol (``sd_notify``) in pure Python, plus watchdog settings.

systemd gives a ``Type=notify`` service the address of a unix datagram socket in ``$NOTIFY_SOCKET``; the service
sends newline-separated ``KEY=value`` assignments to it (``READY=1``, ``STATUS=...``, ``WATCHDOG=1``, ...).
A path starting with ``@`` names a socket in the abstract namespace. Nothing here needs libsystemd.

The notifier is deliberately forgiving: outside systemd it is disabled and every call is a cheap no-op, and a failed
send is logged at debug level and counted, never raised, because a daemon must not die over its status line.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

__all__ = ["Notifier"]

_log = logging.getLogger(__name__)


def _socket_address(value: str) -> str | bytes | None:
    """The address to ``sendto`` for a ``$NOTIFY_SOCKET`` value, or None if it is not a unix socket we can use."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        # Abstract namespace: the leading '@' stands for a NUL byte.
        return b"\0" + value[1:].encode()
    # systemd >= 254 also hands out "vsock:CID:PORT" (for VMs); a service on a host never sees it.
    return None


def _watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings: half the ``$WATCHDOG_USEC`` timeout, as sd_watchdog_enabled(3) advises."""
    usec_text = environ.get("WATCHDOG_USEC")
    if not usec_text:
        return None
    try:
        usec = int(usec_text)
    except ValueError:
        _log.debug("ignoring invalid WATCHDOG_USEC=%r", usec_text)
        return None
    if usec <= 0:
        return None
    pid_text = environ.get("WATCHDOG_PID")
    if pid_text:
        # The watchdog is meant for one process only; a child that inherited the environment must not ping.
        try:
            if int(pid_text) != pid:
                return None
        except ValueError:
            _log.debug("ignoring invalid WATCHDOG_PID=%r", pid_text)
            return None
    return usec / 2 / 1_000_000


class Notifier:
    """Sends state changes to systemd over ``$NOTIFY_SOCKET``.

    ``enabled`` is False when the service was not started by systemd with a notify socket; every method is then a
    no-op returning False. ``watchdog_interval`` is the number of seconds between ``watchdog()`` calls the service
    should keep to (None when systemd supervises no watchdog for this process).

    Sends never block (a notify datagram is tiny) and never raise: failures are counted in ``send_errors``.
    """

    def __init__(self, environ: Mapping[str, str], *, pid: int | None = None) -> None:
        own_pid = os.getpid() if pid is None else pid
        raw_address = environ.get("NOTIFY_SOCKET", "")
        self._address = _socket_address(raw_address) if raw_address else None
        if raw_address and self._address is None:
            _log.debug("unsupported NOTIFY_SOCKET=%r; systemd notifications disabled", raw_address)
        self.enabled: bool = self._address is not None
        self.watchdog_interval: float | None = _watchdog_interval(environ, own_pid) if self.enabled else None
        self.sent: int = 0
        self.send_errors: int = 0
        self._socket: socket.socket | None = None

    def notify(self, **fields: object) -> bool:
        """Send ``KEY=value`` assignments in one datagram, in the order given; True if it was sent.

        Newlines inside a value would start a new assignment, so they are replaced by spaces.
        """
        if self._address is None or not fields:
            return False
        lines = [f"{key}={str(value).replace(chr(10), ' ')}" for key, value in fields.items()]
        datagram = ("\n".join(lines) + "\n").encode("utf-8", "replace")
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._socket.setblocking(False)
            self._socket.sendto(datagram, self._address)
        except OSError as exc:
            # Includes EAGAIN when systemd is slow to drain the socket: losing one status line is acceptable.
            self.send_errors += 1
            _log.debug("systemd notify failed (%s): %s", exc.__class__.__name__, exc)
            return False
        self.sent += 1
        return True

    def ready(self, status: str | None = None) -> bool:
        """Tell systemd start-up is complete (``READY=1``), with an optional status line."""
        if status is None:
            return self.notify(READY=1)
        return self.notify(READY=1, STATUS=status)

    def status(self, text: str) -> bool:
        """Set the free-form status shown by ``systemctl status``."""
        return self.notify(STATUS=text)

    def watchdog(self) -> bool:
        """Ping the service watchdog (``WATCHDOG=1``); call it only while the service makes progress."""
        return self.notify(WATCHDOG=1)

    def stopping(self, status: str | None = None) -> bool:
        """Tell systemd the service is shutting down (``STOPPING=1``)."""
        if status is None:
            return self.notify(STOPPING=1)
        return self.notify(STOPPING=1, STATUS=status)

    def reloading(self, status: str | None = None) -> bool:
        """Tell systemd a reload started (``RELOADING=1``); send ``ready()`` when it is done.

        ``MONOTONIC_USEC`` lets systemd >= 253 match the reload to the request; older versions ignore it.
        """
        monotonic_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        if status is None:
            return self.notify(RELOADING=1, MONOTONIC_USEC=monotonic_usec)
        return self.notify(RELOADING=1, MONOTONIC_USEC=monotonic_usec, STATUS=status)

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for ``seconds`` more before systemd's start/stop/reload timeout fires (``EXTEND_TIMEOUT_USEC``)."""
        return self.notify(EXTEND_TIMEOUT_USEC=max(0, int(seconds * 1_000_000)))

    def close(self) -> None:
        """Close the socket; idempotent. A later notify reopens it."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None
