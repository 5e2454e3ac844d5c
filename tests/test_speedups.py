"""amid.ami._speedups, the optional C version of the read path's hot loops, against the
one Python reference of each rule: framing, the session's envelope, records, record JSON and
decoded fields.

Each C function must give exactly what the reference gives, and leave to it (decline with
None) only what it does not take. The record tests in test_protocol.py run against both
paths too.
"""

from __future__ import annotations

import contextlib
import gc
import os
import tracemalloc

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pydantic_core import to_json

from amid import _encode
from amid.ami import _accel
from amid.ami.protocol import BANNER_PREFIX, Event, Message, Parser, RemoteProtocolError

try:
    from amid.ami._speedups import bind_event, frame_crlf
    from amid.ami._speedups import record_json as record_json_c
except ImportError:
    if os.environ.get("CI"):  # CI builds it (scripts/test.sh installs gcc): missing is a failure
        raise
    pytest.skip("amid.ami._speedups is not built (no C compiler when amid was installed)",
                allow_module_level=True)


def test_pure_python_switches_every_c_function_off_and_back() -> None:
    """The comparisons below run the reference under _accel.pure_python(): it must really
    switch the accelerator off, everywhere, and put it back."""
    before = _accel.active.snapshot()
    assert all(function is not None for function in before)
    with _accel.pure_python():
        assert all(function is None for function in _accel.active.snapshot())
        assert type(Parser(expect_banner=False).feed(b"Event: A\r\n\r\n")[0]) is Event
    assert _accel.active.snapshot() == before


def test_the_accelerator_is_in_use() -> None:
    assert _accel.SPEEDUPS == "c"
    assert _accel.active.frame_crlf is frame_crlf
    assert _accel.active.record_json is record_json_c


def general_fields(raw: bytes) -> bytes:
    """The fields JSON of the reference: Message.to_dict() through pydantic_core."""
    return to_json(Message(raw).to_dict())


_FIELDS_AT = b'00,"received_at":"","event":"","fields":'


def c_fields(raw: bytes) -> bytes | None:
    """The fields object the C record builder writes for ``raw`` (None: it declines)."""
    built = record_json_c(b"", b"", 0, b"", b"", raw)
    if not built:
        return None
    assert built.startswith(_FIELDS_AT) and built.endswith(b"}")
    return built[len(_FIELDS_AT):-1]


def plain(raw: bytes) -> bool:
    """What the C record builder promises to take (the rules in _speedups.c's header)."""
    lines = raw.split(b"\r\n")
    return (0 < len(lines) <= 512 and raw.isascii() and b"\\" not in raw and b"\x7f" not in raw
            and all(b": " in line and b":" not in line.partition(b": ")[0]
                    and all(b >= 0x20 for b in line) for line in lines))


def check(raw: bytes) -> bytes | None:
    got = c_fields(raw)
    if got is None:
        assert not plain(raw), raw
    else:
        assert got == general_fields(raw), raw
    return got


# Bytes that matter to the rules: separators, quotes, escapes, controls, non-ASCII, NUL.
_PIECES = st.sampled_from([b"a", b"Key", b"x y", b":", b": ", b" ", b'"', b"\\", b"\r\n", b"\r",
                           b"\n", b"\t", b"\x7f", b"\x00", b"\xc3\xa9", b"\xe9", b"\xff"])


@settings(max_examples=1500, deadline=None)
@given(st.lists(_PIECES, max_size=24).map(b"".join))
@example(b"")
@example(b"a: b\r\n")
@example(b"a: b\r\na: c")
@example(b"a: b:c")
@example(b"a: b: c")
@example(b"a:b: c")
@example(b"a: b:")
@example(b": v")
@example(b'a"b: "c"')
def test_c_fields_json_is_the_reference_s_on_any_bytes(raw: bytes) -> None:
    check(raw)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.tuples(st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=12),
                          st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=30)),
                min_size=1, max_size=40))
def test_c_takes_every_plain_ascii_message(fields: list[tuple[str, str]]) -> None:
    raw = "\r\n".join(f"{k}: {v}" for k, v in fields).encode()
    got = check(raw)
    if plain(raw):
        assert isinstance(got, bytes)


def test_long_messages_and_many_keys() -> None:
    many = b"\r\n".join(b"Key%d: %s" % (i, b"v" * (i % 37)) for i in range(511))
    assert isinstance(check(many), bytes)
    assert check(many + b"\r\nKey7: again").endswith(b'"Key510":"' + b"v" * 29 + b'"}')
    assert b'"Key7":["vvvvvvv","again"]' in check(many + b"\r\nKey7: again")
    assert check(many + b"\r\nLast: x\r\nOne: more") is None  # over 512 lines: the reference's
    long_value = b"Value: " + b"x" * 100_000 + b'"'
    assert check(long_value) == general_fields(long_value)


@pytest.mark.parametrize(("raw", "fields"), [
    (b"A: 1\r\nB: x\r\nA: 2\r\nA: 3", b'{"A":["1","2","3"],"B":"x"}'),
    (b'V: "a"\r\nV: b: c\r\nW: ', b'{"V":["\\"a\\"","b: c"],"W":""}'),
    (b"A: 1\r\na: 2", b'{"A":"1","a":"2"}'),  # keys differing in case are two keys
    (b"Output: x\r\nOutput: \r\nOutput: y", b'{"Output":["x","","y"]}'),
])
def test_repeated_keys_become_arrays_at_their_first_line(raw: bytes, fields: bytes) -> None:
    assert check(raw) == fields


def test_keys_that_hash_alike_but_differ_are_kept() -> None:
    # Same length, same first and last 8 bytes: only the middle differs.
    raw = b"ABCDEFGH1IJKLMNOP: a\r\nABCDEFGH2IJKLMNOP: b"
    assert check(raw) == b'{"ABCDEFGH1IJKLMNOP":"a","ABCDEFGH2IJKLMNOP":"b"}'


def test_rejects_non_bytes() -> None:
    with pytest.raises(TypeError):
        record_json_c(b"", b"", 1, b"", b"", "Event: X")
    with pytest.raises(TypeError):
        record_json_c(b"", b"", 1, b"", b"")


def reference_event(raw: bytes, server: str, epoch: int, seq: int) -> Event:
    event = Event(raw, "Newchannel")
    event.server, event.epoch, event.seq, event.received_at = server, epoch, seq, 1795836091.5
    return event


@settings(max_examples=500, deadline=None)
@given(raw=st.lists(_PIECES, max_size=16).map(b"".join),
       seq=st.integers(min_value=-(2 ** 70), max_value=2 ** 70),
       server=st.sampled_from(["pbx-1", "p%d%%s", "", 'q"uote', "é"]), epoch=st.integers(0, 2 ** 40))
@example(raw=b"Event: X\r\nA: b", seq=0, server="pbx-1", epoch=1)
def test_c_record_json_is_the_reference_s(raw: bytes, seq: int, server: str, epoch: int) -> None:
    """A wire record (its id built from the envelope) and a record whose id is given: the C
    builds the bytes the reference encodes, or declines."""
    event = reference_event(raw, server, epoch, seq)
    received = _encode.receive_time_bytes(event.received_at)
    parts = _encode.record_head_mid(server, "run", epoch)
    assert parts is not None
    got = record_json_c(parts[0], parts[1], seq, received, b"Newchannel", raw)
    if got is None:
        assert not plain(raw) or not -(2 ** 63) <= seq < 2 ** 63
    else:
        record_id = f"{server}:run:{epoch}:{seq}"
        assert got == _encode.encode_record(_encode.record_dict(event, record_id))
        mid = parts[1]
        given_id = record_json_c(b'{"id":"given', mid, seq, received, b"Newchannel", raw, False)
        assert given_id == _encode.encode_record(_encode.record_dict(event, "given"))


_VERSION = """
import sys
if sys.argv[1] == "unbuilt":
    sys.modules["amid.ami._speedups"] = None  # what a machine without a C compiler has: no module
from amid.cli import main
main(["--version"])
"""


@pytest.mark.parametrize(("setup", "pure", "says"), [
    ("built", "", "read path: C accelerator"),
    ("built", "1", "read path: pure Python: AMID_PURE_PYTHON is set"),
    ("unbuilt", "", "read path: pure Python: the C accelerator was not built")])
def test_version_says_whether_the_accelerator_is_in_use(setup: str, pure: str, says: str) -> None:
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-c", _VERSION, setup], capture_output=True, timeout=60,
                          env=dict(os.environ, AMID_PURE_PYTHON=pure))
    assert done.returncode == 0, done.stderr
    assert says in done.stdout.decode()


_PURE_PYTHON_CHECK = """
import re
import sys
from amid.ami import _accel
from amid.ami.protocol import Parser
from amid.ami.session import AMIClient
from amid.records import Record
on = sum(function is not None for function in _accel.active.snapshot())
print(_accel.SPEEDUPS, _accel.REASON, on, file=sys.stderr)
client = AMIClient("127.0.0.1", 5038, username="u", secret="s", name="pbx-1")
out = []
client.add_batch_listener(lambda events: out.extend(Record.jsons(Record.of_events(events, "run1"))))
parser = Parser()
data = sys.stdin.buffer.read()
for i in range(0, len(data), 4096):
    client._dispatch_messages(parser.feed(data[i:i + 4096]))
# The receive times differ from run to run: blank them.
sys.stdout.buffer.write(b"\\n".join(re.sub(rb'"received_at":"[^"]*"', b"", line) for line in out))
"""


def test_amid_pure_python_switches_the_accelerator_off_with_the_same_records(tmp_path) -> None:
    """AMID_PURE_PYTHON=1 runs the whole read path in Python (to rule the C out when chasing
    a problem): every C function is off, and a real capture gives the same records, byte for byte
    (receive times aside)."""
    import subprocess
    import sys
    from pathlib import Path
    capture = (Path(__file__).parent / "fixtures" / "s09a_burst200_listener.raw").read_bytes()
    runs = {}
    for pure in ("1", ""):
        env = dict(os.environ, AMID_PURE_PYTHON=pure)
        done = subprocess.run([sys.executable, "-c", _PURE_PYTHON_CHECK], input=capture, env=env,
                              capture_output=True, timeout=120, check=True)
        runs[pure] = (done.stderr.decode().strip(), done.stdout)
    assert runs["1"][0] == "python AMID_PURE_PYTHON is set 0"
    assert runs[""][0] == f"c  {len(_accel.active.snapshot())}"
    assert runs["1"][1] == runs[""][1] and runs[""][1].count(b"\n") > 10_000


# ---------------------------------------------------------------- framing and Events in C

def envelope(m: Message) -> tuple:
    """Everything a message holds, the Event slots set at creation included."""
    slots = (m.server, m.epoch, m.seq, m.received_at) if type(m) is Event else ()
    return (type(m), m.kind, m.raw, m.name, m._fields, m._index, *slots, m.fields)


def outcome(data: bytes, cuts: list[int], **bounds) -> tuple[list[tuple], str | None, bytes]:
    parser = Parser(**bounds)
    got: list[Message] = []
    error = None
    prev = 0
    for point in [*sorted({c % (len(data) + 1) for c in cuts}), len(data)]:
        try:
            got += parser.feed(data[prev:point])
        except RemoteProtocolError as exc:
            error = exc.kind
            break
        prev = point
    return [envelope(m) for m in got], error or (parser.error and parser.error.kind), \
        parser._buf


BANNER = BANNER_PREFIX + b"22.1.0\r\n"
_FRAME_TOKENS = st.sampled_from([
    b"Event: A\r\n", b"Event: Newchannel\r\n", b"Event:X\r\n", b"Event: \r\n", b"Event: ",
    b"Event: N\xc3\xa9\r\n", b"Event: \xff\xfe\r\n", b"event: lower\r\n", b"K: v\r\n",
    b"Response: Success\r\n", b"ActionID: 1\r\n", b"\r\n", b"\r\n\r\n", b"\n", b"\r", b"x",
    b"Data: " + b"y" * 30 + b"\r\n"])


@settings(max_examples=1500, deadline=None)
@given(tokens=st.lists(_FRAME_TOKENS, max_size=40), banner=st.booleans(),
       cuts=st.lists(st.integers(min_value=0, max_value=800), max_size=8),
       bounds=st.sampled_from([{}, {"max_message_bytes": 48, "max_fields": 4},
                               {"max_message_bytes": 20, "max_fields": 100}]))
def test_c_framing_gives_what_python_framing_gives(tokens, banner, cuts, bounds) -> None:
    """Any stream, cut anywhere, with or without tight bounds: the same messages (types,
    bytes, names, Event defaults), the same failure and the same unframed rest."""
    data = (BANNER if banner else b"") + b"".join(tokens)
    kw = dict(bounds, expect_banner=banner)
    with_c = outcome(data, cuts, **kw)
    with _accel.pure_python():
        assert with_c == outcome(data, cuts, **kw)


def test_c_framing_builds_events_as_python_does() -> None:
    data = (b"Event: Newchannel\r\nChannel: PJSIP/1\r\n\r\n"
            b"Event: Caf\xc3\xa9\r\n\r\n"          # a UTF-8 name
            b"Event: \xff\r\nK: v\r\n\r\n"           # not UTF-8: surrogate escapes, as Python
            b"Event: Newchannel\r\n\r\n"
            b"Response: Success\r\nActionID: 7\r\n\r\n"
            b"\r\n\r\nEvent: Late\r\n\r\nEvent: Partial\r\n")
    messages, consumed, others = frame_crlf(data, 1 << 20, 1000)
    assert [m if type(m) is bytes else m.name for m in messages] == [
        "Newchannel", "Café", "\udcff", "Newchannel", b"Response: Success\r\nActionID: 7",
        b"", "Late"]  # other kinds and blank ones stay bytes, for Python
    assert data[consumed:] == b"Event: Partial\r\n"
    assert others == sum(type(m) is bytes for m in messages)
    for m in messages:
        if type(m) is Event:
            assert envelope(m) == envelope(Event(m.raw))
            # Left out of the cyclic collector (no cycle can run through an Event): see
            # UNTRACKED in _speedups.c. Reference counting frees it (the leak test below).
            assert not gc.is_tracked(m)


def test_c_framing_leaves_bare_lf_and_bounds_to_python() -> None:
    ok = b"Event: A\r\nK: v\r\n\r\n"
    assert frame_crlf(ok, 1 << 20, 1000) is not None
    assert frame_crlf(ok + b"Event: B\n\n", 1 << 20, 1000) is None  # a bare LF
    assert frame_crlf(b"\n" + ok, 1 << 20, 1000) is None
    assert frame_crlf(ok, len(ok) - 5, 1000) is None                # a message over the size
    assert frame_crlf(ok, 1 << 20, len(ok) - 4) is None             # long enough to be near max_fields
    assert frame_crlf(ok + b"x" * 40, 30, 1000) is None               # the rest is already too big


def test_event_names_that_share_a_cache_slot_stay_apart() -> None:
    # The decoded names are cached per slot of a small table: thousands of names must collide
    # and still each come back as its own text.
    names = [f"Name{i}" for i in range(3000)]
    data = b"".join(b"Event: %s\r\n\r\n" % n.encode() for n in names * 2)
    messages, _, _ = frame_crlf(data, 1 << 20, 1000)
    assert [m.name for m in messages] == names * 2


def test_c_framing_does_not_leak() -> None:
    data = b"".join(b"Event: E%d\r\nUniqueid: 17%d.1\r\n\r\nResponse: Success\r\n\r\n" % (i % 7, i)
                    for i in range(200))
    for _ in range(50):  # warm the name cache and the allocators
        frame_crlf(data, 1 << 20, 1000)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(300):
            frame_crlf(data, 1 << 20, 1000)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 64 * 1024, grown  # one leaked object per message would be megabytes


def test_bind_event_refuses_what_it_cannot_fill() -> None:
    class NoSlots:
        pass

    class Plain(Event):
        __slots__ = ()

    with pytest.raises((TypeError, AttributeError)):
        bind_event(NoSlots, NoSlots())
    with pytest.raises(TypeError):
        bind_event(Event, Plain(b"Event: x"))  # the template must be of the class itself
    class Twice(Event):  # one slot under two names: written twice, one object leaked
        __slots__ = ()
    Twice.name = Event.raw

    class OverDict(dict):  # tp_new of the base would be skipped: a crash waiting to happen
        __slots__ = ("raw", "name", "_fields", "_index", "server", "epoch", "seq", "received_at")

    for cls in (Twice, OverDict):
        template = cls.__new__(cls)
        for slot in OverDict.__slots__:
            setattr(template, slot, None)
        with pytest.raises(TypeError):
            bind_event(cls, template)
    with pytest.raises(RuntimeError):  # bound once per process
        bind_event(Plain, Plain(b"Event: x"))
    bind_event(Event, Event(b"Event: y"))  # the same class again: nothing changes
    assert Parser(expect_banner=False).feed(b"Event: A\r\n\r\n")[0].server == ""
    assert frame_crlf("Event: A\r\n\r\n", 100, 100) is None  # not bytes: Python frames it


@pytest.mark.parametrize("bounds", [dict(max_message_bytes=10 ** 30), dict(max_fields=10 ** 30),
                                    dict(max_message_bytes=1e6), dict(max_message_bytes=-(10 ** 30))])
def test_any_bounds_frame_as_in_python(bounds) -> None:
    data = b"Event: A\r\nK: v\r\n\r\nEvent: B\r\n\r\n"
    with_c = outcome(data, [], expect_banner=False, **bounds)
    with _accel.pure_python():
        assert with_c == outcome(data, [], expect_banner=False, **bounds)


# ---------------------------------------------------------------- records in C

from amid.ami._speedups import records_json, records_of  # noqa: E402
from amid.records import Record  # noqa: E402

RECORD_SLOTS = ("_id", "name", "server", "received_at", "_json", "_data", "_event", "size", "_run")


def record_slots(record: Record) -> tuple:
    return tuple(getattr(record, slot) for slot in RECORD_SLOTS)


def wire_event(raw: bytes, server: object, epoch: object, seq: object, received_at: object,
               name: object = None) -> Event:
    event = Event(raw)
    event.server, event.epoch, event.seq, event.received_at = server, epoch, seq, received_at
    if name is not None:
        event.name = name
    return event


_SERVERS = st.sampled_from(["pbx-1", "pbx-2", 'p"q', "pbx-é", "\udcff", ""])
_RAWS = st.sampled_from([b"Event: Newchannel\r\nChannel: PJSIP/1\r\nUniqueid: 1.1",
                         b'Event: UserEvent\r\nData: say "hi"\r\nData: again',
                         b"Event: Caf\xc3\xa9\r\nK: v", b"Event: Bad\r\nK: \xff",
                         b"Event: X\r\nno colon", b"Event: Y"])
_EVENTS = st.builds(
    wire_event, raw=_RAWS, server=_SERVERS,
    epoch=st.sampled_from([0, 1, 7, 2 ** 70, True]),
    seq=st.one_of(st.integers(-5, 10 ** 6), st.sampled_from([2 ** 63 - 1, 2 ** 63, -(2 ** 63) - 1])),
    received_at=st.sampled_from([1764400000.25, 1764400000.25, 1764400001.5, 0.0, 1764400002]),
    name=st.sampled_from([None, None, "Newchannel", 'Q"uote', "Café", "Tab\t", "\udcff"]))


@settings(max_examples=400, deadline=None)
@given(events=st.lists(_EVENTS, max_size=12), run=st.sampled_from(["run1", 'r"2', "ré"]),
       touch=st.lists(st.sampled_from(["id", "json", "data", "none"]), max_size=12),
       synthetic=st.booleans())
def test_c_record_batches_equal_python_records(events, run, touch, synthetic) -> None:
    """Records made and encoded in C are the records Python makes, slot for slot, whatever
    the servers, epochs, sequence numbers, receive times, names and messages; records whose
    id, JSON or dict was already asked for, and records amid made itself, mixed in."""
    made = records_of(events, run)
    assert not any(gc.is_tracked(record) for record in made)  # see UNTRACKED in _speedups.c
    expected = [Record.of_event(event, run) for event in events]
    assert [record_slots(r) for r in made] == [record_slots(r) for r in expected]
    for record, other, what in zip(made, expected, touch, strict=False):  # what sinks may have asked already
        for one in (record, other):
            if what == "id":
                one.id
            elif what == "json":
                one.json
            elif what == "data":
                one.data
    if synthetic:
        gap = Record.synthetic(id="pbx-1:run1:0:0", server="pbx-1", name="AmidGap", fields={"Lost": "3"})
        made, expected = [*made, gap], [*expected, gap]
    got = records_json(made, _encode.record_head_mid, _encode.receive_time_bytes)
    assert got == [record.json for record in expected]
    assert [record_slots(r) for r in made] == [record_slots(r) for r in expected]  # _json kept


def test_record_batches_use_the_accelerator_only_for_exact_records_and_events() -> None:
    class MyRecord(Record):
        __slots__ = ()

    event = wire_event(b"Event: A\r\nK: v", "pbx-1", 1, 5, 1764400000.0)
    assert records_of([event, "not an event"], "run1") is None
    assert records_of([Event(b"Event: A")], "run1") is not None  # a fresh Event has every slot
    unset = Event.__new__(Event)
    assert records_of([unset], "run1") is None
    mine = MyRecord.of_event(event, "run1")
    assert records_json([mine], _encode.record_head_mid, _encode.receive_time_bytes) is None
    assert Record.jsons([mine]) == [Record.of_event(event, "run1").json]
    assert Record.jsons((Record.of_event(event, "run1"),)) == [mine.json]  # a tuple too
    with pytest.raises(TypeError):
        records_json(None, _encode.record_head_mid, _encode.receive_time_bytes)
    with pytest.raises(AttributeError):  # an unset slot raises as in Python
        Record.jsons([Record.of_event(unset, "run1")])


def test_parts_are_asked_once_per_connection_and_time_once_per_value() -> None:
    calls: list[tuple] = []

    def parts_for(server, run, epoch):
        calls.append(("parts", server, epoch))
        return _encode.record_head_mid(server, run, epoch)

    def iso(ts):
        calls.append(("time", ts))
        return _encode.receive_time_bytes(ts)

    events = [wire_event(b"Event: A\r\nK: v", server, epoch, seq, ts)
              for seq, (server, epoch, ts) in enumerate(
                  [("a", 1, 1.5), ("a", 1, 1.5), ("a", 1, 2.5), ("b", 1, 2.5), ("b", 1, 2.5), ("a", 2, 2.5)])]
    records = records_of(events, "run1")
    assert records_json(records, parts_for, iso) == [Record.of_event(e, "run1").json for e in events]
    assert calls == [("parts", "a", 1), ("time", 1.5), ("time", 2.5), ("parts", "b", 1),
                     ("parts", "a", 2)]


def test_records_in_c_do_not_leak() -> None:
    events = [wire_event(b"Event: Newchannel\r\nChannel: PJSIP/%d\r\nUniqueid: 1.%d" % (i, i),
                         "pbx-1", 1, i, 1764400000.0 + i // 50) for i in range(200)]

    def cycle() -> None:
        records = records_of(events, "run1")
        records_json(records, _encode.record_head_mid, _encode.receive_time_bytes)

    for _ in range(30):
        cycle()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(300):
            cycle()
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 64 * 1024, grown


def test_the_record_accelerator_is_in_use() -> None:
    assert _accel.active.records_of is records_of
    assert _accel.active.records_json is records_json


def test_a_record_whose_id_was_asked_keeps_that_id() -> None:
    # The id is fixed when first asked (e.g. by a dead-letter line), even if the event's seq
    # changes later: the batch encoder must then leave the record to event_json.
    event = wire_event(b"Event: A\r\nK: v", "pbx-1", 1, 5, 1764400000.0)
    (record,) = records_of([event], "run1")
    assert record.id == "pbx-1:run1:1:5"
    event.seq = 6
    (json,) = records_json([record], _encode.record_head_mid, _encode.receive_time_bytes)
    assert json.startswith(b'{"id":"pbx-1:run1:1:5","server":"pbx-1","epoch":1,"seq":6,')


# ---------------------------------------------------------------- the session's envelope in C

from amid.ami._speedups import stamp_events  # noqa: E402
from amid.ami.session import MAX_EVENT_NAMES, AMIClient  # noqa: E402


def dispatched(reads: list[bytes], *, pure: bool, names_before: int = 0, seq: int = 0):
    """Feed ``reads`` through a client with only a batch listener (the daemon's setup), with
    the C accelerator (``pure`` false) or without it."""
    with _accel.pure_python() if pure else contextlib.nullcontext():
        client = AMIClient("127.0.0.1", 5038, username="u", secret="s", name="pbx-1")
        client.epoch = 3
        client._seq = seq
        for i in range(names_before):
            client.stats.events_by_name[f"Known{i}"] = 1
        batches: list[list[Event]] = []
        client.add_batch_listener(lambda events: batches.append(list(events)))
        parser = Parser(expect_banner=False)
        for read in reads:
            client._dispatch_messages(parser.feed(read))
    stamps = [[(e.name, e.server, e.epoch, e.seq, type(e.received_at)) for e in b] for b in batches]
    stats = client.stats
    return (stamps, client._seq, stats.events_total, dict(stats.events_by_name),
            client._last_shutdown_event, stats.last_event_time is not None)


_NAMES = st.sampled_from([b"Newchannel", b"Hangup", b"Shutdown", b"New1", b"New2"])


@settings(max_examples=200, deadline=None)
@given(reads=st.lists(st.lists(st.one_of(_NAMES.map(lambda n: b"Event: %s\r\nK: v\r\n\r\n" % n),
                                         st.just(b"Response: Success\r\nActionID: x\r\n\r\n")),
                               max_size=6).map(b"".join), max_size=6),
       names_before=st.sampled_from([0, MAX_EVENT_NAMES - 2, MAX_EVENT_NAMES]),
       seq=st.sampled_from([0, 41, 2 ** 63 - 3, 2 ** 64]))
def test_c_envelope_equals_the_dispatch_loop(reads, names_before, seq) -> None:
    """Sequence numbers, server, epoch, receive time, per-name counts (bounded), the Shutdown
    flag and the batches are what the Python loop gives, with responses mixed in and sequence
    numbers past 63 bits."""
    with_c = dispatched(reads, pure=False, names_before=names_before, seq=seq)
    assert with_c == dispatched(reads, pure=True, names_before=names_before, seq=seq)


def test_stamp_events_changes_nothing_unless_it_can_do_all() -> None:
    events = Parser(expect_banner=False).feed(b"Event: A\r\n\r\nEvent: B\r\n\r\n")
    assert stamp_events([*events, "x"], "s", 1, 0, 1.0) is False
    assert stamp_events(events, "s", 1, 2 ** 63 - 2, 1.0) is False  # B's seq would pass 63 bits
    assert [(e.server, e.seq) for e in events] == [("", 0), ("", 0)]
    assert stamp_events(events, "s", 1, 2 ** 63 - 3, 1.5) is True
    assert [(e.server, e.epoch, e.seq, e.received_at) for e in events] == [
        ("s", 1, 2 ** 63 - 2, 1.5), ("s", 1, 2 ** 63 - 1, 1.5)]
    assert _accel.active.stamp_events is stamp_events


# ---------------------------------------------------------------- decoded fields in C

from amid.ami._speedups import parse_fields  # noqa: E402


def python_fields(raw: bytes) -> list[tuple[str, str]]:
    with _accel.pure_python():
        return Message(raw).fields


# Longer runs too: the decoder reads 16 and 8 bytes at a time.
_FIELD_PIECES = st.one_of(_PIECES, st.sampled_from([b"Uniqueid: 1700000000.1", b"01234567890123456789"]))


@settings(max_examples=2000, deadline=None)
@given(st.lists(_FIELD_PIECES, max_size=24).map(b"".join))
@example(b"A: b\r\nA: c")
@example(b"A: b: c\r\nK\r: v\r")
@example(b"A:b")
@example(b"A: b\r\n")
def test_c_fields_equal_python_fields(raw: bytes) -> None:
    got = parse_fields(raw)
    expected = python_fields(raw)
    if got is None:  # only what is not "Key: value" CRLF lines, or non-ASCII
        assert not raw.isascii() or b"\n" in raw.replace(b"\r\n", b"") or any(
            ": " not in line or ":" in line.partition(": ")[0] for line in raw.decode().split("\r\n"))
    else:
        assert got == expected
        assert all(type(k) is str and type(v) is str for k, v in got)
    assert Message(raw).fields == expected


def test_field_keys_that_share_a_cache_slot_stay_apart() -> None:
    raw = b"\r\n".join(b"Key%d: v%d" % (i, i) for i in range(3000))
    assert parse_fields(raw) == [(f"Key{i}", f"v{i}") for i in range(3000)]
    long_key = b"K" * 100
    assert parse_fields(long_key + b": v") == [("K" * 100, "v")]
    # Pairs of two strs are left out of the cyclic collector at once (CPython would untrack
    # them at its next collection anyway): reading fields creates no collector work.
    assert not any(gc.is_tracked(pair) for pair in parse_fields(raw))


def test_c_fields_do_not_leak() -> None:
    raw = b"\r\n".join(b"Key%d: value %d" % (i % 20, i) for i in range(40))
    for _ in range(50):
        parse_fields(raw)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(2000):
            parse_fields(raw)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 64 * 1024, grown
    assert _accel.active.parse_fields is parse_fields


def test_records_of_takes_any_sequence_and_exact_bytes_only() -> None:
    class Sized(bytes):
        def __len__(self) -> int:
            return 1000

    events = [wire_event(b"Event: A\r\nK: v", "pbx-1", 1, 5, 1764400000.0)]
    assert [record_slots(r) for r in records_of(tuple(events), "run1")] == \
        [record_slots(Record.of_event(e, "run1")) for e in events]
    odd = wire_event(Sized(b"Event: A\r\nK: v"), "pbx-1", 1, 5, 1764400000.0)
    assert records_of([odd], "run1") is None  # Python sizes it with len()
    assert Record.of_events([odd], "run1")[0].size == Record.of_event(odd, "run1").size


def test_a_record_with_an_id_and_a_server_that_is_no_str_encodes_either_way() -> None:
    # A library user's Event with a non-str server: the id-bearing path must not concatenate.
    event = wire_event(b"Event: A\r\nV: 1\r\nV: 2", 5, 1, 5, 1764400000.0)
    def with_id() -> list[Record]:
        record = Record.of_event(event, "run1")
        assert record.id == "5:run1:1:5"
        return [record]
    with_c = Record.jsons(with_id())
    with _accel.pure_python():
        assert Record.jsons(with_id()) == with_c


def test_callbacks_that_change_the_batch_cannot_break_it() -> None:
    """Python run from inside the C (the parts callback, a finalizer) may empty the list or
    rebind an event's slots: the C holds what it uses (found by a second reader under ASan)."""
    events = [wire_event(b"Event: A\r\nK: v%d" % i, "pbx-1", 1, i, 1764400000.0) for i in range(50)]
    records = records_of(events, "run1")
    expected = [Record.of_event(e, "run1").json for e in events]

    def parts_for(server, run, epoch):
        records.clear()                     # the caller's list, emptied mid-call
        for event in events:
            event.raw = b"Event: B\r\nK: changed"  # slots rebound mid-call
        return _encode.record_head_mid(server, run, epoch)
    got = records_json(records, parts_for, _encode.receive_time_bytes)
    assert len(got) == 50 and got[0] == expected[0]  # the first was held; the rest see the new raw
    assert all(b'"K":"changed"' in json for json in got[1:])
