"""The soak: the conservation harness for minutes, a sink down part of the time.

    scripts/soak.sh [MINUTES]        # default 10; or: PYTHONPATH=tests python -m conservation.soak

A real ``amid run`` reads the simulator's numbered stream (``--rate`` events/s, Asterisk-like
writes) into a file, a webhook and a TCP syslog sink, all ``overflow: spool`` with a small memory
queue so the spool takes the overflow. In every cycle (``--cycle`` seconds) the webhook receiver
is gone for the first ``--down`` seconds. Every few seconds amid's RSS and the spool's size on
disk are sampled. At the end the streams are held, the sinks drain, amid stops (SIGTERM) and
the oracle checks every sink. It fails (exit 1) if the oracle does, if the spool ever outgrew
its configured cap, or if RSS kept growing (the peak of the last third above the peak of the
first third by more than ``--rss-growth`` MiB). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

from .harness import Harness

QUEUE = {"max_events": 20_000, "max_bytes": "16MiB"}
SPOOL_CAP = 256 * 1024 * 1024
MIB = 1024 * 1024


def _spool_bytes(state: Path) -> int:
    return sum(p.stat().st_size for p in state.rglob("*") if p.is_file())


async def soak(directory: Path, minutes: float, rate: float, cycle: float, down: float,
               rss_growth: float) -> bool:
    sinks = {name: {"queue": QUEUE, "spool": {"max_bytes": SPOOL_CAP}}
             for name in ("file", "webhook", "syslog")}
    async with Harness(directory, stream_rate=rate, sinks=sinks) as h:
        await h.start_amid()
        started = time.monotonic()
        end = started + minutes * 60
        samples: list[tuple[float, int, int]] = []   # (seconds, RSS, spool bytes)
        next_sample = started
        webhook_up = True
        while time.monotonic() < end:
            at = time.monotonic() - started
            in_cycle = at % cycle
            if in_cycle < down and webhook_up:
                await h.webhook.go_away()
                webhook_up = False
                print(f"{at:7.1f}s webhook down", flush=True)
            elif in_cycle >= down and not webhook_up:
                await h.webhook.come_back()
                webhook_up = True
                print(f"{at:7.1f}s webhook up", flush=True)
            if time.monotonic() >= next_sample:
                rss, spool = h.amid.rss_bytes(), _spool_bytes(directory / "state")
                samples.append((at, rss, spool))
                sent = sum(s.sent for s in h.sim.stats.streams.values())
                print(f"{at:7.1f}s sent {sent:9d}  RSS {rss / MIB:6.1f} MiB  "
                      f"spool {spool / MIB:7.1f} MiB", flush=True)
                next_sample += 5.0
            await asyncio.sleep(0.2)
        if not webhook_up:
            await h.webhook.come_back()
        print("holding the stream, draining, stopping amid", flush=True)
        code = await h.stop_amid()
        ok = code == 0
        if not ok:
            print(f"FAIL: amid exited {code}")
        try:
            reports = h.check()
        except AssertionError as exc:
            print(f"FAIL: the oracle:\n{exc}")
            ok = False
        else:
            for report in reports.values():
                print(f"  {report.sink}: {report.delivered} delivered, "
                      f"{report.duplicates} duplicates, 0 missing")
        third = max(1, len(samples) // 3)
        first_peak = max(rss for _, rss, _ in samples[:third])
        last_peak = max(rss for _, rss, _ in samples[-third:])
        spool_peak = max(spool for _, _, spool in samples)
        print(f"RSS peak: first third {first_peak / MIB:.1f} MiB, last third "
              f"{last_peak / MIB:.1f} MiB; spool peak {spool_peak / MIB:.1f} MiB "
              f"(cap {SPOOL_CAP / MIB:.0f} MiB per sink)")
        if last_peak - first_peak > rss_growth * MIB:
            print(f"FAIL: RSS grew by more than {rss_growth} MiB")
            ok = False
        if spool_peak > 3 * SPOOL_CAP:
            print("FAIL: the spool outgrew its cap")
            ok = False
        print("soak: OK" if ok else "soak: FAILED")
        return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("minutes", nargs="?", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=1000.0, help="events/s (default 1000)")
    parser.add_argument("--cycle", type=float, default=120.0, help="seconds per cycle (120)")
    parser.add_argument("--down", type=float, default=40.0,
                        help="seconds the webhook is down at the start of each cycle (40)")
    parser.add_argument("--rss-growth", type=float, default=32.0,
                        help="MiB the RSS peak may grow from the first third to the last (32)")
    parser.add_argument("--keep", action="store_true", help="keep the working directory")
    args = parser.parse_args(argv)
    directory = Path(tempfile.mkdtemp(prefix="amid-soak-"))
    print(f"soak: {args.minutes:g} min at {args.rate:g} events/s in {directory}", flush=True)
    ok = asyncio.run(soak(directory, args.minutes, args.rate, args.cycle, args.down,
                          args.rss_growth))
    if not args.keep and ok:
        import shutil
        shutil.rmtree(directory, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
