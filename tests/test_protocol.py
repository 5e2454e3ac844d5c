"""The sans-IO protocol core, fed plain bytes: whole, one byte at a time, with trailing data,
and every real capture from Asterisk 22 (tests/fixtures) with exact expectations."""

from __future__ import annotations

import collections
import contextlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from amid.ami.protocol import (
    ActionIdGenerator,
    Event,
    LocalProtocolError,
    Message,
    Parser,
    RemoteProtocolError,
    Response,
    encode_action,
    recover_bytes,
)

FIXTURES = Path(__file__).parent / "fixtures"
BANNER = b"Asterisk Call Manager/11.0.0\r\n"


def raw(name: str) -> bytes:
    return (FIXTURES / f"{name}.raw").read_bytes()


def parse_whole(data: bytes, **kw) -> list[Message]:
    return Parser(**kw).feed(data)


def parse_bytewise(data: bytes, **kw) -> list[Message]:
    parser = Parser(**kw)
    out: list[Message] = []
    for i in range(len(data)):
        out += parser.feed(data[i:i + 1])
    return out


def parse_chunks(data: bytes, sizes: list[int], **kw) -> list[Message]:
    parser = Parser(**kw)
    out: list[Message] = []
    pos = 0
    for size in sizes:
        out += parser.feed(data[pos:pos + size])
        pos += size
    out += parser.feed(data[pos:])
    return out


def summary(messages: list[Message]) -> list[tuple[str, bytes]]:
    return [(m.kind, m.raw) for m in messages]


SIMPLE = BANNER + b"Response: Success\r\nActionID: a1\r\nMessage: Authentication accepted\r\n\r\n" \
    + b"Event: FullyBooted\r\nPrivilege: system,all\r\nStatus: Fully Booted\r\n\r\n"


@pytest.mark.parametrize("feed", [parse_whole, parse_bytewise])
def test_simple_stream_whole_and_bytewise(feed):
    msgs = feed(SIMPLE)
    assert [(m.kind, m.name) for m in msgs] == [("response", "Success"), ("event", "FullyBooted")]
    assert msgs[0]["actionid"] == "a1"
    assert msgs[1].get("STATUS") == "Fully Booted"


def test_trailing_partial_message_is_kept_for_the_next_read():
    parser = Parser()
    msgs = parser.feed(SIMPLE + b"Event: Newchannel\r\nChannel: PJSIP/1")
    assert len(msgs) == 2
    assert parser.buffered == len(b"Event: Newchannel\r\nChannel: PJSIP/1")
    (ev,) = parser.feed(b"00-0001\r\n\r\n")
    assert ev.name == "Newchannel" and ev["Channel"] == "PJSIP/100-0001"


def test_banner_recognised_wherever_the_read_boundary_falls():
    for cut in range(1, len(BANNER) + 5):
        parser = Parser()
        first = parser.feed(SIMPLE[:cut])
        rest = parser.feed(SIMPLE[cut:])
        assert parser.banner == "Asterisk Call Manager/11.0.0"
        assert parser.ami_version == "11.0.0"
        assert len(first + rest) == 2


def test_bad_banner_is_a_remote_error_and_the_parser_stays_dead():
    parser = Parser()
    with pytest.raises(RemoteProtocolError) as err:
        parser.feed(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    assert err.value.kind == "bad_banner"
    with pytest.raises(RemoteProtocolError):
        parser.feed(SIMPLE)


def test_bare_lf_from_a_peer_is_tolerated():
    data = BANNER + b"Response: Success\nActionID: lf-1\nPing: Pong\n\nEvent: X\r\nA: b\n\r\n"
    msgs = parse_whole(data)
    assert [m.name for m in msgs] == ["Success", "X"]
    assert msgs[0].fields == [("Response", "Success"), ("ActionID", "lf-1"), ("Ping", "Pong")]
    assert msgs[1].fields == [("Event", "X"), ("A", "b")]
    assert summary(parse_bytewise(data)) == summary(msgs)


def test_values_are_verbatim_and_keys_keep_their_spelling():
    data = BANNER + (b"Event: Cdr\r\nAccountCode: \r\nUniqueID: 1.2\r\nUniqueid: 3.4\r\n"
                     b"X:  two spaces \r\n\r\n")
    (ev,) = parse_whole(data)
    assert ev.fields == [("Event", "Cdr"), ("AccountCode", ""), ("UniqueID", "1.2"),
                         ("Uniqueid", "3.4"), ("X", " two spaces ")]
    assert ev["uniqueid"] == "1.2"  # first occurrence, case-insensitive
    assert ev.getall("UNIQUEID") == ["1.2", "3.4"]
    assert ev.to_dict()["UniqueID"] == "1.2" and ev.to_dict()["Uniqueid"] == "3.4"


def test_message_too_large_is_refused_not_buffered_forever():
    parser = Parser(max_message_bytes=100)
    parser.feed(BANNER)
    with pytest.raises(RemoteProtocolError) as err:
        parser.feed(b"Event: Big\r\nData: " + b"x" * 200)
    assert err.value.kind == "message_too_large"
    with pytest.raises(RemoteProtocolError):
        Parser(max_message_bytes=100).feed(BANNER + b"Event: Big\r\nData: " + b"x" * 200 + b"\r\n\r\n")


def test_too_many_fields_is_refused():
    msg = b"Event: Many\r\n" + b"".join(b"K%d: v\r\n" % i for i in range(20)) + b"\r\n"
    with pytest.raises(RemoteProtocolError) as err:
        Parser(max_fields=10).feed(BANNER + msg)
    assert err.value.kind == "too_many_fields"
    assert len(Parser(max_fields=30).feed(BANNER + msg)) == 1


def test_response_vs_event_is_decided_by_the_first_line():
    data = raw("s04_originate_events")
    orig = [m for m in parse_whole(data) if m.name == "OriginateResponse"]
    assert len(orig) == 1 and isinstance(orig[0], Event)
    assert orig[0]["Response"] == "Success" and orig[0]["ActionID"] == "orig-1"
    crf = [m for m in parse_whole(raw("s02_observer_security_events")) if m.name == "ChallengeResponseFailed"]
    assert len(crf) == 1 and crf[0].kind == "event" and crf[0]["Response"].startswith("0000")


S04_COUNTS = {"VarSet": 25, "Newexten": 11, "DeviceStateChange": 8, "Newchannel": 4, "Newstate": 4,
              "Hangup": 4, "Cdr": 3, "SoftHangupRequest": 3, "LocalBridge": 2, "DialBegin": 2,
              "DialEnd": 2, "BridgeEnter": 2, "BridgeLeave": 2, "HangupRequest": 2, "NewCallerid": 1,
              "NewConnectedLine": 1, "BridgeCreate": 1, "BridgeDestroy": 1, "OriginateResponse": 1,
              "UserEvent": 1}


@pytest.mark.parametrize("feed", [parse_whole, parse_bytewise])
def test_s04_originate_event_counts_exactly_as_captured(feed):
    msgs = feed(raw("s04_originate_events"))
    counts = collections.Counter(m.name for m in msgs if m.kind == "event")
    call = {k: v for k, v in counts.items() if k not in ("FullyBooted", "SuccessfulAuth")}
    assert call == S04_COUNTS and sum(call.values()) == 80
    assert sum(len(m.raw) for m in msgs) < len(raw("s04_originate_events"))
    user = next(m for m in msgs if m.name == "UserEvent")
    assert user["UserEvent"] == "TestEvent" and user["Foo"] == "bar"


def test_s09a_burst_every_call_has_80_events():
    msgs = parse_chunks(raw("s09a_burst200_listener"), [65536] * 200)
    counts = collections.Counter(m.name for m in msgs if m.kind == "event")
    assert counts["OriginateResponse"] == 200 and counts["Hangup"] == 800
    call_events = sum(v for k, v in counts.items() if k not in ("FullyBooted", "SuccessfulAuth"))
    assert call_events == 16_000
    assert all(m["Response"] == "Success" for m in msgs if m.name == "OriginateResponse")


def test_s06_command_output_lines_verbatim():
    msgs = parse_whole(raw("s06_command"))
    responses = [m for m in msgs if isinstance(m, Response)]
    version = responses[1]
    assert version.message == "Command output follows"
    assert version.output[0].startswith("Asterisk 22.10.1 built by root")
    channels = next(r for r in responses if any("active channels" in o for o in r.output))
    header = channels.output[0]
    assert header.startswith("Channel ") and header.endswith(" ")  # trailing spaces kept
    assert all(isinstance(o, str) for o in channels.output)
    empty = [r for r in responses if r.getall("Output") == [""]]
    assert empty, "a CLI command with no output gives one empty Output line"
    errors = [r for r in responses if r.is_error]
    assert any(r.message == "No command provided" for r in errors)


def test_legacy_follows_command_output_with_blank_lines():
    # Asterisk 13 (AMI 2.x) answered Command like this; AMI >= 3 never does (see below).
    data = b"Asterisk Call Manager/2.10.4\r\n" + (b"Response: Follows\r\nPrivilege: Command\r\n"
                     b"ActionID: c1\r\nline one\r\n\r\nUptime: 5 days\r\n--END COMMAND--\r\n\r\n"
                     b"Event: After\r\n\r\n")
    for feed in (parse_whole, parse_bytewise):
        msgs = feed(data)
        assert [m.name for m in msgs] == ["Follows", "After"]
        assert msgs[0].action_id == "c1"
        assert msgs[0].output == ["line one", "", "Uptime: 5 days"]


def test_follows_framing_is_not_used_with_a_modern_banner():
    """With AMI >= 3 a forged 'Response: Follows' line (dialplan data can forge messages)
    must not make the parser wait for an --END COMMAND-- marker that never comes."""
    data = BANNER + b"Response: Follows\r\nActionID: x\r\n\r\nEvent: A\r\n\r\nEvent: B\r\n\r\n"
    assert [m.name for m in parse_whole(data)] == ["Follows", "A", "B"]


def test_complete_messages_before_garbage_are_delivered_then_the_error_raised():
    parser = Parser(max_message_bytes=100)
    good = b"".join(b"Event: Good%d\r\nA: b\r\n\r\n" % i for i in range(5))
    msgs = parser.feed(BANNER + good + b"Event: Big\r\nData: " + b"x" * 300)
    assert [m.name for m in msgs] == [f"Good{i}" for i in range(5)]
    assert parser.error is not None and parser.error.kind == "message_too_large"
    with pytest.raises(RemoteProtocolError):
        parser.feed(b"Event: More\r\n\r\n")
    # the same with bare-LF framing (the general loop)
    parser = Parser(max_message_bytes=100)
    msgs = parser.feed(BANNER + b"Event: Good\nA: b\n\n" + b"Event: Big\nData: " + b"x" * 300 + b"\n\n")
    assert [m.name for m in msgs] == ["Good"] and parser.error is not None


def test_stray_blank_lines_give_no_empty_message():
    msgs = parse_whole(BANNER + b"\r\n\r\nEvent: A\r\n\r\n\r\n\r\nEvent: B\r\n\r\n")
    assert [m.name for m in msgs] == ["A", "B"]


def test_non_utf8_bytes_are_recoverable_never_dropped():
    msgs = parse_whole(raw("s07f_odd_values"))
    appdata = [m for m in msgs if m.name == "Newexten" and "LATIN1" in m.get("AppData", "")]
    assert len(appdata) == 1
    assert recover_bytes(appdata[0]["AppData"]) == b"LATIN1=caf\xe9"
    # the forged message Asterisk never meant to send is framed like any other
    injected = [m for m in msgs if m.name == "Injected"]
    assert len(injected) == 3 and all(m["Foo"].startswith("bar") for m in injected)
    d = parse_whole(raw("s07d_errors_and_odd_input"))
    latin = [m for m in d if (m.action_id or "").startswith("latin1-")]
    assert recover_bytes(latin[0].action_id) == b"latin1-\xe9\xff"


def test_multibyte_character_split_across_reads():
    data = BANNER + "Event: Injected2\r\nUtf8: Zoë ☎\r\n\r\n".encode()
    cut = data.index("ë".encode()) + 1
    msgs = parse_chunks(data, [cut])
    assert msgs[0]["Utf8"] == "Zoë ☎"


def test_s07g_userevent_injection_and_utf8():
    msgs = parse_whole(raw("s07g_userevent_crlf"))
    inj = [m for m in msgs if m.name == "Injected2"]
    assert len(inj) == 3
    assert any(m.get("Utf8") == "Zoë" for m in inj)


def test_line_without_colon_is_kept_under_the_empty_key():
    data = BANNER + b"Response: Success\r\nActionID: g1\r\nVariable: V\r\nValue: x\r\ny\r\n\r\n"
    (resp,) = parse_whole(data)
    assert resp.fields[-2:] == [("Value", "x"), ("", "y")]


def test_s05a_lists_carry_their_action_id():
    msgs = parse_whole(raw("s05a_events_off_coreshowchannels_status"))
    start = next(m for m in msgs if isinstance(m, Response) and m.is_list_start)
    items = [m for m in msgs if m.name == "CoreShowChannel" and m.action_id == start.action_id]
    assert len(items) == 4
    complete = next(m for m in msgs if m.name == "CoreShowChannelsComplete")
    assert complete["EventList"] == "Complete" and complete["ListItems"] == "4"
    status = [m for m in msgs if m.name == "Status" and "Variable" in m]
    assert status and len(status[0].getall("Variable")) >= 1


@pytest.mark.parametrize("path", sorted(FIXTURES.glob("*.raw")), ids=lambda p: p.stem)
def test_every_capture_parses_identically_whole_bytewise_and_chunked(path):
    data = path.read_bytes()
    whole = parse_whole(data)
    assert whole, "every capture holds at least one message"
    if len(data) < 60_000:
        assert summary(parse_bytewise(data)) == summary(whole)
    assert summary(parse_chunks(data, [7, 1000, 3, 4096] * 50)) == summary(whole)
    # nothing lost: the messages plus their terminators are the whole stream after the banner
    assert sum(len(m.raw) + 4 for m in whole) == len(data) - len(BANNER)


# ---------------------------------------------------------------- actions

def test_encode_action_round_trips_through_the_server_side_parser():
    data = encode_action("Originate", [("Channel", "Local/200@test"), ("Variable", ["A=1", "B=2"])],
                         action_id="x-1")
    assert data == (b"Action: Originate\r\nActionID: x-1\r\nChannel: Local/200@test\r\n"
                    b"Variable: A=1\r\nVariable: B=2\r\n\r\n")
    (msg,) = Parser(expect_banner=False).feed(data)
    assert msg.kind == "action" and msg.name == "Originate" and msg.getall("variable") == ["A=1", "B=2"]


@pytest.mark.parametrize("bad", [
    dict(name="Ping\r\nAction: Logoff"),
    dict(name="Ping", fields={"Channel": "x\r\n\r\nAction: Originate"}),
    dict(name="Ping", fields={"Chan\nnel": "x"}),
    dict(name="Ping", fields={"Key: injected": "x"}),
    dict(name="Ping", fields={"Data": "only\rCR"}),
    dict(name="Ping", action_id="a\nb"),
])
def test_header_injection_is_refused(bad):
    with pytest.raises(LocalProtocolError):
        encode_action(**bad)


def test_action_ids_are_prefix_plus_counter():
    gen = ActionIdGenerator("t-")
    assert [gen() for _ in range(3)] == ["t-1", "t-2", "t-3"]
    assert ActionIdGenerator()().startswith("amid-")
    with pytest.raises(LocalProtocolError):
        ActionIdGenerator("bad\r\n")


# ---------------------------------------------------------------- properties

_key = st.text(st.characters(min_codepoint=33, max_codepoint=0x2FFF, blacklist_characters=":"),
               min_size=1, max_size=12)
_value = st.text(st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)), max_size=40)


@settings(max_examples=200, deadline=None)
@given(name=_key, fields=st.lists(st.tuples(_key, _value), max_size=10))
def test_action_round_trip(name, fields):
    data = encode_action(name, fields, action_id="p-1")
    (msg,) = Parser(expect_banner=False).feed(data)
    assert msg.name == name
    assert msg.fields[2:] == fields
    assert msg.action_id == "p-1"


_stream = st.lists(st.lists(st.tuples(_key, _value), min_size=1, max_size=6), max_size=8).map(
    lambda msgs: BANNER + b"".join(
        b"Event: E%d\r\n" % i + b"".join(f"{k}: {v}\r\n".encode() for k, v in m) + b"\r\n"
        for i, m in enumerate(msgs)))


@settings(max_examples=200, deadline=None)
@given(data=_stream, cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12))
def test_chunking_never_changes_the_messages(data, cuts):
    expected = summary(parse_whole(data))
    points = sorted({c % (len(data) + 1) for c in cuts})
    parser = Parser()
    got: list[Message] = []
    prev = 0
    for p in [*points, len(data)]:
        got += parser.feed(data[prev:p])
        prev = p
    assert summary(got) == expected
    assert [[f for f in m.fields] for m in got] == [[f for f in m.fields] for m in parse_whole(data)]


@settings(max_examples=300, deadline=None)
@given(blob=st.binary(max_size=600), banner=st.booleans())
def test_arbitrary_bytes_give_messages_or_remote_protocol_error_only(blob, banner):
    parser = Parser(max_message_bytes=256, max_fields=20)
    try:
        msgs = parser.feed((BANNER if banner else b"") + blob)
        for m in msgs:
            assert isinstance(m, Message)
            m.fields, m.to_dict(), m.get("Event")
    except RemoteProtocolError:
        pass


# ---------------------------------------------------------------- record JSON

@contextlib.contextmanager
def fields_path(which: str):
    """Run the record JSON with the C accelerator ("c", when built) or without it ("python")."""
    from amid.ami import _accel
    if which == "c" and _accel.speedups is None:
        pytest.skip("amid.ami._speedups is not built")
    with _accel.pure_python() if which == "python" else contextlib.nullcontext():
        yield


FIELDS_PATHS = pytest.mark.parametrize("fields_impl", ["c", "python"])


def c_builds(record_json_c, msg) -> bool:
    """Whether the C record builder takes this message (rather than leaving it to the
    reference)."""
    return bool(record_json_c(b"", b"", 0, b"", b"", msg.raw))


@FIELDS_PATHS
@pytest.mark.parametrize("path", sorted(FIXTURES.glob("*.raw")), ids=lambda p: p.stem)
def test_fast_record_json_equals_the_general_encoding(path, fields_impl):
    """The C record builder and the reference (dict + to_json) give the same JSON, byte for
    byte, for every event Asterisk sent in the captures (odd values, forged messages, non-UTF-8)."""
    from amid._encode import encode_record, event_json, record_dict, record_json
    from amid.ami import _accel
    fast_hits = 0
    with fields_path(fields_impl):
        for i, msg in enumerate(parse_whole(path.read_bytes())[:3000]):
            if not isinstance(msg, Event):
                continue
            msg.server, msg.epoch, msg.seq, msg.received_at = "pbx-1", 2, i, 1795836091.348712
            general = encode_record(record_dict(msg, f"pbx-1:r:2:{i}"))
            assert event_json(msg, f"pbx-1:r:2:{i}") == general
            assert record_json(msg, "r") == general
            fast_hits += fields_impl == "python" or c_builds(_accel.active.record_json, msg)
    assert fast_hits or path.stem.startswith(("s01c", "s02b", "s02c", "s02d", "s02f", "s03", "s07d",
                                             "s07e_driver", "s08_", "s08"))


@settings(max_examples=300, deadline=None)
@given(fields=st.lists(st.tuples(st.text(st.characters(blacklist_characters="\r\n:"), max_size=8),
                                 st.text(st.characters(blacklist_characters="\r\n"), max_size=12)),
                       min_size=1, max_size=6))
def test_fast_record_json_property(fields):
    from amid._encode import encode_record, event_json, record_dict, record_json
    raw = b"\r\n".join(f"{k}: {v}".encode("utf-8", "surrogatepass") for k, v in fields)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return
    msg = Parser(expect_banner=False).feed(b"Event: X\r\n" + raw + b"\r\n\r\n")[0]
    msg.server, msg.received_at, msg.epoch, msg.seq = "s", 1.5, 3, 7
    for impl in ("c", "python"):
        with fields_path(impl):
            assert event_json(msg, "id") == encode_record(record_dict(msg, "id"))
            assert record_json(msg, "run") == encode_record(record_dict(msg, "s:run:3:7"))


@FIELDS_PATHS
@pytest.mark.parametrize("body", [
    b"AppData: Foo: bar\r\nline2",          # one line with two ": ", one with none
    b"Variable: a=1\r\nVariable: b=2",      # repeated key -> array
    b"Value: say \"hi\"\\n",                 # JSON escaping needed
    b"Tab: a\tb",                           # control character
    b"Key:no-space\r\nOther: x",            # colon not followed by a space
    b"K:ey: v",                             # a colon inside what looks like the key
    b"K: a\rb",                             # a lone CR inside a value
    b"A: x: y\r\nB",                        # two ": " on one line, none on the next
    b"B\r\nA: x: y",
    b"Latin: caf\xe9",                      # not UTF-8
    b"Uniqueid: 1.2\r\nUniqueID: 3.4",      # keys differ by case only: both kept
    b"AppData: a:b\r\nK: v",                # colons in values only
    b"K:ey: v\r\nNone",                     # a key colon balanced by a line without one
    b'CallerID: "" <>\r\nName: "Alice"',     # quotes only: escaped on the fast path
    b'Ke"y: v\r\nA": b\r\nQ: "',            # quotes next to the separators
    b'Q: "a\\"',                            # a quote and a backslash
])
def test_fast_record_json_declines_or_matches_on_tricky_messages(body, fields_impl):
    from amid._encode import encode_record, event_json, record_dict, record_json
    msg = Parser(expect_banner=False).feed(b"Event: X\r\n" + body + b"\r\n\r\n")[0]
    msg.server, msg.received_at, msg.epoch, msg.seq = "s", 1.5, 3, 7
    with fields_path(fields_impl):
        assert event_json(msg, "id") == encode_record(record_dict(msg, "id"))
        assert record_json(msg, "run") == encode_record(record_dict(msg, "s:run:3:7"))


@pytest.mark.parametrize("path", sorted(FIXTURES.glob("*.raw")), ids=lambda p: p.stem)
def test_single_field_lookup_without_decoding_agrees_with_the_full_parse(path):
    """Message.get() on a fresh message scans the bytes; it must agree with the decoded fields."""
    for msg in parse_whole(path.read_bytes())[:2000]:
        keys = {k for k, _ in msg.fields} | {"Nope", "uniqueid", "ACTIONID", ""}
        expected = {k: msg.get(k) for k in keys}         # via the index (fields decoded)
        for key in keys:
            fresh = type(msg)(msg.raw)                    # nothing decoded yet
            assert fresh.get(key) == expected[key], (key, msg.raw[:200])


@settings(max_examples=300, deadline=None)
@given(lines=st.lists(st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=10),
                      min_size=1, max_size=6), key=st.sampled_from(["a", "A", "b:", "x y", "", "a "]))
def test_single_field_lookup_property(lines, key):
    raw = "\r\n".join(["Event: X", *lines]).encode()
    fresh, full = Event(raw), Event(raw)
    full.fields
    assert fresh.get(key) == full.get(key)


def _reference_fields(raw: bytes) -> list[tuple[str, str]]:
    """The general rule, written plainly: lines split on LF (one CR before each LF dropped;
    the last line, which had none, keeps its CR), key before the first colon, one space after
    it removed, colon-less lines under the empty key."""
    text = raw.decode("utf-8", "surrogateescape")
    out = []
    lines = text.split("\n")
    for i, line in enumerate(lines):
        line = line[:-1] if line.endswith("\r") and i < len(lines) - 1 else line
        key, sep, value = line.partition(":")
        out.append((key, value[1:] if value[:1] == " " else value) if sep else ("", line))
    return out


@pytest.mark.parametrize("path", sorted(FIXTURES.glob("*.raw")), ids=lambda p: p.stem)
def test_field_decoding_fast_path_matches_the_general_rule(path):
    for msg in parse_whole(path.read_bytes())[:3000]:
        assert msg.fields == _reference_fields(msg.raw)


@settings(max_examples=300, deadline=None)
@given(body=st.lists(st.sampled_from(["K: v", "K:v", "K:", "K: ", "a: b: c", "no colon", "K:  two",
                                      ": empty key", "Zoë: ☎", "x\ry: z", "K: v\r"]), min_size=1, max_size=6),
       sep=st.sampled_from(["\r\n", "\n"]))
def test_field_decoding_property(body, sep):
    raw = sep.join(["Event: X", *body]).encode()
    assert Event(raw).fields == _reference_fields(raw)


# ------------------------------------------------- framing edge cases (found by fuzzing)

LEGACY_BANNER = b"Asterisk Call Manager/2.10.4\r\n"


def _outcome(data: bytes, points: list[int], **kw):
    """Messages (kind, raw, fields) and whether the stream failed, feeding ``data`` cut at
    ``points``."""
    parser = Parser(**kw)
    got: list[Message] = []
    failed = False
    prev = 0
    for p in [*sorted(set(points)), len(data)]:
        try:
            got += parser.feed(data[prev:p])
        except RemoteProtocolError:
            failed = True
            break
        prev = p
    failed = failed or parser.error is not None
    return [(m.kind, m.raw, m.fields, m.name) for m in got], failed


_TOKENS = [b"Event: A\r\n", b"K: v\r\n", b"Response: Follows\r\n", b"--END COMMAND--", b"\r\n",
           b"\n", b"\r", b"x", b"Event: B\r", b"Response: Success\r\n", b"\xff", b"Data: " + b"y" * 30]


@settings(max_examples=400, deadline=None)
@given(tokens=st.lists(st.sampled_from(_TOKENS), max_size=40), legacy=st.booleans(),
       cuts=st.lists(st.integers(min_value=0, max_value=600), max_size=10))
def test_read_boundaries_never_change_the_outcome_even_at_the_bounds(tokens, legacy, cuts):
    """Whole, byte by byte and cut anywhere: the same messages, and a failure (message too
    large, too many lines) either way or neither, with tight bounds, bare LFs, stray blank
    lines and legacy Follows framing mixed."""
    data = (LEGACY_BANNER if legacy else BANNER) + b"".join(tokens)
    kw = dict(max_message_bytes=48, max_fields=4)
    whole = _outcome(data, [], **kw)
    assert _outcome(data, list(range(len(data))), **kw) == whole
    assert _outcome(data, [c % (len(data) + 1) for c in cuts], **kw) == whole


@pytest.mark.parametrize("body", [b"\r\n\r\n\r\n", b"\r\n\n\r\n", b"\n\n\n\n", b"\r\n\r\n\r\n\r\n\n\n"])
def test_runs_of_blank_lines_never_make_an_empty_message(body):
    data = BANNER + b"Event: A\n\n" + body + b"Event: B\r\n\r\n"
    for msgs in (parse_whole(data), parse_bytewise(data)):
        assert [m.name for m in msgs] == ["A", "B"]


@pytest.mark.parametrize("terminator", [b"\r\n\r\n", b"\n\n", b"\r\n\n"])
def test_the_size_bound_is_the_same_whatever_the_line_endings(terminator):
    body = b"Event: X\r\nData: " + b"y" * 30          # 46 bytes without its terminator
    ok = BANNER + b"\r\n" + body + terminator + b"Event: After\r\n\r\n"
    assert [m.name for m in parse_whole(ok, max_message_bytes=46)] == ["X", "After"]
    assert [m.name for m in parse_bytewise(ok, max_message_bytes=46)] == ["X", "After"]
    parser = Parser(max_message_bytes=45)
    with pytest.raises(RemoteProtocolError) as failure:
        parser.feed(ok)
    assert failure.value.kind == "message_too_large"


def test_a_message_at_the_bound_is_accepted_whatever_the_read_split():
    body = b"Event: X\r\nData: " + b"y" * 30
    data = BANNER + body + b"\r\n\r\nEvent: After\r\n\r\n"
    for cut in range(len(BANNER), len(data)):
        parser = Parser(max_message_bytes=len(body))
        msgs = parser.feed(data[:cut]) + parser.feed(data[cut:])
        assert [m.name for m in msgs] == ["X", "After"], cut


def test_legacy_follows_output_is_framed_whole_even_near_the_size_bound():
    follows = (b"Response: Follows\r\nActionID: c1\r\n" + b"line\r\n\r\n" * 4
               + b"--END COMMAND--\r\n\r\n")
    data = LEGACY_BANNER + b"Event: Big\r\nData: " + b"z" * 20 + b"\r\n\r\n" + follows \
        + b"Event: After\r\n\r\n"
    # Every piece between blank lines is small; the Follows message as a whole is not.
    parser = Parser(max_message_bytes=len(follows))
    msgs = parser.feed(data)
    assert [m.name for m in msgs] == ["Big", "Follows", "After"]
    assert msgs[1].output == ["line", ""] * 4
    parser = Parser(max_message_bytes=len(follows) - 20)
    msgs = parser.feed(data)
    assert [m.name for m in msgs] == ["Big"]
    assert parser.error is not None and parser.error.kind == "message_too_large"


def test_a_trailing_cr_in_a_one_line_message_is_data_in_the_name_and_the_fields():
    for data in (BANNER + b"Event: X\r\r\n\r\n", BANNER + b"Event: X\r\n\n",
                 BANNER + b"Response: Success\r\r\n\r\n"):
        msgs = parse_whole(data)
        first_value = msgs[0].fields[0][1]
        assert msgs[0].name == first_value
    (msg,) = parse_whole(BANNER + b"Event: X\r\r\n\r\n")
    assert msg.name == "X\r" and msg.fields == [("Event", "X\r")]


def test_bare_lf_lines_keep_a_cr_at_the_end_of_the_last_value():
    (msg,) = parse_whole(BANNER + b"Event: A\nB: x\r\r\n\r\n")
    assert msg.fields == [("Event", "A"), ("B", "x\r")]
    (same,) = parse_whole(BANNER + b"Event: A\r\nB: x\r\r\n\r\n")
    assert same.fields == msg.fields


# ------------------------------------------------------- record JSON edge cases

@pytest.mark.parametrize("server,record_id", [
    ("pbx\n1", "pbx\n1:r:1:1"), ("pbx\r1", "id"), ('pbx"1', "id"), ("pbx\udcff", "id"),
    ("pbx1", "id\x00"), ("\ud800", "id"), ("pbx1", "\ud800x"),
])
def test_record_json_is_valid_whatever_the_server_name_or_id(server, record_id):
    from pydantic_core import from_json

    from amid._encode import event_json, record_json
    (msg,) = Parser(expect_banner=False).feed(b"Event: X\r\nA: b\r\n\r\n")
    msg.server, msg.received_at, msg.epoch, msg.seq = server, 1.5, 1, 1
    record = from_json(event_json(msg, record_id))
    assert record["fields"] == {"Event": "X", "A": "b"}
    assert from_json(record_json(msg, record_id))["fields"] == record["fields"]  # as a run id
    if not any("\ud800" <= c <= "\udfff" for c in server + record_id):
        assert record["server"] == server and record["id"] == record_id


def test_record_json_is_valid_whatever_the_event_name_was_set_to():
    from pydantic_core import from_json

    from amid._encode import event_json
    (msg,) = Parser(expect_banner=False).feed(b"Event: X\r\nA: b\r\n\r\n")
    msg.name = 'Na"me\n'
    msg.server, msg.received_at, msg.epoch, msg.seq = "s", 1.5, 1, 1
    assert from_json(event_json(msg, "id"))["event"] == 'Na"me\n'


def test_keys_with_invalid_utf8_stay_distinct_and_recoverable():
    import base64

    from pydantic_core import from_json

    from amid._encode import event_json
    (msg,) = Parser(expect_banner=False).feed(b"Event: X\r\nK\xff: one\r\nK\xfe: two\r\n"
                                              b"K\\xff: three\r\n\r\n")
    msg.server, msg.received_at, msg.epoch, msg.seq = "s", 1.5, 1, 1
    record = from_json(event_json(msg, "id"))
    # The undecodable K\xff is shown as the text K\\xff, which the message also has: it takes
    # a suffix rather than merging, so each key keeps its own values, in order.
    assert record["fields"] == {"Event": "X", "K\\xff#2": "one", "K\\xfe": "two", "K\\xff": "three"}
    assert {k: base64.b64decode(v) for k, v in record["fields_b64"].items()} == \
        {"K\\xff#2": b"one", "K\\xfe": b"two"}
    (msg,) = Parser(expect_banner=False).feed(b"Event: X\r\nK\\xff: 1\r\nK\xff: 2\r\nK\\xff: 3\r\n"
                                              b"K\xff: 4\r\n\r\n")
    msg.server, msg.received_at, msg.epoch, msg.seq = "s", 1.5, 1, 1
    record = from_json(event_json(msg, "id"))
    assert record["fields"] == {"Event": "X", "K\\xff": ["1", "3"], "K\\xff#2": ["2", "4"]}
    assert record["fields_b64"] == {"K\\xff#2": ["Mg==", "NA=="]}


def test_an_overlong_banner_fails_the_same_whatever_the_read_split():
    data = b"Asterisk Call Manager/" + b"1" * 300 + b"\r\nEvent: A\r\n\r\n"
    with pytest.raises(RemoteProtocolError) as whole:
        Parser().feed(data)
    parser = Parser()
    with pytest.raises(RemoteProtocolError) as bytewise:
        for i in range(len(data)):
            parser.feed(data[i:i + 1])
    assert whole.value.kind == bytewise.value.kind == "bad_banner"
    limit = b"Asterisk Call Manager/" + b"1" * (256 - 22 - 1) + b"\r\n" + b"Event: A\r\n\r\n"
    assert [m.name for m in Parser().feed(limit)] == ["A"]  # a 256-byte line (with its CR) is fine


@settings(max_examples=200, deadline=None)
@given(server=st.text(max_size=6), run=st.text(max_size=6), name=st.text(max_size=6))
def test_record_json_equals_the_general_encoding_for_any_server_run_and_name(server, run, name):
    from amid._encode import encode_record, record_dict, record_json
    (msg,) = Parser(expect_banner=False).feed(b"Event: X\r\nA: b\r\n\r\n")
    msg.server, msg.received_at, msg.epoch, msg.seq, msg.name = server, 1.5, 2, 9, name
    assert record_json(msg, run) == encode_record(record_dict(msg, f"{server}:{run}:2:9"))


def test_a_record_json_is_the_same_bytes_whether_or_not_a_sink_read_its_data_first():
    from amid.records import Record
    (msg,) = Parser(expect_banner=False).feed(b"Event: Hangup\r\nCallerIDName: \"A\" <1>\r\n"
                                              b"Variable: a=1\r\nVariable: b=2\r\n\r\n")
    msg.server, msg.received_at, msg.epoch, msg.seq = "pbx1", 1.5, 1, 3
    fresh = Record.of_event(msg, "run")
    touched = Record.of_event(msg, "run")
    assert touched.data["fields"]["Variable"] == ["a=1", "b=2"] and touched.seq == 3
    assert touched.json == fresh.json
    assert Record.from_json(fresh.json).seq == 3


@FIELDS_PATHS
@pytest.mark.parametrize("server", ["pbx-1", "p%s%d%%1", 'a"b', "é", "tab\there"])
@pytest.mark.parametrize("run", ["r", "r%d"])
def test_record_json_template_is_exact_for_any_server_and_run(server, run, fields_impl):
    """The per-connection template (cached by server, run, epoch) keeps ``%`` and anything
    needing escapes exact; each epoch gets its own."""
    from amid._encode import encode_record, record_dict, record_json
    with fields_path(fields_impl):
        for epoch in (1, 2, 1):
            msg = Parser(expect_banner=False).feed(b"Event: X\r\nA: b%s\r\n\r\n")[0]
            msg.server, msg.received_at, msg.epoch, msg.seq = server, 1.5, epoch, 9
            assert record_json(msg, run) == encode_record(record_dict(msg, f"{server}:{run}:{epoch}:9"))


@FIELDS_PATHS
def test_a_batch_s_json_of_a_mixed_batch_equals_each_record_s_json(fields_impl):
    """The batch form gives each record exactly its own JSON: wire events of two servers and
    epochs, receive times changing mid-batch, names and values that need the general path,
    records made by amid and read back from a spool."""
    from amid.records import Record
    raws = [b"Event: Newchannel\r\nChannel: A", b"Event: VarSet\r\nValue: caf\xc3\xa9",
            b"Event: Odd\"Name\r\nK: v", b"Event: Hangup\r\nCause: 16\r\nCause: 17",
            b"Event: Latin\r\nV: \xe9", b"Event: Newchannel\r\nChannel: B"]
    with fields_path(fields_impl):
        records = []
        for i, raw in enumerate(raws * 3):
            event = Parser(expect_banner=False).feed(raw + b"\r\n\r\n")[0]
            event.server = "pbx-1" if i % 4 else "pbx-2"
            event.epoch, event.seq, event.received_at = 1 + i // 7, i, 1795836091.0 + i // 5
            records.append(Record.of_event(event, "run"))
        records.insert(3, Record.synthetic(id="pbx-1:run:1:gap", server="pbx-1", name="AmidGap",
                                           fields={"Seconds": "3"}))
        records.append(Record.from_json(records[0].json))
        expected = [Record.of_event(r._event, "run").json if r._event is not None else r.json
                    for r in records]
        assert Record.jsons(records) == expected
        assert [r.json for r in records] == expected  # kept on the records


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(min_value=0, max_value=4e9, allow_nan=False), min_size=1, max_size=8))
def test_receive_times_format_as_strftime_does_whatever_came_before(stamps):
    import time as _time

    from amid._encode import format_iso

    def reference(ts: float) -> str:
        whole = int(ts)
        micros = round((ts - whole) * 1_000_000)
        if micros == 1_000_000:
            whole, micros = whole + 1, 0
        return _time.strftime("%Y-%m-%dT%H:%M:%S", _time.gmtime(whole)) + f".{micros:06d}Z"
    for ts in stamps + stamps[::-1]:  # the cached second must never leak into another one
        assert format_iso(ts) == reference(ts)
    assert format_iso(1764400000.9999996) == "2025-11-29T07:06:41.000000Z"
