"""Keeping up on a busy machine: the sink gets its share of the loop.

A real ``amid run`` shares its core with CPU hogs (pinned to the same CPU, same priority), while
the simulator, on the other core as a PBX would be, writes each event on its own at a rate a file
sink sustains many times over. With a queue that holds only half a second of events, a worker
that lost the race against the reader for the loop would drop (``queue_full``); it must not.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from amid_procs import AMID, Proc, daemon, poll
from promparse import parse, total

RATE = 4000          # events/s from the simulator, one write each
QUEUE_EVENTS = 2000  # half a second of them
SECONDS = 4.0
HOGS = 2             # busy processes on amid's CPU: amid gets about a third of it

pytestmark = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to pin on")


@contextmanager
def hogs(cpu: int, count: int) -> Iterator[list[subprocess.Popen[bytes]]]:
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        for proc in procs:
            os.sched_setaffinity(proc.pid, {cpu})
        yield procs
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(5)


def test_a_starved_daemon_still_delivers_everything_its_reader_takes(tmp_path: Path) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    amid_cpu, sim_cpu = cpus[0], cpus[1]
    sim = Proc([*AMID, "simulate", "--listen", "127.0.0.1:0", "--stream-rate", str(RATE)],
               tmp_path / "simulate.log")
    try:
        match = sim.wait_for(r"listening on 127\.0\.0\.1:(\d+)")
        os.sched_setaffinity(sim.popen.pid, {sim_cpu})
        sinks = [{"name": "events", "type": "file", "path": str(tmp_path / "events.jsonl"),
                  "overflow": "drop_oldest", "queue": {"max_events": QUEUE_EVENTS}}]
        with daemon(tmp_path, int(match.group(1)), sinks=sinks) as amid:
            os.sched_setaffinity(amid.popen.pid, {amid_cpu})
            for thread in os.listdir(f"/proc/{amid.popen.pid}/task"):
                os.sched_setaffinity(int(thread), {amid_cpu})
            before = parse(amid.metrics())
            with hogs(amid_cpu, HOGS):
                start = total(before, "amid_ami_received_events_total")
                poll(lambda: total(parse(amid.metrics()), "amid_ami_received_events_total")
                     >= start + RATE * SECONDS or None, SECONDS * 4, f"{RATE * SECONDS:.0f} events read")
                during = parse(amid.metrics())
            after = poll(lambda: (lambda s: s if total(s, "amid_sink_queue_events", sink="events") == 0
                                  else None)(parse(amid.metrics())), 10, "the queue to drain")
    finally:
        sim.stop()
    read = total(during, "amid_ami_received_events_total") - start
    assert read >= RATE * SECONDS, "the reader kept up with the simulator"
    assert total(after, "amid_sink_dropped_events_total", sink="events") == 0, \
        "the sink worker got its share of the loop: nothing dropped as queue_full"
    assert total(after, "amid_sink_sent_events_total", sink="events") == \
        total(after, "amid_sink_received_events_total", sink="events")
    assert total(during, "amid_sink_queue_events", sink="events") < QUEUE_EVENTS
