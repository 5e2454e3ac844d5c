"""Broker sinks with confirms: the amqp sink on RabbitMQ, the nats sink on NATS JetStream.

    python -m benchmarks.bench_brokers            # both, about 1 minute
    python -m benchmarks.bench_brokers --quick    # fewer events

Each sink runs behind the real delivery machinery (a :class:`~amid.sinks.delivery.SinkRunner`
with the default batch of 500 and no batch wait) against the machine's broker (RabbitMQ on
127.0.0.1:5672 into a durable queue, persistent messages; NATS on 127.0.0.1:4222 into a file
stream), so every record counts as sent only once the broker confirmed it. Two phases:

* **flat out**: a backlog of N records offered at once; rate = N / time until the last confirm.
* **paced**: 20,000 records/s offered in 200-record slices every 10 ms for a few seconds;
  latency = offer → broker confirm, per record (p50/p99); CPU of this process (amid's side) and
  of the broker's process, as a share of one core.

The broker runs on the same 2-core machine, so its CPU competes with amid's: both are stated.
The amqp sink is also measured into a lazy version-2 classic queue, a stream queue, and an
exchange with no queue bound: they show where RabbitMQ's time goes (the queue), not a different
sink.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python benchmarks/bench_brokers.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from amid.records import Record
from amid.sinks.delivery import RunnerSettings, SinkRunner

from benchmarks.common import markdown_table, percentile, proc_cpu_seconds

RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672/"
NATS_URL = "nats://127.0.0.1:4222"
TARGET_RATE = 20_000


def make_records(count: int, *, start: int = 0, stamp: float | None = None) -> list[Record]:
    """Records shaped like a Newchannel event (about 600 bytes of JSON each)."""
    records = []
    for n in range(start, start + count):
        shape = Record.synthetic(
            id=f"pbx1:bench:1:{n}", server="pbx1", name="Newchannel", seq=n,
            received_at=stamp if stamp is not None else time.time(),
            fields={"Privilege": "call,all", "Channel": f"PJSIP/100-{n:08x}", "ChannelState": "0",
                    "ChannelStateDesc": "Down", "CallerIDNum": "100", "CallerIDName": "Alice",
                    "ConnectedLineNum": "<unknown>", "ConnectedLineName": "<unknown>",
                    "Language": "en", "AccountCode": "", "Context": "from-internal",
                    "Exten": "200", "Priority": "1", "Uniqueid": f"1780000000.{n}",
                    "Linkedid": f"1780000000.{n}"})
        records.append(Record.from_json(json.dumps(shape.data, separators=(",", ":")).encode()))
    return records


class _Timed:
    """Wraps a sink: notes offer → confirm latency of every record it delivers."""

    def __init__(self, sink: Any) -> None:
        self.sink = sink
        self.name = sink.name
        self.latencies: list[float] = []
        self.recording = False

    async def start(self) -> None:
        await self.sink.start()

    async def send(self, batch: Sequence[Record]) -> None:
        await self.sink.send(batch)
        if self.recording:
            now = time.time()
            self.latencies.extend(now - record.received_at for record in batch)

    async def close(self) -> None:
        await self.sink.close()


def _runner(sink: Any, batch_max_events: int) -> SinkRunner:
    return SinkRunner(sink, RunnerSettings(
        name=sink.name, max_queue_events=1_000_000, max_queue_bytes=1 << 30,
        overflow="drop_newest", spool_dir=None, spool_max_bytes=1, spool_fallback="drop_newest",
        spool_fsync_interval=1.0, batch_max_events=batch_max_events,
        batch_max_bytes=batch_max_events * 2048, batch_max_wait=0.0, retry_min_delay=0.05,
        retry_max_delay=1.0, dead_letter_path=None, attempt_timeout=60.0))


def _broker_pid(comm: str) -> int | None:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == comm:
                    return int(entry.name)
            except OSError:
                continue
    return None


@dataclass
class Phase:
    name: str
    events: int = 0
    seconds: float = 0.0
    amid_cpu: float = 0.0      # CPU seconds of this process
    broker_cpu: float = 0.0    # CPU seconds of the broker process
    latencies: list[float] = field(default_factory=list)
    complete: bool = True

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0

    def share(self, cpu: float) -> str:
        return f"{cpu / self.seconds * 100:.0f}%" if self.seconds else "n/a"

    def lat(self, q: float) -> str:
        values = sorted(self.latencies)
        return f"{percentile(values, q) * 1000:.1f} ms" if values else "n/a"


async def _measure(runner: SinkRunner, timed: _Timed, broker_pid: int | None,
                   flat_events: int, paced_seconds: float) -> list[Phase]:
    stats = runner.stats
    phases = []

    def cpu() -> tuple[float, float]:
        return time.process_time(), proc_cpu_seconds(broker_pid) if broker_pid else 0.0

    async def until_sent(total: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while stats.sent_total < total:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.002)
        return True

    # warm-up: connections, caches, the broker's first writes
    sent = 0
    runner.offer_many(make_records(5_000, start=0))
    sent += 5_000
    await until_sent(sent, 60)

    flat = Phase("flat out")
    backlog = make_records(flat_events, start=sent, stamp=time.time())
    a0, b0 = cpu()
    t0 = time.perf_counter()
    runner.offer_many(backlog)
    sent += flat_events
    flat.complete = await until_sent(sent, 120)
    flat.seconds = time.perf_counter() - t0
    a1, b1 = cpu()
    flat.events, flat.amid_cpu, flat.broker_cpu = flat_events, a1 - a0, b1 - b0
    phases.append(flat)

    paced = Phase(f"{TARGET_RATE:,}/s paced")
    slice_events, interval = TARGET_RATE // 100, 0.01
    slices = int(paced_seconds / interval)
    # Built before the clock starts (stamped at offer): the read path is not what is measured.
    pending = make_records(slices * slice_events, start=sent)
    timed.recording = True
    a0, b0 = cpu()
    t0 = time.perf_counter()
    for index in range(slices):
        now = time.time()
        piece = pending[index * slice_events:(index + 1) * slice_events]
        for record in piece:
            record.received_at = now
        runner.offer_many(piece)
        sent += slice_events
        # pace against the clock, not the sleep: a late wake-up is made up by the next slice
        await asyncio.sleep(max(0.0, t0 + (index + 1) * interval - time.perf_counter()))
    paced.complete = await until_sent(sent, 60)
    paced.seconds = time.perf_counter() - t0
    a1, b1 = cpu()
    timed.recording = False
    paced.events, paced.amid_cpu, paced.broker_cpu = slices * slice_events, a1 - a0, b1 - b0
    paced.latencies = timed.latencies
    phases.append(paced)
    return phases


async def _run_with(make_sink: Callable[[], Any], broker_pid: int | None, flat_events: int,
                    paced_seconds: float, batch_max_events: int) -> list[Phase]:
    timed = _Timed(make_sink())
    runner = _runner(timed, batch_max_events)
    await runner.start()
    try:
        return await _measure(runner, timed, broker_pid, flat_events, paced_seconds)
    finally:
        await runner.close(10.0)


async def bench_amqp(flat_events: int, paced_seconds: float, batch_max_events: int, *,
                     queue_arguments: dict[str, Any] | None = None,
                     bind_queue: bool = True) -> list[Phase]:
    import aio_pika

    from amid.sinks import amqp
    name = f"amid-bench-{uuid.uuid4().hex[:8]}"
    connection = await aio_pika.connect(RABBITMQ_URL)
    channel = await connection.channel()
    await channel.declare_exchange(name, "topic", durable=False)
    queue = await channel.declare_queue(name, durable=True, arguments=queue_arguments)
    if bind_queue:
        await queue.bind(name, "ami.#")
    try:
        return await _run_with(lambda: amqp.create("bench", {"url": RABBITMQ_URL, "exchange": name,
                                                             "mandatory": bind_queue}),
                               _broker_pid("beam.smp"), flat_events, paced_seconds,
                               batch_max_events)
    finally:
        await queue.delete(if_unused=False, if_empty=False)
        await channel.exchange_delete(name)
        await connection.close()


async def bench_amqp_lazy(flat_events: int, paced_seconds: float,
                          batch_max_events: int) -> list[Phase]:
    """The same into a lazy classic queue, version 2 (a choice of the queue's owner)."""
    return await bench_amqp(flat_events, paced_seconds, batch_max_events,
                            queue_arguments={"x-queue-version": 2, "x-queue-mode": "lazy"})


async def bench_amqp_stream(flat_events: int, paced_seconds: float,
                            batch_max_events: int) -> list[Phase]:
    """The same into a stream queue (``x-queue-type: stream``: an append-only log that
    consumers read from any offset, a fit for many consumers that come and go)."""
    return await bench_amqp(flat_events, paced_seconds, batch_max_events,
                            queue_arguments={"x-queue-type": "stream"})


async def bench_amqp_exchange_only(flat_events: int, paced_seconds: float,
                                   batch_max_events: int) -> list[Phase]:
    """No queue bound (not mandatory): the broker confirms at the exchange, stores nothing.
    Not a deployment: it shows what the sink and the exchange take without a queue's work."""
    return await bench_amqp(flat_events, paced_seconds, batch_max_events, bind_queue=False)


async def bench_nats(flat_events: int, paced_seconds: float, batch_max_events: int) -> list[Phase]:
    import nats

    from amid.sinks import nats as nats_sink
    name = f"AMIDBENCH_{uuid.uuid4().hex[:8]}"
    nc = await nats.connect(NATS_URL)
    js = nc.jetstream()
    await js.add_stream(name=name, subjects=[f"{name.lower()}.>"], storage="file")
    try:
        return await _run_with(lambda: nats_sink.create("bench", {
            "servers": NATS_URL, "stream": name, "subject": name.lower() + ".{server}.{event}"}),
            _broker_pid("nats-server"), flat_events, paced_seconds, batch_max_events)
    finally:
        await js.delete_stream(name)
        await nc.close()


BROKERS: dict[str, Callable[[int, float, int], Awaitable[list[Phase]]]] = {
    "amqp": bench_amqp, "nats": bench_nats, "amqp-lazy-queue": bench_amqp_lazy,
    "amqp-stream-queue": bench_amqp_stream, "amqp-exchange-only": bench_amqp_exchange_only}
DEFAULT = ("amqp", "nats", "amqp-lazy-queue", "amqp-stream-queue", "amqp-exchange-only")


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when installed, as `amid run` does."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop  # type: ignore[no-any-return]


def run(quick: bool = False, batches: Sequence[int] = (500,),
        only: Sequence[str] = DEFAULT) -> tuple[str, dict[str, list[Phase]]]:
    """Run each broker with each batch size; return the markdown section and the phases."""
    flat_events, paced_seconds = (50_000, 3.0) if quick else (100_000, 5.0)
    summary: dict[str, list[Phase]] = {}
    rows = []
    for broker, batch in [(b, n) for b in only for n in batches]:
        bench = BROKERS[broker]
        label = f"{broker}, batch.max_events {batch}"
        print(f"  {label} ...", file=sys.stderr, flush=True)
        try:
            with asyncio.Runner(loop_factory=_loop_factory()) as runner:
                phases = runner.run(bench(flat_events, paced_seconds, batch))
        except Exception as exc:
            rows.append([label, f"failed: {type(exc).__name__}: {exc}", "", "", "", "", ""])
            continue
        summary[label] = phases
        for phase in phases:
            rows.append([label, phase.name, f"{phase.rate:,.0f}" + ("" if phase.complete else " (incomplete)"),
                         phase.share(phase.amid_cpu), phase.share(phase.broker_cpu),
                         phase.lat(50), phase.lat(99)])
    load = os.getloadavg()
    text = (markdown_table(["sink (broker)", "phase", "events/s confirmed", "amid CPU (one core)",
                            "broker CPU (one core)", "latency p50", "latency p99"], rows)
            + f"\n\nEvent loop: {'uvloop' if _loop_factory() else 'asyncio'} (as `amid run`). "
            f"Load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
            f"(other work on the machine competes for its 2 cores). Latency: offer → broker "
            f"confirm, per record, in the paced phase.")
    return text, summary


def verdicts(summary: dict[str, list[Phase]]) -> list[list[str]]:
    rows = []
    for label, phases in summary.items():
        if not label.startswith(("amqp,", "nats,")):
            continue  # the variants explain a figure; they are not the target
        flat = phases[0]
        rows.append([f"{label}: ≥ {TARGET_RATE:,} events/s with confirms",
                     f"{flat.rate:,.0f} events/s flat out",
                     "**met**" if flat.rate >= TARGET_RATE and flat.complete else "**not met**"])
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer events")
    parser.add_argument("--only", default=",".join(DEFAULT), help=", ".join(BROKERS))
    parser.add_argument("--batch", default="500",
                        help="batch.max_events values to measure (comma-separated)")
    args = parser.parse_args(argv)
    text, summary = run(quick=args.quick, batches=[int(n) for n in args.batch.split(",")],
                        only=[name.strip() for name in args.only.split(",")])
    print(text)
    print()
    print(markdown_table(["target", "this run", "verdict"], verdicts(summary)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
