"""The simulator's live channels and bridges, kept up to date from the events it emits.

Every call event the simulator sends carries Asterisk's channel snapshot (``Channel`` …
``Linkedid``, or the same keys prefixed ``Dest``/``LocalOne``/``LocalTwo``). Applying the
emitted events to this tracker gives ``CoreShowChannels``, ``Status``, ``BridgeList`` and
``core show channels`` the same view of the world the event stream described, for any call
template, without a second model of a call.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

__all__ = ["Bridge", "Channel", "ChannelTracker", "parse_event"]

SNAPSHOT_KEYS = ("ChannelState", "ChannelStateDesc", "CallerIDNum", "CallerIDName",
                 "ConnectedLineNum", "ConnectedLineName", "Language", "AccountCode",
                 "Context", "Exten", "Priority", "Uniqueid", "Linkedid")
_SNAPSHOT_PREFIXES = ("", "Dest", "LocalOne", "LocalTwo")
_BRIDGE_KEYS = ("BridgeUniqueid", "BridgeType", "BridgeTechnology", "BridgeCreator",
                "BridgeName", "BridgeNumChannels", "BridgeVideoSourceMode")
_LOCAL_NAME = re.compile(r"^(Local/.*-([0-9a-f]{8}));([12])$")
# Applications that run a dial leg rather than the dialplan: not counted as "calls".
_DIAL_LEG_APPS = ("AppDial", "AppDial2")


def parse_event(raw: bytes) -> dict[str, str]:
    """First value of every key of an event (bytes -> str, surrogateescape)."""
    fields: dict[str, str] = {}
    for line in raw.decode("utf-8", "surrogateescape").split("\r\n"):
        key, sep, value = line.partition(": ")
        if sep and key not in fields:
            fields[key] = value
    return fields


@dataclass
class Channel:
    """One live channel: its snapshot fields in Asterisk's order plus dialplan state."""

    name: str
    created_at: float
    snapshot: dict[str, str]
    application: str = ""
    app_data: str = ""
    bridge_id: str = ""
    variables: dict[str, str] = field(default_factory=dict)
    runs_dialplan: bool = False

    @property
    def order_key(self) -> tuple:
        # Asterisk lists channels in hash order; the captures (s05a, s06) show each Local
        # pair newest-side first (;2 before ;1), pairs in creation order. Reproduce that.
        m = _LOCAL_NAME.match(self.name)
        if m:
            return (0, int(m.group(2), 16), -int(m.group(3)), self.created_at)
        return (1, 0, 0, self.created_at)

    @property
    def local_partner(self) -> str | None:
        m = _LOCAL_NAME.match(self.name)
        if not m:
            return None
        return f"{m.group(1)};{'1' if m.group(3) == '2' else '2'}"

    def seconds_up(self, now: float) -> int:
        return max(0, int(now - self.created_at))


@dataclass
class Bridge:
    fields: dict[str, str]
    members: list[str] = field(default_factory=list)


class ChannelTracker:
    """Live channels and bridges, updated by :meth:`apply` with every emitted event."""

    def __init__(self) -> None:
        self.channels: dict[str, Channel] = {}
        self.bridges: dict[str, Bridge] = {}
        self.processed_calls = 0

    def apply(self, name: str, fields: dict[str, str], now: float | None = None) -> None:
        """Update the state from one event (``name`` = its ``Event:`` value)."""
        now = time.time() if now is None else now
        if name == "Newchannel":
            new = Channel(fields["Channel"], now, {k: fields.get(k, "") for k in SNAPSHOT_KEYS})
            self.channels[new.name] = new
            return
        for prefix in _SNAPSHOT_PREFIXES:
            chan = self.channels.get(fields.get(prefix + "Channel", ""))
            if chan is not None:
                for key in SNAPSHOT_KEYS:
                    value = fields.get(prefix + key)
                    if value is not None:
                        chan.snapshot[key] = value
        chan = self.channels.get(fields.get("Channel", ""))
        if name == "Newexten" and chan is not None:
            chan.application = fields.get("Application", "")
            chan.app_data = fields.get("AppData", "")
            if chan.application not in _DIAL_LEG_APPS and not chan.runs_dialplan:
                chan.runs_dialplan = True
                self.processed_calls += 1
        elif name == "VarSet" and chan is not None:
            chan.variables[fields.get("Variable", "")] = fields.get("Value", "")
        elif name == "Hangup" and chan is not None:
            del self.channels[chan.name]
        elif name.startswith("Bridge") and "BridgeUniqueid" in fields:
            self._apply_bridge(name, fields, chan)

    def _apply_bridge(self, name: str, fields: dict[str, str], chan: Channel | None) -> None:
        bridge_id = fields["BridgeUniqueid"]
        if name == "BridgeDestroy":
            self.bridges.pop(bridge_id, None)
            return
        bridge = self.bridges.setdefault(bridge_id, Bridge({}))
        bridge.fields = {k: fields[k] for k in _BRIDGE_KEYS if k in fields}
        if chan is not None and name == "BridgeEnter":
            chan.bridge_id = bridge_id
            bridge.members.append(chan.name)
        elif chan is not None and name == "BridgeLeave":
            chan.bridge_id = ""
            if chan.name in bridge.members:
                bridge.members.remove(chan.name)

    def ordered(self) -> list[Channel]:
        """Live channels in the order Asterisk lists them."""
        return sorted(self.channels.values(), key=lambda c: c.order_key)

    def find(self, name: str) -> Channel | None:
        """A channel by exact name (case-insensitive, like ``ast_channel_get_by_name``) or uniqueid."""
        chan = self.channels.get(name)
        if chan is not None:
            return chan
        lowered = name.lower()
        for chan in self.channels.values():
            if chan.name.lower() == lowered or chan.snapshot.get("Uniqueid") == name:
                return chan
        return None

    def connected(self, chan: Channel) -> list[str]:
        """``CoreShowChannelMap``: channels reachable through the bridge, following Local pairs."""
        out: list[str] = []
        seen = {chan.name}
        if chan.local_partner:
            seen.add(chan.local_partner)
        todo = [chan]
        while todo:
            cur = todo.pop(0)
            bridge = self.bridges.get(cur.bridge_id) if cur.bridge_id else None
            peers = [self.channels[n] for n in (bridge.members if bridge else ()) if n in self.channels]
            partner = self.channels.get(cur.local_partner or "") if cur is not chan else None
            for peer in ([partner] if partner else []) + peers:
                if peer.name not in seen:
                    seen.add(peer.name)
                    out.append(peer.name)
                    todo.append(peer)
        return sorted(out, key=lambda n: self.channels[n].order_key[:2] + (-self.channels[n].order_key[2],))

    @property
    def active_calls(self) -> int:
        return sum(1 for c in self.channels.values() if c.runs_dialplan)
