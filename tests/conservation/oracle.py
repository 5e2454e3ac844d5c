"""The conservation oracle: what "nothing lost" means, checked per sink and per AMI session.

The simulator numbers every event of a session's stream (``AmidTestSession``, ``AmidTestSeq`` 1..sent)
and amid numbers every event it read within a connection (the record's ``epoch`` and ``seq``,
under a per-start ``run`` in its ``id``). For one sink's delivered records the oracle checks:

* **one connection, one session**: every amid ``(run, epoch)`` carries one simulator session, and
  no session shows under two;
* **no hole**: within each session the numbers delivered are contiguous from 1 (and amid's own
  ``seq`` within each ``(run, epoch)`` is contiguous from 1), except for numbers a drop counter
  accounts for (``dropped``: the sink's ``amid_sink_dropped_events_total`` at a final scrape; zero when a
  run was killed and the sink is spooled, since a spooled sink has nothing to drop) and the event
  a fault spoiled on the wire (the one right after injected garbage);
* **a lost tail only where explained**: a session must be delivered at least up to its
  ``must_deliver`` bound: everything it sent when the simulator ended it in order (Logoff, a cut
  or half-open stream, a restart: amid reads up to the end of what it got), and for a session amid
  was killed on, what amid had provably read (its ``amid_ami_received_events_total`` scraped just
  before the kill, minus the session's events that are not numbered). What lies beyond is the
  unread tail, reported with its size;
* **duplicates only in flight**: at most ``max_duplicates`` (a batch per fault that can leave a
  batch in flight), and counted;
* **records whole**: nothing undecodable (a torn line in a file counts here).
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["SessionBound", "SinkReport", "check", "numbered", "parse_jsonl"]


@dataclass(frozen=True)
class SessionBound:
    """What one simulator session sent, and what a sink must at least have of it."""

    sent: int                      # numbered events the simulator wrote in full
    must_deliver: int              # 1..must_deliver must be there (minus drops and spoiled)
    spoiled: frozenset[int] = frozenset()  # numbers a wire fault may have destroyed
    other: int = 0                 # events of the session that are not numbered (FullyBooted…)


@dataclass
class SinkReport:
    """What the oracle found for one sink (also returned when everything holds)."""

    sink: str
    delivered: int = 0                                  # distinct numbered events delivered
    duplicates: int = 0
    holes: dict[int, list[int]] = field(default_factory=dict)        # session -> missing numbers
    seq_holes: dict[tuple[str, int], list[int]] = field(default_factory=dict)  # (run, epoch)
    short: dict[int, tuple[int, int]] = field(default_factory=dict)  # session -> (max, must)
    tails: dict[int, int] = field(default_factory=dict)             # session -> unread tail size
    problems: list[str] = field(default_factory=list)

    @property
    def missing(self) -> int:
        return sum(len(h) for h in self.holes.values())

    def summary(self) -> str:
        def ranges(numbers: list[int]) -> str:
            spans: list[list[int]] = []
            for n in sorted(numbers):
                if spans and n == spans[-1][1] + 1:
                    spans[-1][1] = n
                else:
                    spans.append([n, n])
            out = [f"{a}-{b}" if a != b else str(a) for a, b in spans]
            return ",".join(out[:8]) + (",…" if len(out) > 8 else "")

        lines = [(f"sink {self.sink}: {self.delivered} delivered, {self.duplicates} duplicates, "
                  f"{self.missing} missing, unread tails {dict(self.tails)}")]
        lines += [f"  session {s}: hole {ranges(h)} ({len(h)})" for s, h in self.holes.items()]
        lines += [f"  session {s}: delivered up to {got}, must reach {must}"
                  for s, (got, must) in self.short.items()]
        lines += [f"  run {r} epoch {e}: amid seq hole {ranges(h)} ({len(h)})"
                  for (r, e), h in self.seq_holes.items()]
        lines += [f"  {p}" for p in self.problems]
        return "\n".join(lines)


def parse_jsonl(data: bytes) -> tuple[list[dict[str, Any]], list[bytes]]:
    """Records of a JSON Lines file, and the lines that are not a whole JSON object (torn)."""
    records, torn = [], []
    for line in data.split(b"\n"):
        if not line:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            torn.append(line)
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            torn.append(line)
    if data and not data.endswith(b"\n"):
        torn.append(b"(no newline at the end of the file)")
    return records, torn


def numbered(record: Mapping[str, Any]) -> tuple[int, int] | None:
    """(session, seq) of a record of a numbered event, else None."""
    fields = record.get("fields") or {}
    session, seq = fields.get("AmidTestSession"), fields.get("AmidTestSeq")
    if isinstance(session, str) and isinstance(seq, str) and session.isdigit() and seq.isdigit():
        return int(session), int(seq)
    return None


def _run_epoch(record: Mapping[str, Any]) -> tuple[str, int]:
    server, run, epoch, _ = str(record["id"]).rsplit(":", 3)
    return f"{server}:{run}", int(epoch)


def check(sink: str, records: Iterable[Mapping[str, Any]], bounds: Mapping[int, SessionBound], *,
          dropped: int = 0, max_duplicates: int = 0, torn: int = 0) -> SinkReport:
    """Check one sink's delivered ``records`` (any order) against the simulator's ``bounds``
    (by session number); raise ``AssertionError`` with the report if anything is unexplained."""
    report = SinkReport(sink)
    if torn:
        report.problems.append(f"{torn} torn (not JSON) records")
    seen: Counter[tuple[int, int]] = Counter()
    amid_seqs: dict[tuple[str, int], set[int]] = defaultdict(set)
    session_of: dict[tuple[str, int], set[int]] = defaultdict(set)
    others: dict[tuple[str, int], set[int]] = defaultdict(set)   # not numbered, by connection
    for record in records:
        if record.get("event") == "AmidGap":
            continue
        run_epoch = _run_epoch(record)
        amid_seqs[run_epoch].add(int(record["seq"]))
        key = numbered(record)
        if key is None:
            others[run_epoch].add(int(record["seq"]))
            continue
        seen[key] += 1
        session_of[run_epoch].add(key[0])
    report.duplicates = sum(n - 1 for n in seen.values())
    report.delivered = len(seen)

    epochs_of: dict[int, list[tuple[str, int]]] = defaultdict(list)
    for run_epoch, sessions in session_of.items():
        if len(sessions) > 1:
            report.problems.append(f"{run_epoch} carries sessions {sorted(sessions)}")
        for session in sessions:
            epochs_of[session].append(run_epoch)
    for session, run_epochs in epochs_of.items():
        if len(run_epochs) > 1:
            report.problems.append(f"session {session} under several connections {run_epochs}")

    by_session: dict[int, set[int]] = defaultdict(set)
    for session, seq in seen:
        by_session[session].add(seq)
    for session in sorted(set(by_session) - set(bounds)):
        report.problems.append(f"session {session} delivered but the simulator never streamed it")
    other_missing = 0
    for session, bound in sorted(bounds.items()):
        if bound.must_deliver == bound.sent:  # everything it sent was read: the others too
            other_missing += max(0, bound.other - sum(len(others[e]) for e in epochs_of[session]))
        got = by_session.get(session, set())
        beyond = [n for n in got if n > bound.sent or n < 1]
        if beyond:
            report.problems.append(f"session {session}: numbers never sent {sorted(beyond)[:5]}")
        top = max(got, default=0)
        hole = [n for n in range(1, max(top, bound.must_deliver) + 1)
                if n not in got and n not in bound.spoiled]
        if top < bound.must_deliver:
            report.short[session] = (top, bound.must_deliver)
        if hole:
            report.holes[session] = hole
        report.tails[session] = bound.sent - top

    for run_epoch, seqs in sorted(amid_seqs.items()):
        top = max(seqs)
        hole = [n for n in range(1, top + 1) if n not in seqs]
        if hole:
            report.seq_holes[run_epoch] = hole

    if report.missing + other_missing != dropped:
        report.problems.append(f"{report.missing} numbered and {other_missing} other events "
                               f"missing, {dropped} in the drop counter")
    seq_missing = sum(len(h) for h in report.seq_holes.values())
    if seq_missing > dropped:
        report.problems.append(f"{seq_missing} amid seq numbers missing, {dropped} dropped")
    if report.duplicates > max_duplicates:
        report.problems.append(f"{report.duplicates} duplicates, at most {max_duplicates} in flight")
    if report.problems:
        raise AssertionError(report.summary())
    return report
