"""A private, real rsyslogd for tests: it takes loopback UDP, TCP (and RELP), writes what it parsed.

Nothing of the system's rsyslog is used: the daemon runs from a generated config in a temporary
directory, without imuxsock/imklog, listening on free ports of 127.0.0.1. Every message it
receives becomes one JSON line in ``output`` holding the fields rsyslog PARSED (facility,
severity, hostname, app-name, procid, msgid, structured-data, msg, ...), so tests assert on
rsyslog's reading of our bytes, not on the bytes themselves.

    server = RsyslogServer(tmp_dir)
    server.start()                    # bounded wait until a UDP and a TCP probe came through
    ...
    lines = await server.wait_for(lambda line: line["app_name"] == "mytest", 3)
    server.stop()

``RsyslogServer(tmp_dir, relp=True)`` also listens with ``imrelp`` (Debian package
``rsyslog-relp``) on ``relp_port`` and handles each message synchronously (a "Direct" main queue):
the file write happens before imrelp answers ``200 OK``, so what rsyslogd acknowledged survives
:meth:`RsyslogServer.kill` (SIGKILL). :meth:`RsyslogServer.restart` starts it again on the same
ports. With ``relp_tls=(ca_file, cert_file, key_file)`` a second imrelp input speaks RELP inside
TLS (``tls="on"``, server authentication only) on ``relp_tls_port``.

Without rsyslogd installed :func:`require_rsyslogd` skips the test, except in CI (``CI`` set),
where a missing rsyslogd is a failure: CI must not pass by testing nothing.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import pytest

__all__ = ["RsyslogServer", "require_rsyslogd"]

# Fields of each output line, by rsyslog property name.
_PROPERTIES = {
    "facility": "syslogfacility-text",
    "severity": "syslogseverity-text",
    "hostname": "hostname",
    "app_name": "app-name",
    "procid": "procid",
    "msgid": "msgid",
    "structured_data": "structured-data",
    "protocol_version": "protocol-version",
    "input": "inputname",
    "msg": "msg",
}

_CONFIG = """\
global(workDirectory="{workdir}" maxMessageSize="64k")
module(load="imudp")
module(load="imtcp")
input(type="imudp" address="127.0.0.1" port="{udp_port}")
input(type="imtcp" address="127.0.0.1" port="{tcp_port}")
template(name="parsed" type="list" option.jsonf="on") {{
{properties}
  property(outname="timestamp" name="timereported" dateFormat="rfc3339" format="jsonf")
}}
action(type="omfile" file="{output}" template="parsed")
"""

# With RELP: no in-memory main queue, so an acknowledged message is already in the file.
_RELP_CONFIG = """\
module(load="imrelp" tls.tlslib="openssl")
input(type="imrelp" address="127.0.0.1" port="{relp_port}")
main_queue(queue.type="Direct")
"""
# The client is not asked for a certificate (no tls.authMode): the server proves who it is.
_RELP_TLS_CONFIG = """\
input(type="imrelp" address="127.0.0.1" port="{relp_tls_port}" tls="on" tls.cacert="{ca}"
      tls.mycert="{cert}" tls.myprivkey="{key}")
"""

_POLL_INTERVAL = 0.02


def require_imrelp() -> None:
    """Skip (fail in CI) unless rsyslog's imrelp module is installed."""
    found = any(Path(d).glob("imrelp.so") for d in ("/usr/lib/x86_64-linux-gnu/rsyslog",
                                                     "/usr/lib/aarch64-linux-gnu/rsyslog",
                                                     "/usr/lib/rsyslog", "/usr/lib64/rsyslog"))
    if not found:
        reason = "rsyslog's imrelp is not installed (Debian package 'rsyslog-relp')"
        if os.environ.get("CI"):
            pytest.fail(reason + " and CI must run the RELP tests", pytrace=False)
        pytest.skip(reason)


def require_rsyslogd() -> str:
    """The rsyslogd path; skip the test if there is none, fail instead when running in CI."""
    path = shutil.which("rsyslogd") or ("/usr/sbin/rsyslogd"
                                        if os.access("/usr/sbin/rsyslogd", os.X_OK) else None)
    if path is None:
        reason = "rsyslogd is not installed (Debian package 'rsyslog'); real-syslog tests need it"
        if os.environ.get("CI"):
            pytest.fail(reason + " and CI must run them", pytrace=False)
        pytest.skip(reason)
    return path


def _free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RsyslogServer:
    """One rsyslogd subprocess with its config, output file and ports, all under ``directory``."""

    def __init__(self, directory: Path, binary: str | None = None, *, relp: bool = False,
                 relp_tls: tuple[Path, Path, Path] | None = None) -> None:
        self.directory = directory
        self.binary = binary or require_rsyslogd()
        if relp:
            require_imrelp()
        self.relp = relp or relp_tls is not None
        self.relp_tls = relp_tls
        self.output = directory / "parsed.jsonl"
        self.udp_port = 0
        self.tcp_port = 0
        self.relp_port = 0
        self.relp_tls_port = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._lines: list[dict[str, Any]] = []
        self.torn_lines: list[bytes] = []
        self._read_offset = 0
        self._log: BinaryIO | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self, *, attempts: int = 3, ready_timeout: float = 10.0) -> None:
        """Start rsyslogd and return once it parsed a UDP and a TCP probe.

        Ports are picked free just before; if rsyslogd could not bind them after all (another
        process took one in between) it is restarted on new ports, ``attempts`` times at most.
        """
        problems = []
        for _ in range(attempts):
            self._launch()
            try:
                self._wait_ready(ready_timeout)
                return
            except TimeoutError as exc:
                problems.append(str(exc))
                self.stop()
        raise RuntimeError("rsyslogd did not become ready:\n" + "\n".join(problems))

    def kill(self) -> None:
        """Kill rsyslogd at once (SIGKILL), like a crash: nothing is flushed or closed politely."""
        process, self._process = self._process, None
        if process is not None:
            process.kill()
            process.wait(timeout=5)
        if self._log is not None:
            self._log.close()
            self._log = None

    def restart(self, *, ready_timeout: float = 10.0) -> None:
        """Start rsyslogd again on the same ports (after :meth:`kill` or :meth:`stop`)."""
        self._launch(keep_ports=True)
        self._wait_ready(ready_timeout)

    def stop(self) -> None:
        """Stop rsyslogd (SIGTERM, then SIGKILL after a bound)."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        if self._log is not None:
            self._log.close()
            self._log = None

    def _launch(self, *, keep_ports: bool = False) -> None:
        workdir = self.directory / "work"
        workdir.mkdir(parents=True, exist_ok=True)
        if not keep_ports:
            self.udp_port = _free_port(socket.SOCK_DGRAM)
            self.tcp_port = _free_port(socket.SOCK_STREAM)
            self.relp_port = _free_port(socket.SOCK_STREAM) if self.relp else 0
            self.relp_tls_port = _free_port(socket.SOCK_STREAM) if self.relp_tls else 0
        properties = "\n".join(f'  property(outname="{out}" name="{name}" format="jsonf")'
                               for out, name in _PROPERTIES.items())
        config = self.directory / "rsyslog.conf"
        text = _CONFIG.format(workdir=workdir, udp_port=self.udp_port, tcp_port=self.tcp_port,
                              properties=properties, output=self.output)
        if self.relp:
            text += _RELP_CONFIG.format(relp_port=self.relp_port)
        if self.relp_tls:
            ca, cert, key = self.relp_tls
            text += _RELP_TLS_CONFIG.format(relp_tls_port=self.relp_tls_port, ca=ca, cert=cert,
                                            key=key)
        config.write_text(text)
        self._log = open(self.directory / "rsyslogd.stderr", "ab")  # noqa: SIM115 (closed by stop)
        self._process = subprocess.Popen(
            [self.binary, "-n", "-f", str(config), "-i", str(self.directory / "rsyslogd.pid")],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log)

    def _wait_ready(self, timeout: float) -> None:
        probe = f"probe-{uuid.uuid4().hex}"
        deadline = time.monotonic() + timeout
        udp_seen = tcp_seen = False
        tcp_sent = False
        while time.monotonic() < deadline:
            if self._process is None or self._process.poll() is not None:
                raise TimeoutError(f"rsyslogd exited early; see {self.directory}/rsyslogd.stderr")
            self._drain_output()
            udp_seen = udp_seen or any(line.get("msgid") == probe + "-udp" for line in self._lines)
            tcp_seen = tcp_seen or any(line.get("msgid") == probe + "-tcp" for line in self._lines)
            if udp_seen and tcp_seen and (not self.relp or self._relp_listening()):
                return
            # UDP may be dropped before the socket is bound: send a probe on every round.
            if not udp_seen:
                self._send_udp(_probe_message(probe + "-udp"))
            if not tcp_sent:
                tcp_sent = self._try_send_tcp(_probe_message(probe + "-tcp"))
            time.sleep(_POLL_INTERVAL)
        raise TimeoutError(f"rsyslogd on udp {self.udp_port} / tcp {self.tcp_port} did not echo "
                           f"probes within {timeout}s (udp seen: {udp_seen}, tcp seen: {tcp_seen})")

    def _relp_listening(self) -> bool:
        ports = [self.relp_port] + ([self.relp_tls_port] if self.relp_tls else [])
        try:
            for port in ports:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    pass
        except OSError:
            return False
        return True

    def _send_udp(self, message: bytes) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(message, ("127.0.0.1", self.udp_port))

    def _try_send_tcp(self, message: bytes) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.tcp_port), timeout=1) as sock:
                sock.sendall(b"%d %b" % (len(message), message))
            return True
        except OSError:
            return False

    # -- output -------------------------------------------------------------------------------

    def _drain_output(self) -> None:
        """Read complete new lines of the output file (rsyslog may be mid-line)."""
        try:
            with open(self.output, "rb") as f:
                f.seek(self._read_offset)
                chunk = f.read()
        except FileNotFoundError:
            return
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self._read_offset += len(complete)
        for raw in complete.splitlines():
            try:
                self._lines.append(json.loads(raw))
            except ValueError:
                # A line rsyslogd was writing when it was killed, glued to the next one.
                self.torn_lines.append(raw)

    @property
    def lines(self) -> list[dict[str, Any]]:
        """Every line parsed so far (probes included)."""
        self._drain_output()
        return list(self._lines)

    async def wait_for(self, match: Callable[[dict[str, Any]], bool], count: int,
                       timeout: float = 10.0) -> list[dict[str, Any]]:
        """The lines for which ``match`` is true, once there are at least ``count`` of them.

        rsyslogd is another process writing a file, so there is nothing to await but the file:
        it is polled at a short interval, within ``timeout``.
        """
        async with asyncio.timeout(timeout):
            while True:
                found = [line for line in self.lines if match(line)]
                if len(found) >= count:
                    return found
                await asyncio.sleep(_POLL_INTERVAL)


def _probe_message(msgid: str) -> bytes:
    return f"<134>1 - - amid-test-probe - {msgid} - probe".encode()
