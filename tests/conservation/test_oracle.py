"""The oracle on hand-made deliveries: it passes what is whole and names every kind of loss."""

from __future__ import annotations

from typing import Any

import pytest

from .oracle import SessionBound, check, parse_jsonl


def record(session: int, seq: int, *, run: str = "r1", epoch: int | None = None,
           amid_seq: int | None = None, offset: int = 2) -> dict[str, Any]:
    """A delivered record of numbered event ``seq`` of ``session`` (amid's seq counts the
    ``offset`` events before the stream too)."""
    epoch = session if epoch is None else epoch
    amid_seq = seq + offset if amid_seq is None else amid_seq
    return {"id": f"pbx1:{run}:{epoch}:{amid_seq}", "epoch": epoch, "seq": amid_seq,
            "event": "VarSet",
            "fields": {"Event": "VarSet", "AmidTestSession": str(session), "AmidTestSeq": str(seq)}}


def preamble(session: int) -> list[dict[str, Any]]:
    return [{"id": f"pbx1:r1:{session}:{n}", "epoch": session, "seq": n, "event": name,
             "fields": {"Event": name}} for n, name in ((1, "FullyBooted"), (2, "SuccessfulAuth"))]


def whole(session: int, n: int) -> list[dict[str, Any]]:
    return preamble(session) + [record(session, k) for k in range(1, n + 1)]


EXACT = {1: SessionBound(sent=100, must_deliver=100, other=2)}


def test_a_whole_delivery_passes_and_is_counted() -> None:
    report = check("file", whole(1, 100), EXACT)
    assert report.delivered == 100 and report.duplicates == 0 and report.missing == 0


def test_a_hole_fails_unless_the_drop_counter_has_it() -> None:
    records = [r for r in whole(1, 100) if not 40 <= int(r["fields"].get("AmidTestSeq", 0)) < 50]
    with pytest.raises(AssertionError, match=r"session 1: hole 40-49 \(10\)"):
        check("webhook", records, EXACT)
    assert check("webhook", records, EXACT, dropped=10).missing == 10
    with pytest.raises(AssertionError, match="10 numbered and 0 other events missing, 11"):
        check("webhook", records, EXACT, dropped=11)


def test_a_lost_tail_fails_where_the_events_were_read() -> None:
    with pytest.raises(AssertionError, match="delivered up to 90, must reach 100"):
        check("file", whole(1, 90), EXACT)
    # Killed before it read them: a tail is allowed down to what amid had read.
    killed = {1: SessionBound(sent=100, must_deliver=80, other=2)}
    assert check("file", whole(1, 90), killed).tails == {1: 10}


def test_duplicates_only_within_the_in_flight_window() -> None:
    records = whole(1, 100) + [record(1, k) for k in range(60, 70)]
    with pytest.raises(AssertionError, match="10 duplicates, at most 5 in flight"):
        check("webhook", records, EXACT, max_duplicates=5)
    assert check("webhook", records, EXACT, max_duplicates=10).duplicates == 10


def test_spoiled_numbers_are_excused_and_only_they() -> None:
    records = [r for r in whole(1, 100) if r["fields"].get("AmidTestSeq") not in ("31", "32")]
    bound = {1: SessionBound(sent=100, must_deliver=30, spoiled=frozenset({31}), other=2)}
    with pytest.raises(AssertionError, match="hole 32"):
        check("file", records, bound, dropped=0)


def test_one_connection_carries_one_session() -> None:
    records = whole(1, 10) + [record(2, k, epoch=1, amid_seq=12 + k) for k in range(1, 6)]
    bounds = {1: SessionBound(10, 10, other=2), 2: SessionBound(5, 5)}
    with pytest.raises(AssertionError, match=r"carries sessions \[1, 2\]"):
        check("file", records, bounds)


def test_a_torn_line_fails() -> None:
    records, torn = parse_jsonl(b'{"id": "a"}\n{"id":"pbx1\n{"id": "b"}\n')
    assert [r["id"] for r in records] == ["a", "b"] and torn == [b'{"id":"pbx1']
    with pytest.raises(AssertionError, match="1 torn"):
        check("file", whole(1, 100), EXACT, torn=len(torn))
