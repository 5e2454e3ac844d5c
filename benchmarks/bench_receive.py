"""Benchmark 2, receive: socket -> event handler, amid's session vs peer libraries.

The AMI source (amid's simulator, or the s09a replay) runs in its own process, so it does not
share the client's event loop. Each measurement is a fresh client process (imports, threads and
reconnect timers of one library cannot affect the next). Contenders alternate within every
repetition. Before timing, each library gets one verifying run whose delivered events are
compared field by field with the bytes the server sent.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.common import ROOT, Samples, markdown_table, python_for_subprocess, ratio_text


@dataclass
class Lib:
    key: str          # receive_client's name for it
    label: str
    note: str = ""


LIBS = [
    Lib("amid", "amid AMIClient, listener (reads a field)"),
    Lib("amid-lazy", "amid AMIClient, listener (name only: fields never decoded)"),
    Lib("amid-handler", "amid AMIClient, add_event_handler('*') (reads a field)"),
    Lib("amid-uvloop", "amid AMIClient + uvloop, listener (reads a field)"),
    Lib("panoramisk", "panoramisk 1.4 (asyncio)"),
    Lib("python-ami", "asterisk-ami 0.1.7 / python-ami (thread, blocking socket)"),
    Lib("basicami", "basicami 0.1.0 (asyncio streams, get_events)"),
]
PROTO = Lib("amid-proto", "prototype: amid + C-level framing + raw-bytes get (reads a field)")


@dataclass
class Outcome:
    lib: Lib
    seconds: Samples = field(default_factory=Samples)
    cpu: Samples = field(default_factory=Samples)
    delivered: int | None = None
    checked: int | None = None
    intact: int | None = None
    difference: dict | None = None
    error: str | None = None


@contextlib.contextmanager
def source(mode: str, events: int, dump: Path) -> Iterator[int]:
    """Start the AMI source process; yield its port; stop it (stdin closed, then terminate)."""
    cmd = [*python_for_subprocess(), "-m", "benchmarks.ami_server", mode, "--dump", str(dump)]
    cmd += ["--events", str(events)] if mode == "sim" else ["--repeat", str(max(1, events // 16003))]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().split()
        if not line or line[0] != "port":
            raise RuntimeError(f"AMI source did not start: {line}")
        yield int(line[1])
    finally:
        proc.stdin.close()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.terminate()
            proc.wait(5)


def _client(lib: Lib, port: int, expect: int, verify: Path | None, timeout: float) -> dict:
    cmd = [*python_for_subprocess(), "-m", "benchmarks.receive_client", lib.key, "--port", str(port),
           "--expect", str(expect)]
    if verify is not None:
        cmd += ["--verify", str(verify)]
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"no result within {timeout:.0f}s"}
    lines = done.stdout.strip().splitlines()
    if not lines:
        return {"error": f"client exited {done.returncode}: {done.stderr.strip()[-300:]}"}
    return json.loads(lines[-1])


def measure(libs: Sequence[Lib], *, mode: str, events: int, reps: int) -> tuple[list[Outcome], int]:
    """Run every library ``reps`` times (alternating) against one source process."""
    with tempfile.TemporaryDirectory(prefix="amid-bench-") as tmp:
        dump = Path(tmp) / "stream.raw"
        # The simulator sends FullyBooted and SuccessfulAuth before the stream.
        expect = events + 2 if mode == "sim" else (max(1, events // 16003)) * 16003
        outcomes = [Outcome(lib) for lib in libs]
        with source(mode, events, dump) as port:
            for out in outcomes:
                result = _client(out.lib, port, expect, dump, timeout=120)
                if "error" in result:
                    out.error = result["error"]
                    continue
                out.delivered, out.checked = result["delivered"], result["checked"]
                out.intact, out.difference = result["intact"], result.get("first_difference")
            for rep in range(reps):
                shift = rep % len(outcomes)
                for out in outcomes[shift:] + outcomes[:shift]:
                    if out.error:
                        continue
                    result = _client(out.lib, port, expect, None, timeout=60)
                    if "error" in result:
                        out.error = result["error"]
                        continue
                    out.seconds.add(result["seconds"])
                    out.cpu.add(result["cpu"])
        return outcomes, expect


def _diff_note(diff: dict | None) -> str:
    if not diff:
        return ""
    expected, got = diff["expected"], diff["got"]
    keys = [k for k in {**expected, **got} if expected.get(k) != got.get(k)]
    parts = []
    for key in keys[:2]:
        parts.append(f"`{key}` sent {expected.get(key)!r}, delivered {got.get(key)!r}")
    return "; ".join(parts)


def run(reps: int, events: int, *, mode: str = "sim", with_prototypes: bool = False) -> tuple[str, dict]:
    libs = LIBS + ([PROTO] if with_prototypes else [])
    outcomes, expect = measure(libs, mode=mode, events=events, reps=reps)
    by_key = {o.lib.key: o for o in outcomes}

    def rate(o: Outcome) -> float:
        return expect / o.seconds.median if o.seconds.values else float("nan")

    rows = []
    for o in outcomes:
        if o.error:
            rows.append([o.lib.label, "—", "—", "—", "—", f"**failed**: {o.error}"])
            continue
        rates = Samples([expect / s for s in o.seconds.values])
        intact = f"{o.intact:,}/{o.checked:,}"
        check = (f"delivered {o.delivered:,}/{expect:,}; intact {intact}"
                 + (f" ({_diff_note(o.difference)})" if o.difference else ""))
        rows.append([o.lib.label, rates.fmt(), f"{o.cpu.median / expect * 1e6:.1f}",
                     ratio_text(rate(by_key["amid"]), rate(o)) if "amid" in by_key else "n/a",
                     ratio_text(rate(by_key["amid-lazy"]), rate(o)) if "amid-lazy" in by_key else "n/a",
                     check])
    source_text = (f"amid's simulator (separate process) streaming {events:,} pre-built call events "
                   f"after login (+ FullyBooted, SuccessfulAuth)" if mode == "sim" else
                   f"the s09a capture's events replayed after login ({expect:,} events)")
    text = (f"Source: {source_text}; each handler reads the event name and `Uniqueid` and counts. "
            f"{reps} alternating repetitions, each in a fresh client process; events/s median "
            f"(min–max); CPU µs per event (client process, all threads):\n\n"
            + markdown_table(["client", "events/s", "CPU µs/event", "amid (field) is ×",
                              "amid (lazy) is ×", "every event delivered intact?"], rows))
    summary = {o.lib.key: {"rate": rate(o), "error": o.error, "intact": o.intact, "checked": o.checked,
                           "delivered": o.delivered, "expect": expect} for o in outcomes}
    return text, summary


if __name__ == "__main__":
    import sys
    text, _ = run(3, 40_000, with_prototypes="--prototypes" in sys.argv)
    print(text)
