"""The sd_notify protocol against a real unix datagram socket standing in for systemd's NOTIFY_SOCKET."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator

import pytest

from amid.systemd import Notifier


@pytest.fixture
def notify_socket(tmp_path) -> Iterator[tuple[str, socket.socket]]:
    """A bound unix datagram socket in tmp, as systemd would create; yields (NOTIFY_SOCKET value, socket)."""
    path = str(tmp_path / "notify")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(path)
    receiver.settimeout(5)  # bounds every wait; datagrams are delivered synchronously on AF_UNIX
    yield path, receiver
    receiver.close()


def receive(receiver: socket.socket) -> bytes:
    return receiver.recv(4096)


def test_disabled_without_notify_socket() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    assert notifier.ready("up") is False
    assert notifier.watchdog() is False
    assert notifier.sent == 0 and notifier.send_errors == 0


def test_unsupported_address_is_disabled() -> None:
    assert not Notifier({"NOTIFY_SOCKET": "vsock:2:1234"}).enabled
    assert not Notifier({"NOTIFY_SOCKET": "@"}).enabled


def test_exact_datagrams_in_order(notify_socket) -> None:
    path, receiver = notify_socket
    notifier = Notifier({"NOTIFY_SOCKET": path})
    assert notifier.enabled

    assert notifier.ready("connected to pbx1; 0 events/s")
    assert notifier.status("connected to pbx1; 1234 events/s; webhook: retrying")
    assert notifier.watchdog()
    assert notifier.extend_timeout(2.5)
    assert notifier.stopping()
    notifier.close()

    assert receive(receiver) == b"READY=1\nSTATUS=connected to pbx1; 0 events/s\n"
    assert receive(receiver) == b"STATUS=connected to pbx1; 1234 events/s; webhook: retrying\n"
    assert receive(receiver) == b"WATCHDOG=1\n"
    assert receive(receiver) == b"EXTEND_TIMEOUT_USEC=2500000\n"
    assert receive(receiver) == b"STOPPING=1\n"
    assert notifier.sent == 5


def test_ready_without_status(notify_socket) -> None:
    path, receiver = notify_socket
    notifier = Notifier({"NOTIFY_SOCKET": path})
    notifier.ready()
    notifier.close()
    assert receive(receiver) == b"READY=1\n"


def test_reloading_carries_monotonic_timestamp(notify_socket) -> None:
    path, receiver = notify_socket
    notifier = Notifier({"NOTIFY_SOCKET": path})
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.ready("reloaded")
    notifier.close()

    lines = receive(receiver).decode().splitlines()
    assert lines[0] == "RELOADING=1"
    key, _, value = lines[1].partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after
    assert receive(receiver) == b"READY=1\nSTATUS=reloaded\n"


def test_newlines_in_a_value_cannot_inject_assignments(notify_socket) -> None:
    path, receiver = notify_socket
    notifier = Notifier({"NOTIFY_SOCKET": path})
    notifier.status("bad\nREADY=1")
    notifier.close()
    assert receive(receiver) == b"STATUS=bad READY=1\n"


def test_abstract_socket_name() -> None:
    name = f"amid-test-{uuid.uuid4().hex}"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(b"\0" + name.encode())
    receiver.settimeout(5)
    try:
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert notifier.enabled
        assert notifier.ready()
        notifier.close()
        assert receive(receiver) == b"READY=1\n"
    finally:
        receiver.close()


def test_send_errors_are_counted_not_raised(tmp_path) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    assert notifier.enabled
    assert notifier.ready() is False
    assert notifier.watchdog() is False
    assert notifier.send_errors == 2
    assert notifier.sent == 0
    notifier.close()
    notifier.close()  # idempotent


def test_send_recovers_once_the_socket_appears(tmp_path) -> None:
    path = str(tmp_path / "late")
    notifier = Notifier({"NOTIFY_SOCKET": path})
    assert notifier.status("early") is False
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(path)
    receiver.settimeout(5)
    try:
        assert notifier.status("late")
        assert receive(receiver) == b"STATUS=late\n"
    finally:
        notifier.close()
        receiver.close()


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
        ({"WATCHDOG_USEC": "500000"}, 0.25),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "x"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(environ, expected) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": "/run/systemd/notify", **environ}, pid=4242)
    assert notifier.watchdog_interval == expected


def test_watchdog_pid_defaults_to_our_own() -> None:
    environ = {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier(environ).watchdog_interval == 1.0


def test_no_watchdog_without_notify_socket() -> None:
    assert Notifier({"WATCHDOG_USEC": "30000000"}).watchdog_interval is None
