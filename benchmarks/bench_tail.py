"""Tail: AMI source → a client printing every event as one JSON line → a pipe read by this process.

    python -m benchmarks.bench_tail [--quick] [--reps N] [--events N]

One source process (``ami_server sim``: login, FullyBooted, SuccessfulAuth, then N pre-built call
events flat out to every session). The contenders, each a fresh process per measurement with
its stdout a pipe that this process drains: the real ``amid tail --count N`` command, and the
same job done with panoramisk and with python-ami (``tail_clients.py``). This process reads the
pipe in 1 MiB reads and counts newlines; the clock runs from the read that brought the first
line to the read that brought the Nth, and the rate is the lines after that first read divided
by that time. The contender's CPU over the same window comes from ``/proc/<pid>/stat``.

Contenders alternate within each repetition (the order rotates); figures are medians with
min–max. The first repetition also keeps every byte and checks it: the number of lines, that
every line is a JSON object, and that each event's fields equal what the source sent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.bench_receive import source
from benchmarks.common import ROOT, Samples, markdown_table, proc_cpu_seconds, ratio_text

READ_SIZE = 1 << 20
TARGETS = {"panoramisk": 4.0, "python-ami": 2.0}  # issue 14: amid tail ≥ 4× / ≥ 2×


@dataclass(frozen=True)
class Contender:
    key: str
    label: str


CONTENDERS = (
    Contender("amid", "`amid tail` (record JSON, the CLI)"),
    Contender("panoramisk", "panoramisk 1.4 (`json.dumps(dict(event))`)"),
    Contender("python-ami", "asterisk-ami 0.1.7 (`json.dumps` of name + keys)"),
)


@dataclass
class Outcome:
    contender: Contender
    rate: Samples = field(default_factory=Samples)
    cpu_us: Samples = field(default_factory=Samples)  # contender CPU µs per event in the window
    lines: int | None = None
    json_ok: int | None = None
    checked: int | None = None
    intact: int | None = None
    first_difference: str | None = None
    error: str | None = None


def _command(key: str, port: int, secret_file: Path, count: int) -> list[str]:
    if key == "amid":
        script = Path(sys.executable).with_name("amid")  # the installed console script
        head = [str(script)] if script.exists() else [sys.executable, "-c",
                                                      "import sys; from amid.cli import main; sys.exit(main())"]
        return [*head, "tail", "--host", "127.0.0.1", "--port", str(port), "--username", "amid",
                "--secret-file", str(secret_file), "--count", str(count)]
    return [sys.executable, "-m", "benchmarks.tail_clients", key, "--port", str(port),
            "--secret-file", str(secret_file), "--count", str(count)]


def run_once(cmd: Sequence[str], count: int, *, keep: bool, timeout: float = 120.0) -> dict[str, Any]:
    """Start one contender, drain its stdout, time the first to the ``count``-th line."""
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err)
        assert proc.stdout is not None
        killer = threading.Timer(timeout, proc.kill)  # a stuck contender cannot hang the benchmark
        killer.start()
        fd = proc.stdout.fileno()
        lines = first_lines = 0
        t_first = t_last = cpu_first = cpu_last = None
        chunks: list[bytes] = []
        try:
            while data := os.read(fd, READ_SIZE):
                now = time.perf_counter()
                newlines = data.count(b"\n")
                if keep:
                    chunks.append(data)
                if not newlines:
                    continue
                lines += newlines
                if t_first is None:
                    t_first, first_lines = now, lines
                    cpu_first = _cpu(proc.pid)
                if t_last is None and lines >= count:
                    t_last, cpu_last = now, _cpu(proc.pid)
            code = proc.wait(timeout=10)
        finally:
            killer.cancel()
            proc.stdout.close()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        err.seek(0)
        stderr = err.read().decode(errors="replace").strip()
    result: dict[str, Any] = {"lines": lines, "exit": code, "output": b"".join(chunks) if keep else None}
    if t_first is None or t_last is None or t_last <= t_first:
        result["error"] = (f"printed {lines:,} of {count:,} lines, exit {code}"
                           + (f": {stderr[-300:]}" if stderr else ""))
        return result
    events = lines - first_lines if lines <= count else count - first_lines
    result["rate"] = events / (t_last - t_first)
    if cpu_first is not None and cpu_last is not None and events:
        result["cpu_us"] = (cpu_last - cpu_first) / events * 1e6
    return result


def _cpu(pid: int) -> float | None:
    try:
        return proc_cpu_seconds(pid)
    except (OSError, ValueError, IndexError):
        return None


def _canonical(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if not (k == "content" and v == "")}  # panoramisk's body key


def check_output(key: str, output: bytes, count: int, dump: Path) -> dict[str, Any]:
    """Lines, lines that are JSON objects, and events whose fields equal the bytes sent."""
    from amid.ami.protocol import Parser
    expected = [m.to_dict() for m in Parser(expect_banner=False).feed(dump.read_bytes())]
    lines = output.splitlines()
    parsed: list[dict[str, Any] | None] = []
    for line in lines:
        try:
            obj = json.loads(line)
        except ValueError:
            obj = None
        parsed.append(obj if isinstance(obj, dict) else None)
    json_ok = sum(obj is not None for obj in parsed)
    got = parsed[len(parsed) - len(expected):] if len(parsed) >= len(expected) else parsed
    intact = 0
    first_difference = None
    for want, obj in zip(expected, got, strict=False):
        fields = None if obj is None else _canonical(obj["fields"] if key == "amid" else obj)
        if fields == want:
            intact += 1
        elif first_difference is None:
            keys = [k for k in {**want, **(fields or {})} if want.get(k) != (fields or {}).get(k)]
            first_difference = "; ".join(f"`{k}` sent {want.get(k)!r}, printed {(fields or {}).get(k)!r}"
                                         for k in keys[:2]) or "not a JSON object"
    return {"lines": len(lines), "json_ok": json_ok, "checked": len(expected), "intact": intact,
            "first_difference": first_difference}


def measure(contenders: Sequence[Contender], *, events: int, reps: int) -> tuple[list[Outcome], int, tuple]:
    count = events + 2  # the simulator sends FullyBooted and SuccessfulAuth before the stream
    outcomes = [Outcome(c) for c in contenders]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="amid-bench-tail-") as tmp:
        dump, secret = Path(tmp) / "stream.raw", Path(tmp) / "secret"
        secret.write_text("amidsecret\n")
        with source("sim", events, dump) as port:
            for rep in range(reps):
                shift = rep % len(outcomes)
                for out in outcomes[shift:] + outcomes[:shift]:
                    if out.error:
                        continue
                    result = run_once(_command(out.contender.key, port, secret, count), count, keep=rep == 0)
                    if "error" in result:
                        out.error = result["error"]
                        continue
                    out.rate.add(result["rate"])
                    if "cpu_us" in result:
                        out.cpu_us.add(result["cpu_us"])
                    if rep == 0:
                        check = check_output(out.contender.key, result["output"], count, dump)
                        out.lines, out.json_ok = check["lines"], check["json_ok"]
                        out.checked, out.intact = check["checked"], check["intact"]
                        out.first_difference = check["first_difference"]
    return outcomes, count, (load_before, os.getloadavg())


def run(reps: int, events: int) -> tuple[str, dict[str, Any]]:
    outcomes, count, (load_before, load_after) = measure(CONTENDERS, events=events, reps=reps)
    by_key = {o.contender.key: o for o in outcomes}
    amid = by_key["amid"]
    rows = []
    for o in outcomes:
        if o.error:
            rows.append([o.contender.label, "—", "—", "—", f"**failed**: {o.error}"])
            continue
        printed = (f"{o.lines:,}/{count:,} lines, {o.json_ok:,} JSON objects; intact {o.intact:,}/{o.checked:,}"
                   + (f" ({o.first_difference})" if o.first_difference else ""))
        rows.append([o.contender.label, o.rate.fmt(), o.cpu_us.fmt(digits=1),
                     ratio_text(amid.rate.median, o.rate.median) if not amid.error else "n/a", printed])
    verdict_lines = []
    summary: dict[str, Any] = {o.contender.key: {"rate": o.rate.median if not o.error else float("nan"),
                                                 "error": o.error, "lines": o.lines, "json_ok": o.json_ok,
                                                 "intact": o.intact, "checked": o.checked, "expect": count}
                               for o in outcomes}
    summary["load"] = (load_before, load_after)
    for peer, target in TARGETS.items():
        p = by_key[peer]
        if amid.error or p.error:
            verdict_lines.append(f"* amid tail ≥ {target:g}× {peer}: n/a ({amid.error or p.error})")
            continue
        ratio = amid.rate.median / p.rate.median
        lo, hi = amid.rate.lo / p.rate.hi, amid.rate.hi / p.rate.lo
        cpu = p.cpu_us.median / amid.cpu_us.median if amid.cpu_us.values and p.cpu_us.values else float("nan")
        verdict_lines.append(f"* amid tail ≥ {target:g}× {peer}: {ratio:.2f}× (extremes {lo:.2f}–{hi:.2f}×) → "
                             f"{'**met**' if ratio >= target and tail_intact(summary) else '**not met**'}; "
                             f"CPU per event {cpu:.1f}× less")
    text = (f"Source: amid's simulator (separate process) streaming {events:,} pre-built call events flat "
            f"out after login (+ FullyBooted, SuccessfulAuth: {count:,} lines). Each contender is a fresh "
            f"process printing one JSON object per event to a pipe drained by the benchmark; timed from the "
            f"read that brought the first line to the read that brought line {count:,}. {reps} alternating "
            f"repetitions; events/s median (min–max); contender CPU µs per event over the same window. Load "
            f"average {load_before[0]:.2f} before, {load_after[0]:.2f} after (1 min).\n\n"
            + markdown_table(["client", "events/s", "CPU µs/event", "amid tail is ×",
                              "printed (first repetition)"], rows)
            + "\n\n" + "\n".join(verdict_lines))
    return text, summary


def tail_intact(summary: dict[str, Any]) -> bool:
    """amid printed exactly the expected lines, every one a JSON object, every event intact."""
    a = summary.get("amid", {})
    return bool(a.get("lines") == a.get("expect") == a.get("json_ok") and a.get("intact") == a.get("checked"))


def main(argv: list[str] | None = None) -> int:
    import argparse
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer repetitions and events")
    p.add_argument("--reps", type=int, default=None, help="repetitions (default 7, quick 3)")
    p.add_argument("--events", type=int, default=None, help="events per run (default 100,000, quick 40,000)")
    args = p.parse_args(argv)
    reps = args.reps or (3 if args.quick else 7)
    events = args.events or (40_000 if args.quick else 100_000)
    text, _ = run(reps, events)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
