"""Benchmark 1, parse: bytes -> messages on a real Asterisk 22 stream, amid vs the Python floor.

Everything runs in this process, on the same bytes, cut into the same 64 KiB reads a socket
would give. Contenders alternate within every repetition (rotating the order) so drift on a
shared machine hits them all alike.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from amid.ami import _accel
from amid.ami._accel import pure_python
from amid.ami.protocol import Event, Parser
from amid.ami.session import AMIClient
from amid.records import Record

from benchmarks import prototypes
from benchmarks.common import Samples, markdown_table, ratio_text, s09a_messages, with_channel_vars

READ_SIZE = 64 * 1024


def floor_parse(chunks: Sequence[bytes]) -> int:
    """The obvious pure-Python AMI parser: split on the blank line, decode, split lines, build a
    dict. (It is lossy: a repeated key keeps only its last value.)"""
    buf = b""
    count = 0
    for data in chunks:
        buf += data
        *complete, buf = buf.split(b"\r\n\r\n")
        for raw in complete:
            msg = {}
            for line in raw.decode("utf-8").split("\r\n"):
                key, _, value = line.partition(": ")
                msg[key] = value
            count += 1
    return count


def amid_lazy(chunks: Sequence[bytes]) -> int:
    """amid framing; each message's name only (what routing needs); fields stay undecoded."""
    parser = Parser(expect_banner=False)
    count = 0
    for data in chunks:
        for msg in parser.feed(data):
            msg.name
            count += 1
    return count


def amid_fields(chunks: Sequence[bytes]) -> int:
    """amid framing + every field decoded into ordered (key, value) pairs (lossless)."""
    parser = Parser(expect_banner=False)
    count = 0
    for data in chunks:
        for msg in parser.feed(data):
            msg.fields
            count += 1
    return count


def amid_to_dict(chunks: Sequence[bytes]) -> int:
    """amid framing + ``to_dict()`` (repeated keys become lists: lossless, like the records)."""
    parser = Parser(expect_banner=False)
    count = 0
    for data in chunks:
        for msg in parser.feed(data):
            msg.to_dict()
            count += 1
    return count


def amid_lazy_python(chunks: Sequence[bytes]) -> int:
    """(a) without the C accelerator."""
    with pure_python():
        return amid_lazy(chunks)


def _read_path(chunks: Sequence[bytes]) -> int:
    """The daemon's read path, minus the socket and the sink queues: framing, the session's
    envelope (server, epoch, seq, receive time) and its batch listener, which makes the read's
    records (what the router does) and encodes them as a sink's batch (``Record.jsons``)."""
    parser = Parser(expect_banner=False)
    client = AMIClient("127.0.0.1", 5038, username="bench", secret="bench", name="bench")
    encoded = 0

    def encode(events: list[Event]) -> None:
        nonlocal encoded
        encoded += len(Record.jsons(Record.of_events(events, "run")))
    client.add_batch_listener(encode)
    for data in chunks:
        client._dispatch_messages(parser.feed(data))
    if encoded != client.stats.events_total:
        raise AssertionError(f"{encoded} records for {client.stats.events_total} events")
    return parser.messages_total  # the events and the capture's two responses


def amid_record_json(chunks: Sequence[bytes]) -> int:
    """amid's read path (see ``_read_path``) with the C accelerator."""
    if _accel.speedups is None:
        raise RuntimeError("amid.ami._speedups is not built: install amid with a C compiler present")
    return _read_path(chunks)


def amid_record_json_python(chunks: Sequence[bytes]) -> int:
    """The same without the accelerator: amid's pure-Python path."""
    with pure_python():
        return _read_path(chunks)


def proto_lazy(chunks: Sequence[bytes]) -> int:
    """Prototype: C-level framing (one ``bytes.split`` per read on pure-CRLF buffers)."""
    parser = prototypes.FastFramingParser(expect_banner=False)
    count = 0
    for data in chunks:
        for msg in parser.feed(data):
            msg.name
            count += 1
    return count


def proto_fields(chunks: Sequence[bytes]) -> int:
    """Prototype: C-level framing + fast-path field decoding (same pairs, lossless)."""
    parser = prototypes.FastFramingParser(expect_banner=False)
    parse_fields = prototypes.fast_parse_fields
    count = 0
    for data in chunks:
        for msg in parser.feed(data):
            msg._fields = parse_fields(msg.raw)
            count += 1
    return count


def proto_record_json(chunks: Sequence[bytes]) -> int:
    """Prototype framing + the shipped ``Record(...).json`` (the daemon's per-event path)."""
    parser = prototypes.FastFramingParser(expect_banner=False)
    count = 0
    for data in chunks:
        now = time.time()
        for msg in parser.feed(data):
            if type(msg) is Event:
                msg.server, msg.epoch, msg.received_at = "bench", 1, now
                msg.seq = count
                Record(id=f"bench:run:1:{count}", name=msg.name, server="bench", received_at=now,
                       event=msg).json
            count += 1
    return count


@dataclass
class Contender:
    name: str
    run: Callable[[Sequence[bytes]], int]
    lossless: bool


CONTENDERS = [
    Contender("floor: split + dict (pure Python)", floor_parse, False),
    Contender("amid (a) framing + lazy messages", amid_lazy, True),
    Contender("amid (a) framing + lazy messages (pure Python)", amid_lazy_python, True),
    Contender("amid (b) framing + all fields decoded", amid_fields, True),
    Contender("amid (b') framing + to_dict()", amid_to_dict, True),
    Contender("amid read path: framing, envelope, records, record JSON", amid_record_json, True),
    Contender("amid read path (pure Python)", amid_record_json_python, True),
]

PROTOTYPES = [
    Contender("prototype (a) C-level framing, lazy", proto_lazy, True),
    Contender("prototype (b) C-level framing + fast fields", proto_fields, True),
    Contender("prototype C-level framing + record JSON", proto_record_json, True),
]


def _chunks(messages: Sequence[bytes]) -> list[bytes]:
    data = b"".join(messages)
    return [data[i:i + READ_SIZE] for i in range(0, len(data), READ_SIZE)]


def measure(messages: Sequence[bytes], reps: int,
            contenders: Sequence[Contender] = CONTENDERS) -> dict[str, Samples]:
    """Messages per second for each contender, ``reps`` alternating repetitions."""
    chunks = _chunks(messages)
    expected = len(messages)
    rates = {c.name: Samples() for c in contenders}
    for c in contenders:  # warm-up (imports, caches) and a correctness check
        got = c.run(chunks)
        if got != expected:
            raise AssertionError(f"{c.name}: {got} messages, expected {expected}")
    for rep in range(reps):
        order = contenders[rep % len(contenders):] + contenders[:rep % len(contenders)]
        for c in order:
            gc.collect()
            t0 = time.perf_counter()
            c.run(chunks)
            rates[c.name].add(expected / (time.perf_counter() - t0))
    return rates


def run(reps: int, with_prototypes: bool = False) -> tuple[str, dict]:
    """Run on both streams; returns (markdown section, summary figures for the verdicts)."""
    contenders = CONTENDERS + (PROTOTYPES if with_prototypes else [])
    real = s09a_messages()
    streams = [
        ("s09a (real capture: 16,005 messages, 6.1 MB, 2–33 fields, no repeated keys)", real),
        ("s09a + channelvars (2 repeated `ChanVariable` keys per channel snapshot)",
         with_channel_vars(real)),
    ]
    out = []
    summary: dict = {}
    for title, messages in streams:
        if with_prototypes:
            prototypes.check_equivalence(_chunks(messages))
        rates = measure(messages, reps, contenders)
        floor = rates[CONTENDERS[0].name].median
        rows = []
        for c in contenders:
            s = rates[c.name]
            rows.append([c.name, s.fmt(), ratio_text(s.median, floor), "yes" if c.lossless else
                         "no (repeated keys overwritten)"])
        out.append(f"**{title}**, {reps} alternating repetitions, messages/s median (min–max):\n\n"
                   + markdown_table(["parser", "messages/s", "vs floor", "lossless"], rows))
        summary.setdefault("streams", []).append(
            {"title": title, "floor": floor,
             **{c.name: rates[c.name].median for c in contenders}})
    return "\n\n".join(out), summary


if __name__ == "__main__":
    import sys
    text, _ = run(5, with_prototypes="--prototypes" in sys.argv)
    print(text)
