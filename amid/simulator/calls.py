"""Simulated calls: the real Asterisk event sequences of a call, re-rendered per call.

A call is a template (``_call_templates.py``, extracted from the captures) rendered with this
call's channel sequence numbers, Uniqueids, bridge id, Cdr times and originate ActionID, then
played out over time with ``loop.call_at`` timers (no task per call). ``spread`` scales the
captured timing: ``1.0`` gives Asterisk's own pacing (about 1 s for the short call), ``0``
emits everything at once.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Callable, Sequence
from random import Random

from . import _call_templates

__all__ = ["LONG_CALL", "SHORT_CALL", "Call", "CallTemplate", "IdAllocator", "template_for"]

_PLACEHOLDER = re.compile(rb"\$\{([a-z_]+[0-9]*|time\+[0-9]+)\}")


class _CompiledEvent:
    """An event template split into literal bytes and placeholder names, for fast rendering."""

    __slots__ = ("offset", "parts")

    def __init__(self, offset: float, raw: bytes) -> None:
        self.offset = offset
        parts: list[bytes | str] = []
        pos = 0
        for m in _PLACEHOLDER.finditer(raw):
            parts.append(raw[pos:m.start()])
            parts.append(m.group(1).decode())
            pos = m.end()
        parts.append(raw[pos:])
        self.parts = [p for p in parts if p != b""]

    def render(self, values: dict[str, bytes]) -> bytes:
        return b"".join(p if isinstance(p, bytes) else values[p] for p in self.parts)


class CallTemplate:
    """A call shape: setup events, an optional hold, teardown events."""

    def __init__(self, name: str, setup: Sequence[tuple[float, bytes]],
                 teardown: Sequence[tuple[float, bytes]] = (), *, holds: bool = False) -> None:
        self.name = name
        self.setup = [_CompiledEvent(t, raw) for t, raw in setup]
        self.teardown = [_CompiledEvent(t, raw) for t, raw in teardown]
        self.holds = holds
        names = {p for ev in self.setup + self.teardown for p in ev.parts if isinstance(p, str)}
        self.uid_count = len({n for n in names if n.startswith("uid")})
        self.seq_count = len({n for n in names if n.startswith("seq")})
        self.bridge_count = len({n for n in names if n.startswith("bridge")})
        self.time_offsets = sorted(int(n[5:]) for n in names if n.startswith("time+"))
        self.setup_span = max((e.offset for e in self.setup), default=0.0)


# Local/200@test -> exten 100: Answer, Wait(1), UserEvent(TestEvent), Hangup (s04, 80 events).
SHORT_CALL = CallTemplate("short", _call_templates.SHORT_CALL)
# Local/310@test -> exten 300: Answer, Wait(30), a bridged call that stays up (s05b).
LONG_CALL = CallTemplate("long", _call_templates.LONG_CALL_SETUP,
                         _call_templates.LONG_CALL_TEARDOWN, holds=True)
# The short template's span in the capture, used to map ``spread`` onto it.
_REFERENCE_SPAN = SHORT_CALL.setup_span


def template_for(channel: str, exten: str | None) -> CallTemplate:
    """The simulated dialplan: ``Local/310@…`` (or exten 300) is the long call, the rest short."""
    if channel.startswith("Local/310@") or exten == "300":
        return LONG_CALL
    return SHORT_CALL


class IdAllocator:
    """Server-wide counters Asterisk uses for channel names and Uniqueids."""

    def __init__(self, rng: Random) -> None:
        self.rng = rng
        self.next_uid = 0
        self.next_seq = 0

    def uniqueid(self, now: float) -> str:
        uid = f"{int(now)}.{self.next_uid}"
        self.next_uid += 1
        return uid

    def channel_seq(self) -> str:
        seq = f"{self.next_seq:08x}"
        self.next_seq += 1
        return seq

    def bridge_id(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))


def render_values(template: CallTemplate, ids: IdAllocator, now: float,
                  action_id: str | None) -> dict[str, bytes]:
    """The placeholder values of one call."""
    values: dict[str, bytes] = {}
    for i in range(template.uid_count):
        values[f"uid{i}"] = ids.uniqueid(now).encode()
    for i in range(template.seq_count):
        values[f"seq{i}"] = ids.channel_seq().encode()
    for i in range(template.bridge_count):
        values[f"bridge{i}"] = ids.bridge_id().encode()
    for k in template.time_offsets:
        values[f"time+{k}"] = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now + k)).encode()
    values["actionid_line"] = (b"ActionID: " + action_id.encode("utf-8", "surrogateescape") + b"\r\n"
                               if action_id else b"")
    return values


class Call:
    """One call being played out. Created and driven by the simulator.

    ``emit(call, raw)`` receives each event's bytes when it is due. ``finished`` is set once the last
    event has been emitted (or the call was cancelled).
    """

    def __init__(self, template: CallTemplate, ids: IdAllocator,
                 emit: Callable[[Call, bytes], None], *,
                 action_id: str | None = None, spread: float = 1.0, hold: float = 30.0,
                 on_done: Callable[[Call], None] | None = None) -> None:
        self.template = template
        self.started_at = time.time()
        self._loop = asyncio.get_running_loop()
        self._emit = emit
        self._on_done = on_done
        values = render_values(template, ids, self.started_at, action_id)
        scale = spread / _REFERENCE_SPAN if _REFERENCE_SPAN else 0.0
        t0 = self._t0 = self._loop.time()
        # (due loop time, bytes): the whole call is rendered up front, so hangups and
        # cancellation only have to move or drop entries.
        self._pending: list[tuple[float, bytes]] = []
        for ev in template.setup:
            self._pending.append((t0 + ev.offset * scale, ev.render(values)))
        self._teardown_from = len(self._pending)
        hold_until = t0 + template.setup_span * scale + hold
        for ev in template.teardown:
            self._pending.append((hold_until + ev.offset * scale, ev.render(values)))
        self._next = 0
        self._timer: asyncio.TimerHandle | None = None
        self.finished = asyncio.Event()

    @property
    def live(self) -> bool:
        return not self.finished.is_set()

    def start(self) -> None:
        """Emit what is due at the call's start (everything, with spread 0) and schedule the
        rest: what falls due later comes from its timer even if rendering took a while, so the
        first events never depend on how busy the machine was."""
        self._advance(self._t0)

    def hang_up(self) -> None:
        """Hang the call up now: every remaining event (teardown) is emitted right away."""
        if not self.live:
            return
        now = self._loop.time()
        self._pending[self._next:] = [(now, raw) for _, raw in self._pending[self._next:]]
        self._advance()

    def cancel(self) -> None:
        """Stop without emitting anything more (simulator shutdown)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._next = len(self._pending)
        self._finish()

    def _advance(self, now: float | None = None) -> None:
        self._timer = None
        if now is None:
            now = self._loop.time()
        pending = self._pending
        while self._next < len(pending) and pending[self._next][0] <= now:
            raw = pending[self._next][1]
            self._next += 1
            self._emit(self, raw)
        if self._next < len(pending):
            self._timer = self._loop.call_at(pending[self._next][0], self._advance)
        else:
            self._finish()

    def _finish(self) -> None:
        if not self.finished.is_set():
            self.finished.set()
            if self._on_done is not None:
                self._on_done(self)


def prebuilt_call_events(calls: int = 50, *, seed: int = 0) -> list[bytes]:
    """``calls`` × 80 complete short-call events with distinct Uniqueids and channel names,
    rendered once (benchmark streaming source)."""
    ids = IdAllocator(Random(seed))
    now = time.time()
    out: list[bytes] = []
    for _ in range(calls):
        values = render_values(SHORT_CALL, ids, now, "bench")
        out.extend(ev.render(values) for ev in SHORT_CALL.setup)
    return out
