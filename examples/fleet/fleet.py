"""A fleet on one machine: three PBXs (amid's AMI simulator), three amids, one broker, and a
consumer reading every PBX's hangups from ``<prefix>.*.Hangup``.

    python examples/fleet/fleet.py --broker nats --hangups 5
    python examples/fleet/fleet.py --broker amqp --hangups 5

Each PBX is an ``amid simulate`` process placing calls; each amid is an ``amid run`` process
with its own config (written next to this script's state, under --workdir) publishing to the
broker with ``overflow: spool``. The consumer is what a CRM or billing service would run:

* nats: a durable pull consumer (``hangups``) on the stream ``AMI`` filtered to
  ``<prefix>.*.Hangup``; more processes pulling from the same durable consumer share the work.
* amqp: a durable queue (``hangups``) bound to ``amq.topic`` with ``<prefix>.*.Hangup``; more
  processes consuming from the same queue share the work.

Delivery is at least once, so the consumer drops a record whose ``id`` it has seen (a bounded
memory of recent ids; JetStream already drops copies within its duplicate window). It prints
one line per hangup and exits once it saw ``--hangups`` from every PBX. With ``--keep`` the
stream / queue stay (a real deployment keeps them); by default they are removed on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import tempfile
from collections import OrderedDict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

PBXS = ("pbx1", "pbx2", "pbx3")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def amid_command() -> list[str]:
    """The ``amid`` installed beside this interpreter (the project's virtualenv)."""
    return [str(Path(sys.executable).with_name("amid"))]


def sink_config(args: argparse.Namespace) -> dict[str, Any]:
    common = {"name": "bus", "overflow": "spool", "batch": {"max_events": 500}}
    subject = args.prefix + ".{server}.{event}"
    if args.broker == "nats":
        return {**common, "type": "nats", "servers": args.nats_url, "subject": subject,
                "stream": args.stream,
                # Created by whichever amid starts first; never edited afterwards.
                "create_stream": {"subjects": [f"{args.prefix}.>"], "max_age": "7d",
                                  "duplicate_window": "2m"}}
    return {**common, "type": "amqp", "url": args.amqp_url, "exchange": "amq.topic",
            "routing_key": subject}


def write_config(workdir: Path, pbx: str, ami_port: int, args: argparse.Namespace) -> Path:
    config = {
        "servers": [{"name": pbx, "host": "127.0.0.1", "port": ami_port, "username": "amid",
                     "secret": "amidsecret"}],
        "sinks": [sink_config(args)],
        "http": {"listen": f"127.0.0.1:{free_port()}"},
        "state_dir": str(workdir / pbx),
        "shutdown_timeout": "5s",
    }
    path = workdir / f"{pbx}.json"  # JSON is YAML: no YAML library needed here
    path.write_text(json.dumps(config, indent=2))
    return path


@contextlib.asynccontextmanager
async def processes(args: argparse.Namespace, workdir: Path) -> AsyncIterator[None]:
    """Three simulators and three amids, stopped (SIGTERM, then SIGKILL) on exit."""
    running: list[asyncio.subprocess.Process] = []
    try:
        with (workdir / "processes.log").open("ab") as log:  # each child keeps its own copy
            for pbx in PBXS:
                port = free_port()
                running.append(await asyncio.create_subprocess_exec(
                    *amid_command(), "simulate", "--listen", f"127.0.0.1:{port}",
                    "--call-rate", str(args.call_rate), stdout=log, stderr=log))
                await wait_listening(port, running[-1])
                config = write_config(workdir, pbx, port, args)
                running.append(await asyncio.create_subprocess_exec(
                    *amid_command(), "run", "--config", str(config), "--log-level", "warning",
                    stdout=log, stderr=log))
        yield
    finally:
        for process in reversed(running):
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        for process in reversed(running):
            try:
                async with asyncio.timeout(10):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()


async def wait_listening(port: int, process: asyncio.subprocess.Process) -> None:
    async with asyncio.timeout(15):
        while True:
            if process.returncode is not None:
                raise RuntimeError("a simulator exited at start (see processes.log)")
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            return


class Hangups:
    """What the consumer keeps: hangups per PBX, and recent ids to drop redeliveries."""

    def __init__(self, wanted: int) -> None:
        self.wanted = wanted
        self.per_pbx = dict.fromkeys(PBXS, 0)
        self.seen: OrderedDict[str, None] = OrderedDict()   # bounded: the last 100,000 ids
        self.duplicates = 0
        self.done = asyncio.Event()

    def take(self, record: dict[str, Any]) -> None:
        if record["id"] in self.seen:
            self.duplicates += 1      # at least once: a copy of one already handled
            return
        self.seen[record["id"]] = None
        if len(self.seen) > 100_000:
            self.seen.popitem(last=False)
        self.per_pbx[record["server"]] = self.per_pbx.get(record["server"], 0) + 1
        fields = record["fields"]
        print(f"{record['server']} hangup {fields.get('Channel')} cause {fields.get('Cause')} "
              f"({fields.get('Cause-txt')})", flush=True)
        if all(count >= self.wanted for count in self.per_pbx.values()):
            self.done.set()


async def consume_nats(args: argparse.Namespace, hangups: Hangups) -> None:
    import nats
    from nats.js.errors import NotFoundError
    nc = await nats.connect(args.nats_url)
    js = nc.jetstream()
    try:
        async with asyncio.timeout(30):   # the stream exists once the first amid started
            while True:
                try:
                    await js.stream_info(args.stream)
                    break
                except NotFoundError:
                    await asyncio.sleep(0.1)
        subscription = await js.pull_subscribe(f"{args.prefix}.*.Hangup", durable="hangups",
                                               stream=args.stream)
        while not hangups.done.is_set():
            try:
                messages = await subscription.fetch(100, timeout=1)
            except TimeoutError:
                continue
            for message in messages:
                hangups.take(json.loads(message.data))
                await message.ack()   # only after handling: a crash here redelivers it
        if not args.keep:
            await js.delete_stream(args.stream)
    finally:
        await nc.close()


async def declare_amqp_queue(args: argparse.Namespace) -> None:
    """The queue exists before any amid publishes: a record nobody's queue is bound for is
    returned to amid as unroutable (counted, not stored)."""
    import aio_pika
    connection = await aio_pika.connect(args.amqp_url)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(args.queue, durable=True)
        await queue.bind("amq.topic", f"{args.prefix}.*.Hangup")
    finally:
        await connection.close()


async def consume_amqp(args: argparse.Namespace, hangups: Hangups) -> None:
    import aio_pika
    connection = await aio_pika.connect(args.amqp_url)
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=200)
        queue = await channel.declare_queue(args.queue, durable=True)
        await queue.bind("amq.topic", f"{args.prefix}.*.Hangup")
        async with queue.iterator() as messages:
            async for message in messages:
                hangups.take(json.loads(message.body))
                await message.ack()   # only after handling: a crash here redelivers it
                if hangups.done.is_set():
                    break
        if not args.keep:
            await queue.delete(if_unused=False, if_empty=False)
    finally:
        await connection.close()


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--broker", choices=("nats", "amqp"), default="nats")
    parser.add_argument("--hangups", type=int, default=5, help="per PBX, then exit")
    parser.add_argument("--call-rate", type=float, default=5.0, help="calls per second per PBX")
    parser.add_argument("--prefix", default="ami", help="first token of every subject/key")
    parser.add_argument("--stream", default="AMI", help="the JetStream stream (nats)")
    parser.add_argument("--queue", default="hangups", help="the consumer's queue (amqp)")
    parser.add_argument("--nats-url", default="nats://127.0.0.1:4222")
    parser.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="configs, spools and logs (default: a temporary directory)")
    parser.add_argument("--timeout", type=float, default=60.0, help="give up after (seconds)")
    parser.add_argument("--keep", action="store_true", help="keep the stream / queue")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="amid-fleet-") as scratch:
        workdir = args.workdir or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        hangups = Hangups(args.hangups)
        consume = consume_nats if args.broker == "nats" else consume_amqp
        if args.broker == "amqp":
            await declare_amqp_queue(args)
        async with processes(args, workdir):
            async with asyncio.timeout(args.timeout):
                await consume(args, hangups)
        print(f"hangups per PBX: {hangups.per_pbx}; redeliveries dropped: {hangups.duplicates}",
              flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(asyncio.run(main()))
