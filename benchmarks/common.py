"""Shared helpers for the benchmarks: streams, statistics, tables, machine description."""

from __future__ import annotations

import os
import platform
import re
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
S09A = FIXTURES / "s09a_burst200_listener.raw"
RESULTS_DIR = ROOT / "benchmarks" / "results"


# ---------------------------------------------------------------------------------- streams

def s09a_messages() -> list[bytes]:
    """The raw messages of the s09a capture (16,003 events + 2 responses), without the banner,
    each including its terminating blank line, exactly as they came off the wire."""
    data = S09A.read_bytes()
    body = data[data.index(b"\n") + 1:]
    parts = body.split(b"\r\n\r\n")
    assert parts[-1] == b"", "capture must end on a message boundary"
    return [p + b"\r\n\r\n" for p in parts[:-1]]


def s09a_events() -> list[bytes]:
    """Only the events of s09a (no login response, no Logoff answer)."""
    return [m for m in s09a_messages() if m.startswith(b"Event:")]


_CHANNEL_VARS = (b"ChanVariable: CDR(accountcode)=acme\r\nChanVariable: SIPCALLID=a84b4c76e66710"
                 b"@pbx.example.net\r\n")


_LINKEDID = re.compile(rb"Linkedid: [^\r]*\r\n")


def with_channel_vars(messages: Sequence[bytes]) -> list[bytes]:
    """The same messages as Asterisk sends them with ``channelvars=`` set in manager.conf: two
    ``ChanVariable`` lines after each channel snapshot (after its ``Linkedid`` line). This gives
    the stream the repeated keys a lossless parser must keep."""
    out = []
    for raw in messages:
        out.append(_LINKEDID.sub(lambda m: m.group(0) + _CHANNEL_VARS, raw))
    return out


# ---------------------------------------------------------------------------------- statistics

@dataclass
class Samples:
    """Repeated measurements of one quantity (higher or lower is better, as the caller knows)."""

    values: list[float] = field(default_factory=list)

    def add(self, value: float) -> None:
        self.values.append(value)

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")

    @property
    def lo(self) -> float:
        return min(self.values) if self.values else float("nan")

    @property
    def hi(self) -> float:
        return max(self.values) if self.values else float("nan")

    def fmt(self, scale: float = 1.0, digits: int = 0) -> str:
        """``median (min–max)``, each multiplied by ``scale``."""
        if not self.values:
            return "n/a"
        return (f"{self.median * scale:,.{digits}f} "
                f"({self.lo * scale:,.{digits}f}–{self.hi * scale:,.{digits}f})")


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (q in 0..100)."""
    if not sorted_values:
        return float("nan")
    rank = max(0, min(len(sorted_values) - 1, round(q / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[rank]


def ratio_text(ours: float, theirs: float) -> str:
    if not theirs or theirs != theirs or ours != ours:
        return "n/a"
    return f"{ours / theirs:.2f}×"


# ---------------------------------------------------------------------------------- output

def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_description() -> str:
    """CPU model, cores, kernel and Python, for the results table."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mhz = ""
    try:
        found = re.search(r"cpu MHz\s*:\s*([\d.]+)", Path("/proc/cpuinfo").read_text())
        if found:
            mhz = f" @ {float(found.group(1)):.0f} MHz"
    except OSError:
        pass
    cores = os.cpu_count()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = cores
    return (f"{model}{mhz}, {cores} logical cores ({usable} usable), Linux {platform.release()}, "
            f"{platform.python_implementation()} {platform.python_version()}")


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/<pid>/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def proc_written_bytes(pid: int) -> int:
    """Bytes the process handed to write()-like calls so far (``wchar`` of /proc/<pid>/io)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    return 0


def proc_status_kib(pid: int, key: str) -> int:
    """A ``kB`` value from /proc/<pid>/status (``VmRSS``, ``VmHWM``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def python_for_subprocess() -> list[str]:
    """The interpreter running the benchmark, unbuffered, for child processes."""
    return [sys.executable, "-u"]
