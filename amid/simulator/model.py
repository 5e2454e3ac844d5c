"""Shared vocabulary of the simulator: permission classes, event masks, events, filters."""

from __future__ import annotations

import enum
import re
import time
from datetime import datetime

from .channels import parse_event

__all__ = ["ALL_CLASSES", "EventFilter", "OutEvent", "SessionState", "event_tv", "parse_event_mask"]

# Asterisk's event/permission classes (manager.c `perms`), "all" excepted.
ALL_CLASSES = frozenset({"system", "call", "log", "verbose", "command", "agent", "user", "config",
                         "dtmf", "reporting", "cdr", "dialplan", "originate", "agi", "cc", "aoc",
                         "test", "security", "message"})
_TRUE = {"yes", "true", "y", "t", "1", "on"}
_FALSE = {"no", "false", "n", "f", "0", "off"}
_PRIVILEGE = re.compile(rb"(?:^|\r\n)Privilege: ([^\r\n]*)")
_EVENT_NAME = re.compile(rb"^Event: ([^\r\n]*)")


class SessionState(enum.Enum):
    CONNECTED = "connected"          # banner sent, not logged in
    AUTHENTICATED = "authenticated"
    CLOSING = "closing"              # auth failure pending, Logoff answered, or server closing
    CLOSED = "closed"


class OutEvent:
    """An event ready for fan-out: its bytes (with the blank line), name and classes."""

    __slots__ = ("classes", "name", "raw")

    def __init__(self, raw: bytes) -> None:
        if not raw.endswith(b"\r\n\r\n"):
            raw = raw.rstrip(b"\r\n") + b"\r\n\r\n"
        self.raw = raw
        m = _EVENT_NAME.match(raw)
        self.name = m.group(1).decode("utf-8", "surrogateescape") if m else ""
        p = _PRIVILEGE.search(raw)
        if p:
            classes = {c.strip().lower() for c in p.group(1).decode("ascii", "replace").split(",")}
            classes.discard("all")
            self.classes: frozenset[str] | None = frozenset(classes)
        else:
            self.classes = None  # no Privilege line: delivered to every session with events on


def parse_event_mask(value: str) -> frozenset[str] | None:
    """Asterisk's ``strings_to_mask``: None for an empty value (no change / invalid)."""
    value = value.strip()
    if not value:
        return None
    lowered = value.lower()
    if lowered.isdigit():
        return ALL_CLASSES if int(lowered) else frozenset()
    if lowered in _TRUE:
        return ALL_CLASSES
    if lowered in _FALSE:
        return frozenset()
    classes = {c.strip() for c in lowered.split(",")}
    return ALL_CLASSES if "all" in classes else frozenset(classes & ALL_CLASSES)


class EventFilter:
    """One session filter (``Action: Filter``), legacy regex or 22.x ``MatchCriteria``."""

    def __init__(self, *, include: bool, name: str | None = None, header: str | None = None,
                 method: str = "regex", value: str | None = None) -> None:
        self.include = include
        self.name = name.lower() if name else None
        self.header = header.rstrip(":").lower() if header else None
        self.method = method
        self.value = value.encode("utf-8", "surrogateescape") if value is not None else None
        # Compile now: a bad regex is refused when the filter is added (re.error).
        self.regex = re.compile(self.value) if method == "regex" and self.value is not None else None

    def matches(self, event: OutEvent) -> bool:
        if self.name is not None and event.name.lower() != self.name:
            return False
        if self.value is None or self.method == "none":
            return True
        if self.header is not None:
            fields_ = parse_event(event.raw)
            targets = [v.encode("utf-8", "surrogateescape") for k, v in fields_.items()
                       if k.lower() == self.header]
        else:
            targets = [event.raw[:-4]]
        return any(self._match(t) for t in targets)

    def _match(self, target: bytes) -> bool:
        value = self.value
        assert value is not None  # matches() takes a filter without a value as matching all
        if self.regex is not None:
            return self.regex.search(target) is not None
        if self.method == "exact":
            return target == value
        if self.method == "starts_with":
            return target.startswith(value)
        if self.method == "ends_with":
            return target.endswith(value)
        return value in target  # contains


def event_tv(when: float | None = None) -> str:
    """Asterisk's security-event timestamp: ``2026-11-28T03:21:28.307+0000`` (local time)."""
    when = time.time() if when is None else when
    dt = datetime.fromtimestamp(when).astimezone()
    return dt.strftime("%Y-%m-%dT%H:%M:%S") + f".{dt.microsecond // 1000:03d}" + dt.strftime("%z")
