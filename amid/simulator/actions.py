"""The manager actions the simulator answers, in Asterisk 22.10.1's exact formats.

Input quirks follow Asterisk's own parser (README 7d): header and action names match
case-insensitively, leading blanks of a value are dropped and trailing ones kept, the first of
duplicate headers wins, and the ActionID is echoed byte for byte.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from ..ami.protocol import Message
from ._asterisk_text import CORE_SHOW_VERSION, DIALPLAN_SHOW, LIST_COMMANDS
from .channels import Channel
from .model import (
    ALL_CLASSES,
    EventFilter,
    OutEvent,
    SessionState,
    event_tv,
    parse_event_mask,
)

if TYPE_CHECKING:
    from .server import AMISimulator, SimSession

__all__ = ["handle"]

Pairs = Iterable[tuple[str | bytes, str | bytes]]
# Action name (lower case) -> the write classes allowed to run it (empty: anybody).
ACTION_PRIVILEGES: dict[str, frozenset[str]] = {
    name.lower(): frozenset(p for p in privs.split(",") if p not in ("all", "<none>"))
    for name, _, privs in LIST_COMMANDS
}
_PRE_LOGIN_ACTIONS = ("login", "logoff", "challenge")


def header(msg: Message, key: str) -> str:
    """A header's value the way ``astman_get_header`` returns it: leading blanks skipped."""
    value = msg.get(key)
    return value.lstrip(" \t") if value else ""


def _b(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")


def _lines(pairs: Pairs) -> bytes:
    return b"".join(_b(k) + b": " + _b(v) + b"\r\n" for k, v in pairs)


def _aid_line(aid: bytes | None) -> bytes:
    return b"ActionID: " + aid + b"\r\n" if aid else b""


def response(status: str, aid: bytes | None, pairs: Pairs = ()) -> bytes:
    """``Response: <status>``, the ActionID as the 2nd line (when given), then ``pairs``."""
    return b"Response: " + status.encode() + b"\r\n" + _aid_line(aid) + _lines(pairs) + b"\r\n"


def error(aid: bytes | None, message: str) -> bytes:
    return response("Error", aid, [("Message", message)])


def ack(aid: bytes | None, message: str) -> bytes:
    return response("Success", aid, [("Message", message)])


def list_start(aid: bytes | None, message: str) -> bytes:
    return response("Success", aid, [("EventList", "start"), ("Message", message)])


def list_item(name: str, aid: bytes | None, pairs: Pairs) -> bytes:
    """A list item with the ActionID as 2nd line and no Privilege (CoreShowChannel & co)."""
    return b"Event: " + name.encode() + b"\r\n" + _aid_line(aid) + _lines(pairs) + b"\r\n"


def list_complete(name: str, aid: bytes | None, count: int, extra: Pairs = ()) -> bytes:
    return list_item(name, aid, [("EventList", "Complete"), ("ListItems", str(count)), *extra])


def handle(sim: AMISimulator, session: SimSession, msg: Message) -> None:
    """Answer one action (or ignore it, for the faults that say so)."""
    sim.stats.actions += 1
    raw_aid = header(msg, "ActionID")
    aid = raw_aid.encode("utf-8", "surrogateescape") if raw_aid else None
    action = header(msg, "Action")
    if not action:
        session.send(error(aid, "Missing action in request"))
        return
    name = action.lower()
    if not session.logged_in and name not in _PRE_LOGIN_ACTIONS:
        sim.security_event(session, "RequestNotAllowed", severity="Error",
                           extra=[("RequestType", f"Action: {action}")])
        session.send(error(aid, "Permission denied"))
        return
    if sim.shutting_down:
        session.send(error(aid, "Asterisk is shutting down"))
        return
    handler = _HANDLERS.get(name)
    if handler is None:
        if name in ACTION_PRIVILEGES:
            session.send(error(aid, f"{action} is not implemented by the amid simulator"))
        else:
            session.send(error(aid, f"Invalid/unknown command: {action}. "
                                    "Use Action: ListCommands to show available commands."))
        return
    needed = ACTION_PRIVILEGES.get(name)
    if needed and session.user is not None and not (needed & session.user.write):
        session.send(error(aid, "Permission denied"))
        return
    handler(sim, session, msg, aid)


# -- authentication -------------------------------------------------------------------------
def _login(sim: AMISimulator, session: SimSession, msg: Message, aid: bytes | None) -> None:
    if session.logged_in:
        session.send(ack(aid, "Already authenticated"))
        return
    username = header(msg, "Username")
    user = sim.users.get(username)
    md5 = header(msg, "AuthType").lower() == "md5"
    failure: tuple[str, dict] | None = None
    if user is None:
        failure = ("InvalidAccountID", {"account": username})
    elif md5:
        expected = sim.md5_key(session.challenge or "", user.secret)
        if not session.challenge or header(msg, "Key").lower() != expected:
            failure = ("ChallengeResponseFailed", {"extra": [
                ("Challenge", session.challenge or ""), ("Response", header(msg, "Key")),
                ("ExpectedResponse", expected)]})
    elif header(msg, "Secret") != user.secret:
        failure = ("InvalidPassword", {"account": username, "version": 2})
    if failure is not None:
        sim.stats.failed_logins += 1
        event, kwargs = failure
        sim.security_event(session, event, severity="Error", **kwargs)
        session.fail_login_later(error(aid, "Authentication failed"), sim.auth_failure_delay)
        return
    mask = parse_event_mask(header(msg, "Events"))
    session.user = user
    session.event_mask = ALL_CLASSES if mask is None else mask
    session.state = SessionState.AUTHENTICATED
    session.login_time = time.time()
    sim.stats.logins += 1
    session.send(ack(aid, "Authentication accepted"))
    if "system" in session.event_classes:
        now = time.time()
        session.send_event(list_item("FullyBooted", None, [
            ("Privilege", "system,all"), ("Uptime", str(int(now - sim.started_at))),
            ("LastReload", str(int(now - sim.reloaded_at))), ("Status", "Fully Booted")]))
    tv = event_tv(session.login_time)
    assert user is not None  # a failed login returned above
    sim.security_event(session, "SuccessfulAuth", severity="Informational", account=user.username,
                       extra=[("UsingPassword", "0")], session_tv=tv)
    sim._notify_sessions()
    sim._start_stream_on_login(session)


def _challenge(sim: AMISimulator, session: SimSession, msg: Message, aid: bytes | None) -> None:
    if header(msg, "AuthType").lower() != "md5":
        session.send(error(aid, "Must specify AuthType"))
        return
    if not session.challenge:
        session.challenge = sim.new_challenge()
    session.send(response("Success", aid, [("Challenge", session.challenge)]))


def _logoff(sim: AMISimulator, session: SimSession, msg: Message, aid: bytes | None) -> None:
    session.end_reason = "logoff"
    session.send(response("Goodbye", aid, [("Message", "Thanks for all the fish.")]))
    session.close()


# -- test control (not Asterisk's): what a conservation test reads back and injects -------------
_FAULTS = ("close_mid_message", "half_open", "garbage", "restart")


def _test_stats(sim: AMISimulator, session: SimSession, msg: Message, aid: bytes | None) -> None:
    """``Action: AmidTestStats``: the simulator's counters and numbered streams, one JSON line."""
    session.send(response("Success", aid, [("Stats", json.dumps(sim.stats.as_dict()))]))


def _test_fault(sim: AMISimulator, session: SimSession, msg: Message, aid: bytes | None) -> None:
    """``Action: AmidTestFault``, ``Fault: close_mid_message|half_open|garbage|restart``, on every
    other session with a numbered stream (``Session: N`` for one); ``restart`` takes ``DownFor``
    (seconds, default 0)."""
    fault = header(msg, "Fault").lower()
    wanted = header(msg, "Session")
    if fault not in _FAULTS or (wanted and not wanted.isdigit()):
        session.send(error(aid, f"Fault must be one of {', '.join(_FAULTS)}; Session a number"))
        return
    if fault == "restart":
        try:
            down_for = float(header(msg, "DownFor") or 0)
        except ValueError:
            down_for = -1.0
        if not down_for >= 0:
            session.send(error(aid, "DownFor must be 0 or more seconds"))
            return
        session.send(ack(aid, "Restarting"))
        sim._spawn(sim.restart(down_for=down_for))
        return
    targets = [s for s in sim.sessions if s is not session and s.stream is not None
               and (not wanted or s.number == int(wanted))]
    for target in targets:
        if fault == "close_mid_message":
            target.faults.close_mid_message_after = 0
        elif fault == "half_open":
            target.faults.stall = target.faults.ignore_pings = True
        else:
            target.faults.garbage = bytes(sim._rng.getrandbits(8) for _ in range(512))
    session.send(ack(aid, f"{fault} on {len(targets)} sessions"))


# -- session control ----------------------------------------------------------------------------
def _ping(sim: AMISimulator, session: SimSession, msg: Message, aid: bytes | None) -> None:
    if session.faults.ignore_pings:
        return  # half-open simulation: the socket stays open, the Pong never comes
    now = time.time()
    session.send(response("Success", aid, [("Ping", "Pong"), ("Timestamp", f"{now:.6f}")]))


def _events(sim: AMISimulator, session: SimSession, msg: Message, aid: bytes | None) -> None:
    mask = parse_event_mask(header(msg, "EventMask"))
    if mask is None:
        session.send(error(aid, "Invalid event mask"))
        return
    session.event_mask = mask
    session.send(response("Success", aid, [("Events", "On" if mask else "Off")]))


_CRITERIA = re.compile(r"(\w+)\(([^)]*)\)")


def _filter(sim: AMISimulator, session: SimSession, msg: Message, aid: bytes | None) -> None:
    if header(msg, "Operation").lower() != "add":
        session.send(error(aid, "Unknown operation"))
        return
    criteria = header(msg, "MatchCriteria")
    value = msg.get("Filter")
    value = value.lstrip(" \t") if value is not None else None
    try:
        if criteria:
            parts = {k.lower(): v for k, v in _CRITERIA.findall(criteria)}
            new = EventFilter(include=parts.get("action", "include").lower() != "exclude",
                              name=parts.get("name"), header=parts.get("header"),
                              method=parts.get("method", "regex").lower(), value=value)
        elif value:
            include = not value.startswith("!")
            new = EventFilter(include=include, value=value if include else value[1:])
        else:
            session.send(error(aid, "Your filter was formatted incorrectly.  Check the syntax"))
            return
    except re.error:
        session.send(error(aid, "Filter did not compile.  Check the syntax of the filter given."))
        return
    session.filters.append(new)
    session.send(ack(aid, "Success"))


def _list_commands(sim: AMISimulator, session: SimSession, msg: Message,
                   aid: bytes | None) -> None:
    write = session.user.write if session.user else set()
    pairs = [(name, f"{synopsis}  (Priv: {privs})") for name, synopsis, privs in LIST_COMMANDS
             if not ACTION_PRIVILEGES[name.lower()] or ACTION_PRIVILEGES[name.lower()] & write]
    session.send(response("Success", aid, pairs))


def _user_event(sim: AMISimulator, session: SimSession, msg: Message,
                aid: bytes | None) -> None:
    # manager.c action_userevent: every header line except Action and UserEvent, verbatim.
    body = [line for line in re.split(rb"\r?\n", msg.raw)
            if line and not line.lower().startswith((b"action:", b"userevent:"))]
    name = header(msg, "UserEvent").encode("utf-8", "surrogateescape")
    session.send(ack(aid, "Event Sent"))
    raw = b"Event: UserEvent\r\nPrivilege: user,all\r\nUserEvent: " + name + b"\r\n"
    raw += b"".join(line + b"\r\n" for line in body) + b"\r\n"
    sim._broadcast(OutEvent(raw))


# -- calls and channels ---------------------------------------------------------------------------
def _originate(sim: AMISimulator, session: SimSession, msg: Message, aid: bytes | None) -> None:
    channel = header(msg, "Channel")
    if not channel:
        session.send(error(aid, "Channel not specified"))
        return
    session.send(ack(aid, "Originate successfully queued"))
    # The OriginateResponse event carries the ActionID as received.
    sim.originate(channel, exten=header(msg, "Exten") or None,
                  action_id=aid.decode("utf-8", "surrogateescape") if aid else None)


def _duration(seconds: int) -> str:
    return f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _core_show_channels(sim: AMISimulator, session: SimSession, msg: Message,
                        aid: bytes | None) -> None:
    now = time.time()
    out = [list_start(aid, "Channels will follow")]
    chans = sim.channels.ordered()
    for chan in chans:
        out.append(list_item("CoreShowChannel", aid, [
            ("Channel", chan.name), *chan.snapshot.items(),
            ("Application", chan.application), ("ApplicationData", chan.app_data),
            ("Duration", _duration(chan.seconds_up(now))), ("BridgeId", chan.bridge_id)]))
    out.append(list_complete("CoreShowChannelsComplete", aid, len(chans)))
    session.send(b"".join(out))


def _status(sim: AMISimulator, session: SimSession, msg: Message, aid: bytes | None) -> None:
    name = header(msg, "Channel")
    if name:
        chan = sim.channels.find(name)
        if chan is None:
            session.send(error(aid, "No such channel"))
            return
        chans = [chan]
    else:
        chans = sim.channels.ordered()
    wanted = [v.strip() for v in header(msg, "Variables").split(",") if v.strip()]
    all_vars = header(msg, "AllVariables").lower() in ("yes", "true", "1", "on")
    now = time.time()
    out = [list_start(aid, "Channel status will follow")]
    for chan in chans:
        pairs: list[tuple[str | bytes, str | bytes]] = [
            ("Privilege", "Call"), ("Channel", chan.name), *chan.snapshot.items(),
            ("Type", chan.name.partition("/")[0]), ("DNID", ""),
            ("EffectiveConnectedLineNum", chan.snapshot["ConnectedLineNum"]),
            ("EffectiveConnectedLineName", chan.snapshot["ConnectedLineName"]),
            ("TimeToHangup", "0"), ("BridgeID", chan.bridge_id),
            ("Application", chan.application), ("Data", chan.app_data),
            ("Nativeformats", "(slin)"), ("Readformat", "slin"), ("Readtrans", ""),
            ("Writeformat", "slin"), ("Writetrans", ""), ("Callgroup", "0"),
            ("Pickupgroup", "0"), ("Seconds", str(chan.seconds_up(now)))]
        names = list(chan.variables) if all_vars else wanted
        pairs += [("Variable", f"{v}={_variable(chan, v)}") for v in names]
        if aid:
            pairs.append(("ActionID", aid))  # Status puts the ActionID last (README quirk 3)
        out.append(b"Event: Status\r\n" + _lines(pairs) + b"\r\n")
    out.append(list_complete("StatusComplete", aid, len(chans), [("Items", str(len(chans)))]))
    session.send(b"".join(out))


def _variable(chan: Channel, name: str) -> str:
    if name == "CHANNEL":
        return chan.name
    return chan.variables.get(name, "(null)")


def _bridge_list(sim: AMISimulator, session: SimSession, msg: Message,
                 aid: bytes | None) -> None:
    out = [list_start(aid, "Bridge listing will follow")]
    bridges = list(sim.channels.bridges.values())
    for bridge in bridges:
        out.append(list_item("BridgeListItem", aid, bridge.fields.items()))
    out.append(list_complete("BridgeListComplete", aid, len(bridges)))
    session.send(b"".join(out))


def _core_show_channel_map(sim: AMISimulator, session: SimSession, msg: Message,
                           aid: bytes | None) -> None:
    name = header(msg, "Channel")
    chan = sim.channels.find(name) if name else None
    if chan is None:
        # Not in the captures: wording chosen by the simulator.
        session.send(error(aid, "No such channel" if name else "No channel specified"))
        return
    connected = sim.channels.connected(chan)
    out = [list_start(aid, "Channel map will follow")]
    for other in connected:
        out.append(list_item("CoreShowChannelMap", aid,
                             [("Channel", chan.name), ("ConnectedChannel", other)]))
    out.append(list_complete("CoreShowChannelMapComplete", aid, len(connected)))
    session.send(b"".join(out))


def _core_status(sim: AMISimulator, session: SimSession, msg: Message,
                 aid: bytes | None) -> None:
    start, reload_ = time.localtime(sim.started_at), time.localtime(sim.reloaded_at)
    session.send(response("Success", aid, [
        ("CoreStartupDate", time.strftime("%Y-%m-%d", start)),
        ("CoreStartupTime", time.strftime("%H:%M:%S", start)),
        ("CoreReloadDate", time.strftime("%Y-%m-%d", reload_)),
        ("CoreReloadTime", time.strftime("%H:%M:%S", reload_)),
        ("CoreCurrentCalls", str(len(sim.channels.channels))),
        ("CoreProcessedCalls", str(sim.channels.processed_calls))]))


def _hangup(sim: AMISimulator, session: SimSession, msg: Message, aid: bytes | None) -> None:
    target = header(msg, "Channel")
    if not target:
        session.send(error(aid, "No channel specified"))
        return
    if len(target) > 1 and target.startswith("/") and target.endswith("/"):
        try:
            regex = re.compile(target[1:-1])
        except re.error:
            session.send(error(aid, "Regex compile failed on: " + target[1:-1]))
            return
        matched = [c.name for c in sim.channels.ordered() if regex.search(c.name)]
        out = [list_start(aid, "Channels hung up will follow")]
        for name in matched:
            # ChannelHungup puts the ActionID 3rd, after Channel (README quirk 3).
            out.append(b"Event: ChannelHungup\r\n" + _lines([("Channel", name)]) + _aid_line(aid)
                       + b"\r\n")
        out.append(list_complete("ChannelsHungupListComplete", aid, len(matched)))
        session.send(b"".join(out))
    else:
        chan = sim.channels.find(target)
        if chan is None:
            session.send(error(aid, "No such channel"))
            return
        matched = [chan.name]
        session.send(ack(aid, "Channel Hungup"))
    for call in sim.calls_of(matched):
        call.hang_up()


def _getvar(sim: AMISimulator, session: SimSession, msg: Message, aid: bytes | None) -> None:
    variable = header(msg, "Variable")
    if not variable:
        session.send(error(aid, "No variable specified"))
        return
    name = header(msg, "Channel")
    if name:
        chan = sim.channels.find(name)
        if chan is None:
            session.send(error(aid, "No such channel"))
            return
        value = chan.name if variable == "CHANNEL" else chan.variables.get(variable, "")
    else:
        value = str(int(time.time())) if variable == "EPOCH" else ""
    session.send(response("Success", aid, [("Variable", variable), ("Value", value)]))


# -- Command (CLI) ------------------------------------------------------------------------------
def _command(sim: AMISimulator, session: SimSession, msg: Message, aid: bytes | None) -> None:
    command = header(msg, "Command")
    if not command:
        session.send(error(aid, "No command provided"))
        return
    ok, lines = run_cli(sim, command)
    outputs = [("Output", line) for line in lines] or [("Output", "")]
    session.send(response("Success" if ok else "Error", aid,
                          [("Message", "Command output follows"), *outputs]))


def run_cli(sim: AMISimulator, command: str) -> tuple[bool, list[str]]:
    """The few CLI commands the simulator knows: (success, output lines)."""
    words = command.split()
    key = " ".join(words).lower()
    if key == "core show version":
        return True, [CORE_SHOW_VERSION]
    if key == "core show channels":
        return True, _cli_channels(sim)
    if key == "core show channels concise":
        return True, _cli_channels_concise(sim)
    if key == "core show uptime":
        now = time.time()
        return True, [f"System uptime: {format_uptime(int(now - sim.started_at))}",
                      f"Last reload: {format_uptime(int(now - sim.reloaded_at))}"]
    if key.startswith("dialplan show ") and len(words) == 3 and words[2] in DIALPLAN_SHOW:
        return True, list(DIALPLAN_SHOW[words[2]])
    if key in ("manager set debug off", "manager set debug on"):
        return True, []
    # Asterisk suggests help for the command minus its last word (s06).
    hint = " ".join(words[:-1]) if len(words) > 1 else command
    return False, [(f"No such command '{command}' (type 'core show help {hint}' "
                   "for other possible commands)")]


def _ess(n: int) -> str:
    return "" if n == 1 else "s"


def format_uptime(seconds: int) -> str:
    """Asterisk's ``print_uptimestr``: ``2 minutes, 4 seconds``."""
    parts = []
    for unit, size in (("year", 31536000), ("week", 604800), ("day", 86400), ("hour", 3600),
                       ("minute", 60)):
        if seconds > size:
            n, seconds = divmod(seconds, size)
            parts.append(f"{n} {unit}{_ess(n)}")
    if seconds > 0 or not parts:
        parts.append(f"{seconds} second{_ess(seconds)}")
    return ", ".join(parts)


def _cli_channels(sim: AMISimulator) -> list[str]:
    fmt = "{:<64.64} {:<32.32} {:<7.7} {:<30.30}"
    lines = [fmt.format("Channel", "Location", "State", "Application(Data)")]
    chans = sim.channels.ordered()
    for chan in chans:
        snap = chan.snapshot
        location = (f"{snap['Exten']}@{snap['Context']}:{snap['Priority']}"
                    if snap["Exten"] and snap["Context"] else "(None)")
        app = f"{chan.application}({chan.app_data})" if chan.application else "(None)"
        lines.append(fmt.format(chan.name, location, snap["ChannelStateDesc"], app))
    n, calls, processed = len(chans), sim.channels.active_calls, sim.channels.processed_calls
    lines += [f"{n} active channel{_ess(n)}", f"{calls} active call{_ess(calls)}",
              f"{processed} call{_ess(processed)} processed"]
    return lines


def _cli_channels_concise(sim: AMISimulator) -> list[str]:
    now = time.time()
    lines = []
    for chan in sim.channels.ordered():
        snap = chan.snapshot
        cid = snap["CallerIDNum"] if snap["CallerIDNum"] != "<unknown>" else ""
        lines.append("!".join([chan.name, snap["Context"], snap["Exten"], snap["Priority"],
                               snap["ChannelStateDesc"], chan.application, chan.app_data, cid,
                               snap["AccountCode"], "", "3", str(chan.seconds_up(now)),
                               chan.bridge_id, snap["Uniqueid"]]))
    return lines


_Handler = Callable[["AMISimulator", "SimSession", Message, "bytes | None"], None]
_HANDLERS: dict[str, _Handler] = {
    "login": _login, "challenge": _challenge, "logoff": _logoff, "ping": _ping,
    "events": _events, "filter": _filter, "listcommands": _list_commands,
    "userevent": _user_event, "originate": _originate, "coreshowchannels": _core_show_channels,
    "status": _status, "bridgelist": _bridge_list, "coreshowchannelmap": _core_show_channel_map,
    "corestatus": _core_status, "hangup": _hangup, "getvar": _getvar, "command": _command,
}
assert set(_HANDLERS) <= set(ACTION_PRIVILEGES)
# The test-control actions are the simulator's own: not in ListCommands, open to any logged-in user.
_HANDLERS.update({"amidteststats": _test_stats, "amidtestfault": _test_fault})
