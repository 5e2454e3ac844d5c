"""Run the amid benchmarks and print (and save) a markdown results table.

    python -m benchmarks.run            # everything, about 3–4 minutes
    python -m benchmarks.run --quick    # fewer repetitions and events, about 1–2 minutes
    python -m benchmarks.run --only parse,receive --prototypes

Results go to stdout and to benchmarks/results/latest.md (git-ignored). Method notes:
benchmarks/README.md. Nothing here asserts; targets are reported as met or not.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import bench_brokers, bench_e2e, bench_parse, bench_receive, bench_tail
from benchmarks.common import RESULTS_DIR, machine_description

ALL = ("parse", "receive", "e2e", "tail", "brokers")


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**met**" if ok else "**not met**")


def verdicts(summary: dict) -> list[list[str]]:
    """One row per target of issue 5, from the figures of this run."""
    rows: list[list[str]] = []
    parse = summary.get("parse")
    if parse:
        s = parse["streams"][0]
        floor = s["floor"]
        lazy = s["amid (a) framing + lazy messages"] / floor
        lazy_py = s["amid (a) framing + lazy messages (pure Python)"] / floor
        full = s["amid (b) framing + all fields decoded"] / floor
        rows.append(["Parse ≥ 2× floor (lossless)",
                     f"(a) lazy {lazy:.2f}× (pure Python {lazy_py:.2f}×), (b) all fields {full:.2f}×",
                     _verdict(lazy >= 2) + " (a) / " + _verdict(full >= 2) + " (b)"])
    receive = summary.get("receive")
    if receive:
        amid, lazy = receive.get("amid", {}), receive.get("amid-lazy", {})
        for peer, target in (("panoramisk", 4), ("python-ami", 2)):
            p = receive.get(peer, {})
            if p.get("error") or not p.get("rate"):
                rows.append([f"Receive ≥ {target}× {peer}", f"{peer} failed: {p.get('error')}", "n/a"])
                continue
            intact = amid.get("intact") == amid.get("checked") and amid.get("delivered") == amid.get("expect")
            r_field, r_lazy = amid["rate"] / p["rate"], lazy["rate"] / p["rate"]
            rows.append([f"Receive ≥ {target}× {peer}, every event intact",
                         f"handler reads a field {r_field:.2f}×, name only {r_lazy:.2f}×; amid intact: "
                         f"{'yes' if intact else 'NO'}",
                         _verdict(r_field >= target and intact) + " (field) / "
                         + _verdict(r_lazy >= target and intact) + " (name only)"])
    e2e = summary.get("e2e")
    if e2e:
        phases = {p.name: p for p in e2e["file"]["phases"]}
        flat = phases["flat out"]
        # The floor measured side by side with the flat-out runs (median), not the parse
        # section's: the machine's speed drifts between sections.
        floors = sorted(e2e["file"]["floor_rates"])
        floor = floors[len(floors) // 2]
        pure = e2e["pure"]["phases"][-1]
        rows.append(["End to end (file) ≥ 1× floor parse rate",
                     f"{flat.rate:,.0f} vs floor {floor:,.0f} events/s (measured alongside) = "
                     f"{flat.rate / floor:.2f}× (pure Python {pure.rate / floor:.2f}×)",
                     _verdict(flat.rate >= floor and flat.complete)])
        p40 = phases.get("40,000/s paced")
        if p40:
            rows.append(["CPU at 40k events/s < 40% of one core", f"{p40.core_share * 100:.0f}%",
                         _verdict(p40.core_share < 0.40 and p40.complete)])
        p10 = phases.get("10,000/s paced")
        if p10:
            rows.append(["p99 receive→write < 5 ms at 10k events/s", f"{p10.lat(99):.2f} ms",
                         _verdict(p10.lat(99) < 5)])
        steady = e2e["file"]["rss_steady"] / 1024
        settled = e2e["file"]["rss_settled"] / 1024
        idle = e2e["file"]["rss_idle"] / 1024
        rows.append(["RSS < 80 MB steady", f"{idle:.0f} MiB after warm-up; {steady:.0f} MiB right after the "
                     f"flat-out burst, {settled:.0f} MiB once its queue drained",
                     _verdict(idle < 80 and settled < 80)])
        rows += issue14_rows(e2e)
        out = e2e["outage"]
        growth = (out["peak_second"] - out["peak_first"]) / 1024
        rows.append(["RSS bounded by queue limits during a sink outage",
                     f"peak RSS, second half vs first half of the outage {growth:+.1f} MiB; queue "
                     f"{out['queue_events'] or 0:,.0f} ≤ {out['max_events']:,} events",
                     _verdict(growth < 8 and (out["queue_events"] or 0) <= out["max_events"])])
    tail = summary.get("tail")
    if tail:
        amid = tail["amid"]
        intact = bench_tail.tail_intact(tail)
        for peer, target in bench_tail.TARGETS.items():
            p = tail.get(peer, {})
            if amid.get("error") or p.get("error"):
                rows.append([f"[14] `amid tail` ≥ {target:g}× {peer}",
                             f"failed: {amid.get('error') or p.get('error')}", "n/a"])
                continue
            ratio = amid["rate"] / p["rate"]
            rows.append([f"[14] `amid tail` ≥ {target:g}× {peer}, every event printed intact",
                         f"{amid['rate']:,.0f} vs {p['rate']:,.0f} events/s = {ratio:.2f}×; amid intact: "
                         f"{'yes' if intact else 'NO'}", _verdict(ratio >= target and intact)])
    return rows


def _lat(phase) -> str:
    return f"p50 {phase.lat(50):.2f} ms, p99 {phase.lat(99):.2f} ms"


def issue14_rows(e2e: dict) -> list[list[str]]:
    """Issue 14's targets, with Asterisk's write pattern (each event its own send)."""
    rows: list[list[str]] = []
    phases = {p.name: p for p in e2e["file"]["phases"]}
    p40 = phases.get("40,000/s paced")
    if p40:
        rows.append(["[14] one event per write, 40k events/s, file sink: CPU < 20% of one core",
                     f"{p40.core_share * 100:.1f}% ({p40.events_per_read:.0f} events/read; {_lat(p40)})",
                     _verdict(p40.core_share < 0.20 and p40.complete)])
    side = e2e.get("side_by_side")
    if side:
        amid = side["amid"]
        rows.append([f"[14] 1k events/s, one per write: amid run CPU ≤ {side['peer']} receive-only, side by side",
                     f"amid {amid.core_share * 100:.1f}% vs {side['peer']} {side['peer_share'] * 100:.1f}% "
                     f"({_lat(amid)})",
                     _verdict(amid.core_share <= side["peer_share"] and amid.complete)])
    every = {p.name: p for p in e2e["all"]["phases"]}.get("10,000/s paced")
    if every:
        rows.append(["[14] file + webhook + syslog (UDP) at 10k events/s: CPU < 25%, p99 < 5 ms",
                     f"{every.core_share * 100:.1f}%, {_lat(every)}",
                     _verdict(every.core_share < 0.25 and every.lat(99) < 5 and every.complete)])
    many = e2e.get("sessions")
    if many and many["phases"]:
        ph = many["phases"][0]
        hwm = many["hwm"] / 1024
        rows.append(["[14] 50 AMI sessions × 200 events/s: CPU < 30%, RSS < 150 MB",
                     f"{ph.core_share * 100:.1f}%, peak RSS {hwm:.0f} MiB ({_lat(ph)})",
                     _verdict(ph.core_share < 0.30 and hwm < 150 and ph.complete)])
    durable = e2e.get("durable")
    if durable:
        for ph in durable["phases"]:
            if ph.name.endswith("paced"):
                rows.append([f"[13] cost of the durable spool at {ph.name} (figure, no target)",
                             f"{ph.core_share * 100:.1f}% CPU, {ph.written / ph.seconds / 1e6:.1f} MB/s written, "
                             f"{_lat(ph)}", "n/a"])
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer repetitions and events (1–2 minutes)")
    p.add_argument("--only", default=",".join(ALL), help=f"comma-separated subset of {','.join(ALL)}")
    p.add_argument("--prototypes", action="store_true",
                   help="also measure the hot-path prototypes in benchmarks/prototypes.py")
    p.add_argument("--reps", type=int, default=None, help="repetitions (default 7, quick 3)")
    p.add_argument("--receive-source", choices=("sim", "replay"), default="sim",
                   help="receive benchmark source: amid's simulator or the s09a capture")
    p.add_argument("--output", type=Path, default=RESULTS_DIR / "latest.md")
    args = p.parse_args(argv)
    only = [x.strip() for x in args.only.split(",") if x.strip()]
    unknown = set(only) - set(ALL)
    if unknown:
        p.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    reps = args.reps or (3 if args.quick else 7)
    from amid import __version__

    started = time.perf_counter()
    sections = [f"## amid {__version__} benchmarks\n\nMachine: {machine_description()}. "
                f"Run: `python -m benchmarks.run{' --quick' if args.quick else ''}` on "
                f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Ratios matter more than "
                f"absolute figures (shared machine)."]
    summary: dict = {}
    if "parse" in only:
        print("parse ...", file=sys.stderr, flush=True)
        text, summary["parse"] = bench_parse.run(reps, with_prototypes=args.prototypes)
        sections.append("### 1. Parse: bytes → messages\n\n" + text)
    if "receive" in only:
        print("receive ...", file=sys.stderr, flush=True)
        events = 16_003 if args.receive_source == "replay" else (20_000 if args.quick else 40_000)
        if args.receive_source == "replay" and not args.quick:
            events = 48_009
        text, summary["receive"] = bench_receive.run(reps, events, mode=args.receive_source,
                                                     with_prototypes=args.prototypes)
        sections.append("### 2. Receive: socket → event handler\n\n" + text)
    if "e2e" in only:
        print("end to end ...", file=sys.stderr, flush=True)
        text, summary["e2e"] = bench_e2e.run(quick=args.quick)
        sections.append("### 3. End to end: AMI source → `amid run` → sinks\n\n" + text)
    if "tail" in only:
        print("tail ...", file=sys.stderr, flush=True)
        text, summary["tail"] = bench_tail.run(reps, 40_000 if args.quick else 100_000)
        sections.append("### 4. Tail: AMI source → a JSON-printing client → stdout pipe\n\n" + text)
    if "brokers" in only:
        print("brokers ...", file=sys.stderr, flush=True)
        text, summary["brokers"] = bench_brokers.run(quick=args.quick)
        sections.append("### 5. Broker sinks: amqp (RabbitMQ) and nats (JetStream), with confirms\n\n"
                        + text)
    from benchmarks.common import markdown_table
    rows = verdicts(summary)
    if summary.get("brokers"):
        rows += bench_brokers.verdicts(summary["brokers"])
    if rows:
        issues = "issues 5, 13, 14 and 17" if summary.get("brokers") else "issues 5, 13 and 14"
        sections.append(f"### Targets ({issues})\n\n"
                        + markdown_table(["target", "this run", "verdict"], rows))
    sections.append(f"_Total benchmark time {time.perf_counter() - started:.0f} s._")
    report = "\n\n".join(sections) + "\n"
    print(report)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report)
    print(f"written to {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
