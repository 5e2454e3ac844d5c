"""amid._speedups, the optional C version of the record JSON's fields fast path.

It must give exactly what the pure-Python fast path gives, decline (False) only where that
declines too, and leave to Python (None) only what it cannot judge (non-ASCII bytes, very long
messages). The record tests in test_protocol.py run against both implementations.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pydantic_core import to_json

from amid import _encode
from amid._encode import fields_json_fast_py
from amid.ami.protocol import Message

try:
    from amid._speedups import fields_json as fields_json_c
    from amid._speedups import record_json as record_json_c
except ImportError:
    if os.environ.get("CI"):  # CI builds it (scripts/test.sh installs gcc): missing is a failure
        raise
    pytest.skip("amid._speedups is not built (no C compiler when amid was installed)",
                allow_module_level=True)


def test_the_accelerator_is_in_use() -> None:
    assert _encode.SPEEDUPS == "c"
    assert _encode._fields_json_c is fields_json_c


def general_fields(raw: bytes) -> bytes:
    """The fields JSON of the general path: Message.to_dict() through pydantic_core."""
    return to_json(Message(raw).to_dict())


def check(raw: bytes) -> object:
    got = fields_json_c(raw)
    expected = fields_json_fast_py(raw)
    if got is None:
        assert not raw.isascii() or raw.count(b"\n") >= 511, raw
    elif got is False:
        assert expected is None, raw
    else:
        # C takes more than the Python fast path (repeated keys, ": " inside values): where
        # both take a message they agree, and C always agrees with the general path.
        assert expected is None or got == expected, raw
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
def test_c_matches_python_on_any_bytes(raw: bytes) -> None:
    check(raw)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.tuples(st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=12),
                          st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=30)),
                min_size=1, max_size=40))
def test_c_takes_every_plain_ascii_message_python_takes(fields: list[tuple[str, str]]) -> None:
    raw = "\r\n".join(f"{k}: {v}" for k, v in fields).encode()
    got = check(raw)
    if fields_json_fast_py(raw) is not None:
        assert isinstance(got, bytes)


def test_long_messages_and_many_keys() -> None:
    many = b"\r\n".join(b"Key%d: %s" % (i, b"v" * (i % 37)) for i in range(511))
    assert isinstance(check(many), bytes)
    assert check(many + b"\r\nKey7: again").endswith(b'"Key510":"' + b"v" * 29 + b'"}')
    assert b'"Key7":["vvvvvvv","again"]' in check(many + b"\r\nKey7: again")
    assert check(many + b"\r\nLast: x\r\nOne: more") is None  # over 512 lines: Python decides
    assert check(b"Value: " + b"x" * 100_000 + b'"') == fields_json_fast_py(b"Value: " + b"x" * 100_000 + b'"')


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
        fields_json_c("Event: X")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        record_json_c(b"", b"", 1, b"", b"", "Event: X")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        record_json_c(b"", b"", 1, b"", b"")  # type: ignore[call-arg]


def python_record(parts, seq: int, received: bytes, name: bytes, raw: bytes) -> bytes | None:
    fields = fields_json_fast_py(raw)
    return None if fields is None else parts.template % (seq, seq, received, name, fields)


@settings(max_examples=500, deadline=None)
@given(raw=st.lists(_PIECES, max_size=16).map(b"".join),
       seq=st.integers(min_value=-(2 ** 70), max_value=2 ** 70),
       server=st.sampled_from([b"pbx-1", b"p%d%%s", b""]), epoch=st.integers(0, 2 ** 40))
@example(raw=b"Event: X\r\nA: b", seq=0, server=b"pbx-1", epoch=1)
def test_c_record_json_matches_the_python_template(raw: bytes, seq: int, server: bytes,
                                                   epoch: int) -> None:
    parts = _encode._RecordParts(server, b"run", epoch)
    received, name = b"2026-11-29T07:00:00.000001Z", b"Newchannel"
    got = record_json_c(parts.head, parts.mid, seq, received, name, raw)
    expected = python_record(parts, seq, received, name, raw)
    if got is None:
        assert not raw.isascii() or not -(2 ** 63) <= seq < 2 ** 63
    elif got is False:
        assert expected is None
    else:
        assert expected is None or got == expected
        assert got == parts.template % (seq, seq, received, name, general_fields(raw))


@pytest.mark.parametrize(("speedups", "says"), [("c", "record JSON: C accelerator"),
                                                 ("python", "the C accelerator was not built")])
def test_version_says_whether_the_accelerator_is_in_use(speedups, says, monkeypatch, capsys) -> None:
    from amid import cli
    monkeypatch.setattr(cli, "SPEEDUPS", speedups)
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["--version"])
    assert says in capsys.readouterr().out
