"""Benchmark 3, end to end: AMI source process -> ``amid run`` (its own process) -> sinks.

* The source (benchmarks.ami_server ``paced``) sends amid's pre-built call events at a fixed rate
  the way Asterisk writes them (each event its own ``send()``, TCP_NODELAY, at its own moment,
  stamped with a ``BenchSent`` field) or, flat out, as fast as the socket takes them.
* ``amid run`` gets a generated config: one server, a JSONL file sink (and, in the all-sinks
  scenario, a webhook to a local aiohttp receiver and RFC 5424 syslog over UDP to a local
  listener, both in benchmarks.sink_peers, another process).
* A tailer thread in this process is woken by inotify whenever the JSONL file grows; for every
  new line, latency = the moment the line was seen written − the event's ``BenchSent`` (when the
  source wrote it; flat out, the record's ``received_at``, when amid read it). Both are the same
  machine's wall clock. Each paced phase also reports amid's socket reads per second and events
  per read (``amid_ami_reads_total``): the per-read cost is what Asterisk's write pattern exposes.
* CPU seconds come from /proc/<pid>/stat (utime+stime) of the amid process; RSS and peak RSS from
  VmRSS / VmHWM in /proc/<pid>/status.
"""

from __future__ import annotations

import calendar
import contextlib
import ctypes
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from benchmarks.common import (
    ROOT,
    markdown_table,
    percentile,
    proc_cpu_seconds,
    proc_status_kib,
    proc_written_bytes,
    python_for_subprocess,
    s09a_messages,
)

IN_MODIFY = 0x00000002
_RECEIVED_AT = b'"received_at":"'


# ------------------------------------------------------------------------------ the tailer

_BENCH_SENT = b'"BenchSent":"'


class Tailer(threading.Thread):
    """Follows a JSONL file (inotify wake-ups), timestamps every new line as it appears."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True, name="jsonl-tailer")
        self.path = path
        self.lines = 0
        self.latencies: list[float] = []
        self.last_seen = 0.0
        self._stopping = threading.Event()
        self._seconds_cache: dict[bytes, int] = {}
        libc = ctypes.CDLL(None, use_errno=True)
        self._fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self._fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        if libc.inotify_add_watch(self._fd, str(path).encode(), IN_MODIFY) < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch({path}) failed")

    def _received_at(self, line: bytes) -> float | None:
        """When the event left the source (its ``BenchSent`` field, per-event source), else
        when amid read it: with Asterisk-like writes the latency includes any time the event
        waited in amid's socket buffer."""
        sent = line.find(_BENCH_SENT)
        if sent >= 0:
            end = line.find(b'"', sent + len(_BENCH_SENT))
            return float(line[sent + len(_BENCH_SENT):end])
        at = line.find(_RECEIVED_AT)
        if at < 0:
            return None
        stamp = line[at + len(_RECEIVED_AT):at + len(_RECEIVED_AT) + 26]  # 2026-11-28T03:21:41.214512
        base = stamp[:19]
        secs = self._seconds_cache.get(base)
        if secs is None:
            secs = calendar.timegm(time.strptime(base.decode(), "%Y-%m-%dT%H:%M:%S"))
            self._seconds_cache[base] = secs
        return secs + int(stamp[20:26]) / 1e6

    def run(self) -> None:
        with self.path.open("rb") as f:
            pending = b""
            while not self._stopping.is_set():
                ready, _, _ = select.select([self._fd], [], [], 0.05)
                if ready:
                    with contextlib.suppress(BlockingIOError):
                        while os.read(self._fd, 65536):
                            pass
                chunk = f.read()
                if not chunk:
                    continue
                now = time.time()
                data = pending + chunk
                lines = data.split(b"\n")
                pending = lines.pop()
                for line in lines:
                    received = self._received_at(line)
                    if received is not None:
                        self.latencies.append(now - received)
                self.lines += len(lines)
                self.last_seen = now

    def wait_for(self, lines: int, timeout: float, stall: float = 3.0) -> bool:
        """Wait until ``lines`` lines were seen; False after ``timeout``, or when no line came
        for ``stall`` seconds (events dropped by amid never arrive)."""
        deadline = time.monotonic() + timeout
        last, last_change = self.lines, time.monotonic()
        while self.lines < lines:
            now = time.monotonic()
            if self.lines != last:
                last, last_change = self.lines, now
            if now > deadline or now - last_change > stall:
                return False
            time.sleep(0.002)
        return True

    def take_latencies(self) -> list[float]:
        out, self.latencies = self.latencies, []
        return out

    def stop(self) -> None:
        self._stopping.set()
        self.join(2)
        os.close(self._fd)


# ------------------------------------------------------------------------------ processes


SETTLE_SECONDS = 6.0  # longer than the daemon's 5 s status tick, which releases freed memory

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Source:
    """The paced AMI source process."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([*python_for_subprocess(), "-m", "benchmarks.ami_server", "paced"],
                                     cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().split()
        if not line or line[0] != "port":
            raise RuntimeError(f"AMI source did not start: {line}")
        self.port = int(line[1])

    def _ask(self, command: str) -> list[str]:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().split()

    def wait_sessions(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while int(self._ask("sessions")[1]) < n:
            if time.monotonic() > deadline:
                raise RuntimeError("amid did not log in to the AMI source")
            time.sleep(0.05)

    def stream(self, rate: float, count: int) -> float:
        """Send ``count`` events at ``rate``/s (0: flat out); returns the seconds it took."""
        reply = self._ask(f"stream {rate} {count}")
        return float(reply[2])

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            self.proc.wait(5)


class SinkPeers:
    def __init__(self) -> None:
        self.proc = subprocess.Popen([*python_for_subprocess(), "-m", "benchmarks.sink_peers"], cwd=ROOT,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.webhook_port = int(self.proc.stdout.readline().split()[1])
        self.syslog_port = int(self.proc.stdout.readline().split()[1])

    def counts(self) -> tuple[int, int]:
        self.proc.stdin.write("stats\n")
        self.proc.stdin.flush()
        _, hooks, syslog = self.proc.stdout.readline().split()
        return int(hooks), int(syslog)

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.terminate()


def _amid_command() -> list[str]:
    script = Path(sys.executable).parent / "amid"
    profile = os.environ.get("BENCH_PROFILE_AMID")
    if profile and script.exists():
        # cProfile of the daemon (written when it exits on SIGTERM): see README, "Profiling".
        return [sys.executable, "-m", "cProfile", "-o", profile, str(script)]
    if script.exists():
        return [str(script)]
    found = shutil.which("amid")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from amid.cli import main; sys.exit(main())"]


@contextlib.contextmanager
def amid_daemon(workdir: Path, config: dict, env: dict[str, str] | None = None
                ) -> Iterator[subprocess.Popen]:
    path = workdir / "amid.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    log = (workdir / "amid.log").open("wb")
    proc = subprocess.Popen([*_amid_command(), "run", "--config", str(path), "--log-level", "warning"],
                            cwd=workdir, stdout=log, stderr=subprocess.STDOUT,
                            env=None if env is None else {**os.environ, **env})
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        if proc.returncode not in (0, -15):
            print(f"amid exited {proc.returncode}; log tail:\n"
                  + (workdir / "amid.log").read_text()[-2000:], file=sys.stderr)


def _config(workdir: Path, ami_port: int, http_port: int, sinks: list[dict], sessions: int = 1) -> dict:
    names = ["bench"] if sessions == 1 else [f"pbx{n}" for n in range(1, sessions + 1)]
    return {
        "servers": [{"name": name, "host": "127.0.0.1", "port": ami_port, "username": "amid",
                     "secret": "amidsecret", "auth": "plain", "ping_interval": "20s"}
                    for name in names],
        "sinks": sinks,
        "http": {"listen": f"127.0.0.1:{http_port}"},
        "state_dir": str(workdir / "state"),
        "shutdown_timeout": "5s",
        "log": {"level": "warning"},
    }


def _file_sink(path: Path, overflow: str = "drop_oldest") -> dict:
    # A file write is one syscall: waiting to fill a batch only adds latency (see README).
    return {"name": "jsonl", "type": "file", "path": str(path), "overflow": overflow,
            "batch": {"max_events": 500, "max_wait": 0}}


def _wait_file(path: Path, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            log = (path.parent / "amid.log").read_text()[-2000:]
            raise RuntimeError(f"amid exited with {proc.returncode} before opening {path}:\n{log}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"amid did not create {path}")
        time.sleep(0.02)


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return resp.read().decode()


def _metric(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


# ------------------------------------------------------------------------------ scenarios

@dataclass
class Phase:
    name: str
    events: int
    seconds: float
    cpu: float
    latencies: list[float] = field(default_factory=list)
    complete: bool = True
    extra: str = ""
    reads: float = float("nan")  # AMI socket reads amid made during the phase
    written: int = 0             # bytes amid wrote (files, spool, sockets) during the phase

    @property
    def reads_per_second(self) -> float:
        return self.reads / self.seconds if self.seconds else float("nan")

    @property
    def events_per_read(self) -> float:
        return self.events / self.reads if self.reads else float("nan")

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds else float("nan")

    @property
    def core_share(self) -> float:
        return self.cpu / self.seconds if self.seconds else float("nan")

    def lat(self, q: float) -> float:
        return percentile(sorted(self.latencies), q) * 1000


def _reads(http_port: int | None) -> float:
    """AMI socket reads so far, summed over every server."""
    if http_port is None:
        return float("nan")
    return sum(float(line.rsplit(" ", 1)[1]) for line in _metrics(http_port).splitlines()
               if line.startswith("amid_ami_reads_total{"))


def _run_phase(name: str, source: Source, tailer: Tailer, pid: int, rate: float, count: int,
               timeout: float, http_port: int | None = None, sessions: int = 1) -> Phase:
    """``count`` events at ``rate``/s to each of ``sessions`` sessions."""
    target = tailer.lines + count * sessions
    tailer.take_latencies()
    reads0 = _reads(http_port)
    wrote0 = proc_written_bytes(pid)
    cpu0, t0 = proc_cpu_seconds(pid), time.time()
    source.stream(rate, count)
    count *= sessions
    start_lines = target - count
    complete = tailer.wait_for(target, timeout)
    t1 = tailer.last_seen
    cpu1 = proc_cpu_seconds(pid)
    written = tailer.lines - start_lines
    return Phase(name, written, t1 - t0, cpu1 - cpu0, tailer.take_latencies(), complete,
                 "" if complete else f"{count - written:,} of {count:,} events never written",
                 _reads(http_port) - reads0, proc_written_bytes(pid) - wrote0)


def _floor_rate() -> float:
    """The floor parser's messages/s on the s09a capture, measured here and now (best of 3)."""
    from benchmarks.bench_parse import _chunks, floor_parse
    messages = s09a_messages()
    chunks = _chunks(messages)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        floor_parse(chunks)
        best = min(best, time.perf_counter() - t0)
    return len(messages) / best


def run_scenario(*, all_sinks: bool, rates: list[int], seconds: float, flat_out: int,
                 env: dict[str, str] | None = None, flat_out_reps: int = 1,
                 overflow: str = "drop_oldest", sessions: int = 1) -> dict:
    """One amid process (``env`` added to its environment), the phases run one after the
    other against it. The flat-out phase runs ``flat_out_reps`` times, alternating with the
    floor parser measured in this process (a shared machine's speed drifts: the ratio of two
    figures is only fair when they are taken side by side); the median run is kept."""
    with tempfile.TemporaryDirectory(prefix="amid-e2e-") as tmp:
        workdir = Path(tmp)
        jsonl = workdir / "events.jsonl"
        source = Source()
        peers = SinkPeers() if all_sinks else None
        http_port = _free_port()
        sinks = [_file_sink(jsonl, overflow)]
        if peers is not None:
            sinks += [{"name": "hook", "type": "webhook", "url": f"http://127.0.0.1:{peers.webhook_port}/events",
                       "overflow": "drop_oldest"},
                      {"name": "syslog", "type": "syslog", "address": f"udp://127.0.0.1:{peers.syslog_port}",
                       "overflow": "drop_oldest"}]
        phases: list[Phase] = []
        try:
            with amid_daemon(workdir, _config(workdir, source.port, http_port, sinks, sessions),
                             env) as proc:
                _wait_file(jsonl, proc, 20)
                source.wait_sessions(sessions, 20)
                tailer = Tailer(jsonl)
                tailer.start()
                try:
                    # Warm-up: imports, first JSON encoding, allocator.
                    _run_phase("warm-up", source, tailer, proc.pid, 5000 // sessions,
                               max(2000 // sessions, 100), 30, sessions=sessions)
                    rss_idle = proc_status_kib(proc.pid, "VmRSS")
                    for rate in rates:
                        label = (f"{rate:,}/s paced" if sessions == 1
                                 else f"{sessions} sessions × {rate:,}/s paced")
                        phases.append(_run_phase(label, source, tailer, proc.pid, rate,
                                                 int(rate * seconds), 30 + seconds * 3, http_port,
                                                 sessions))
                    runs, floors = [], []
                    for _ in range(flat_out_reps if flat_out else 0):
                        floors.append(_floor_rate())
                        runs.append(_run_phase("flat out", source, tailer, proc.pid, 0, flat_out, 120,
                                               http_port))
                    if runs:
                        floors.append(_floor_rate())
                        runs.sort(key=lambda phase: phase.rate)
                        phases.append(runs[len(runs) // 2])
                    rss_steady = proc_status_kib(proc.pid, "VmRSS")
                    hwm = proc_status_kib(proc.pid, "VmHWM")
                    # amid gives memory back once its queues are empty (checked every 5 s).
                    time.sleep(SETTLE_SECONDS)
                    rss_settled = proc_status_kib(proc.pid, "VmRSS")
                    delivered = None
                    if peers is not None:
                        time.sleep(0.5)  # webhook batches wait up to max_wait before they leave
                        total = tailer.lines
                        hooks, syslog = peers.counts()
                        delivered = (total, hooks, syslog)
                finally:
                    tailer.stop()
        finally:
            source.close()
            if peers is not None:
                peers.close()
    return {"phases": phases, "rss_idle": rss_idle, "rss_steady": rss_steady, "hwm": hwm,
            "rss_settled": rss_settled, "delivered": delivered,
            "flat_out_rates": [phase.rate for phase in runs], "floor_rates": floors}


def run_side_by_side(rate: int, seconds: float, peer: str = "panoramisk") -> dict:
    """amid run (file sink) and a receive-only ``peer`` client (benchmarks.receive_client: reads
    each event's name and Uniqueid, nothing else) on the same Asterisk-like stream at the same
    time; the CPU of each process over the same phase, measured the same way (/proc)."""
    with tempfile.TemporaryDirectory(prefix="amid-e2e-") as tmp:
        workdir = Path(tmp)
        jsonl = workdir / "events.jsonl"
        source = Source()
        http_port = _free_port()
        try:
            with amid_daemon(workdir, _config(workdir, source.port, http_port, [_file_sink(jsonl)]),
                             None) as proc:
                _wait_file(jsonl, proc, 20)
                source.wait_sessions(1, 20)
                client = subprocess.Popen(
                    [*python_for_subprocess(), "-m", "benchmarks.receive_client", peer,
                     "--port", str(source.port), "--expect", str(10**9)],
                    cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                try:
                    source.wait_sessions(2, 20)
                    tailer = Tailer(jsonl)
                    tailer.start()
                    try:
                        _run_phase("warm-up", source, tailer, proc.pid, 5000, 2000, 30)
                        peer_cpu0 = proc_cpu_seconds(client.pid)
                        phase = _run_phase(f"{rate:,}/s paced", source, tailer, proc.pid, rate,
                                           int(rate * seconds), 30 + seconds * 3, http_port)
                        peer_cpu = proc_cpu_seconds(client.pid) - peer_cpu0
                    finally:
                        tailer.stop()
                finally:
                    client.kill()
                    client.wait(5)
        finally:
            source.close()
    return {"amid": phase, "peer": peer, "peer_share": peer_cpu / phase.seconds,
            "peer_us_per_event": peer_cpu / phase.events * 1e6}


def run_outage(events: int, max_events: int, max_bytes: int) -> dict:
    """Webhook receiver down (nothing listens) while a file sink keeps working: RSS must stop
    growing once the webhook's queue is at its bounds."""
    with tempfile.TemporaryDirectory(prefix="amid-outage-") as tmp:
        workdir = Path(tmp)
        jsonl = workdir / "events.jsonl"
        source = Source()
        http_port = _free_port()
        sinks = [_file_sink(jsonl),
                 {"name": "hook", "type": "webhook", "url": f"http://127.0.0.1:{_free_port()}/events",
                  "overflow": "drop_oldest", "queue": {"max_events": max_events, "max_bytes": max_bytes},
                  "retry": {"min_delay": "200ms", "max_delay": "1s"}, "connect_timeout": "1s"}]
        samples: list[tuple[int, int]] = []  # (lines written, VmRSS KiB)
        try:
            with amid_daemon(workdir, _config(workdir, source.port, http_port, sinks)) as proc:
                _wait_file(jsonl, proc, 20)
                source.wait_sessions(1, 20)
                tailer = Tailer(jsonl)
                tailer.start()
                try:
                    _run_phase("warm-up", source, tailer, proc.pid, 5000, 2000, 30)
                    rss_before = proc_status_kib(proc.pid, "VmRSS")
                    start_lines = tailer.lines
                    done = threading.Event()

                    def sample() -> None:
                        while not done.is_set():
                            samples.append((tailer.lines - start_lines, proc_status_kib(proc.pid, "VmRSS")))
                            time.sleep(0.05)
                    sampler = threading.Thread(target=sample, daemon=True)
                    sampler.start()
                    # Two halves, so "no growth past the bounds" is a comparison, not a guess.
                    source.stream(0, events // 2)
                    tailer.wait_for(start_lines + events // 2, 120)
                    rss_half = proc_status_kib(proc.pid, "VmRSS")
                    half_mark = len(samples)
                    source.stream(0, events - events // 2)
                    complete = tailer.wait_for(start_lines + events, 120)
                    rss_end = proc_status_kib(proc.pid, "VmRSS")
                    done.set()
                    sampler.join()
                    text = _metrics(http_port)
                finally:
                    tailer.stop()
                hwm = proc_status_kib(proc.pid, "VmHWM")
        finally:
            source.close()
    first, second = samples[:half_mark], samples[half_mark:]
    return {"events": events, "complete": complete, "rss_before": rss_before, "rss_half": rss_half,
            "rss_end": rss_end, "hwm": hwm, "peak_sampled": max(r for _, r in samples) if samples else None,
            # Peak of each half: with bounded queues the second half peaks no higher than the first.
            "peak_first": max((r for _, r in first), default=rss_half),
            "peak_second": max((r for _, r in second), default=rss_end),
            "queue_events": _metric(text, "amid_sink_queue_events", sink="hook"),
            "queue_bytes": _metric(text, "amid_sink_queue_bytes", sink="hook"),
            "dropped": _metric(text, "amid_sink_dropped_events_total", sink="hook", reason="queue_full"),
            "max_events": max_events, "max_bytes": max_bytes}


# ------------------------------------------------------------------------------ report

def _phase_rows(phases: list[Phase]) -> list[list[str]]:
    rows = []
    for p in phases:
        rows.append([p.name, f"{p.events:,}", f"{p.rate:,.0f}" + ("" if p.complete else f" ({p.extra}!)"),
                     f"{p.reads_per_second:,.0f}", f"{p.events_per_read:.1f}",
                     f"{p.core_share * 100:.0f}%", f"{p.cpu / p.events * 100_000:.2f}",
                     f"{p.written / p.seconds / 1e6:.1f}" if p.seconds else "",
                     f"{p.lat(50):.2f}", f"{p.lat(99):.2f}", f"{p.lat(100):.1f}"])
    return rows


HEADER = ["phase", "events", "events/s written", "reads/s", "events/read", "amid CPU (of one core)",
          "CPU s / 100k events", "MB/s written",
          "p50 ms", "p99 ms", "max ms"]


def run(quick: bool) -> tuple[str, dict]:
    seconds = 1.0 if quick else 3.0
    # Flat out, amid's queue absorbs what it cannot write yet: stay under the default queue
    # bound (100,000 events), or drop_oldest drops and the phase shows it.
    flat_out = 50_000 if quick else 80_000
    out = []
    file_only = run_scenario(all_sinks=False, rates=[1000, 10_000, 40_000], seconds=seconds,
                             flat_out=flat_out, flat_out_reps=3 if quick else 5)
    # The same daemon without its C accelerator: what a machine without a compiler gets.
    pure = run_scenario(all_sinks=False, rates=[], seconds=seconds, flat_out=flat_out,
                        env={"AMID_PURE_PYTHON": "1"})
    pure_flat = pure["phases"][-1]
    pure_flat.name = "flat out, pure Python (`AMID_PURE_PYTHON=1`)"
    out.append("**File sink only** (JSONL, `fsync: interval`, batch `max_wait: 0`); latency = line "
               "seen written − `received_at`:\n\n"
               + markdown_table(HEADER, _phase_rows(file_only["phases"] + [pure_flat]))
               + "\n\nFlat out ran " + str(len(file_only["flat_out_rates"])) + " times (the median run is "
                 "shown), alternating with the floor parser in the benchmark process: amid wrote "
               + ", ".join(f"{rate:,.0f}" for rate in file_only["flat_out_rates"]) + " events/s; the floor "
                 "parsed " + ", ".join(f"{rate:,.0f}" for rate in file_only["floor_rates"])
               + " messages/s."
               + f"\n\nRSS after warm-up {file_only['rss_idle'] / 1024:.0f} MiB, after all phases "
                 f"{file_only['rss_steady'] / 1024:.0f} MiB, {SETTLE_SECONDS:.0f} s later (queues empty) "
                 f"{file_only['rss_settled'] / 1024:.0f} MiB, peak (VmHWM) {file_only['hwm'] / 1024:.0f} MiB.")
    every = run_scenario(all_sinks=True, rates=[10_000], seconds=seconds, flat_out=flat_out // 2)
    total, hooks, syslog = every["delivered"]
    out.append("**File + webhook (local aiohttp receiver) + syslog (UDP, local listener)**, same method "
               "(latency is the file sink's):\n\n" + markdown_table(HEADER, _phase_rows(every["phases"]))
               + f"\n\nDelivered: file {total:,} lines, webhook {hooks:,} records, syslog {syslog:,} "
                 f"datagrams (UDP may drop under load; the sink counts what it sent). "
                 f"Peak RSS (VmHWM) {every['hwm'] / 1024:.0f} MiB.")
    durable = run_scenario(all_sinks=False, rates=[1000, 10_000, 40_000], seconds=seconds,
                           flat_out=flat_out // 2, overflow="spool")
    out.append("**Durable file sink** (`overflow: spool`: every record written ahead to the spool, "
               "read back by the sink's worker, acknowledged after the file write; same source):\n\n"
               + markdown_table(HEADER, _phase_rows(durable["phases"]))
               + f"\n\nPeak RSS (VmHWM) {durable['hwm'] / 1024:.0f} MiB. MB/s written counts the "
                 "spool and the file (the spool's bytes are about the file's again).")
    side = run_side_by_side(1000, seconds * 3)
    amid_phase = side["amid"]
    out.append(f"**1,000 events/s, one event per write, side by side**: amid run with a file sink used "
               f"{amid_phase.core_share * 100:.1f}% of a core ({amid_phase.cpu / amid_phase.events * 1e6:.0f} µs "
               f"per event, {amid_phase.events_per_read:.1f} events per read, p50 {amid_phase.lat(50):.2f} ms, "
               f"p99 {amid_phase.lat(99):.2f} ms); {side['peer']} receiving the same stream at the same time "
               f"(its handler reads a field, writes nothing) {side['peer_share'] * 100:.1f}% "
               f"({side['peer_us_per_event']:.0f} µs per event): amid / {side['peer']} = "
               f"{amid_phase.core_share / side['peer_share']:.2f} (target ≤ 1).")
    many = run_scenario(all_sinks=False, rates=[200], seconds=seconds * 2, flat_out=0, sessions=50)
    out.append("**50 AMI sessions** (one amid process, 50 servers on the source, each paced at "
               "200 events/s, one event per write; file sink):\n\n"
               + markdown_table(HEADER, _phase_rows(many["phases"]))
               + f"\n\nRSS after warm-up {many['rss_idle'] / 1024:.0f} MiB, peak (VmHWM) "
                 f"{many['hwm'] / 1024:.0f} MiB.")
    outage_events = 100_000 if quick else 200_000
    outage = run_outage(outage_events, max_events=20_000, max_bytes=16 * 1024 * 1024)
    out.append(
        f"**Sink outage**: webhook pointed at a port nobody listens on (queue bounds "
        f"{outage['max_events']:,} events / {outage['max_bytes'] // 1024**2} MiB, `drop_oldest`), file "
        f"sink working, {outage['events']:,} events flat out: VmRSS {outage['rss_before'] / 1024:.0f} MiB "
        f"before, {outage['rss_half'] / 1024:.0f} MiB after half, {outage['rss_end'] / 1024:.0f} MiB "
        f"at the end; peak while streaming the first half {outage['peak_first'] / 1024:.0f} MiB, the "
        f"second half {outage['peak_second'] / 1024:.0f} MiB (the working file sink's own queue fills "
        f"and drains within each half); webhook queue at the end "
        f"{outage['queue_events'] or 0:,.0f} events / {(outage['queue_bytes'] or 0) / 1024**2:.1f} MiB, "
        f"dropped (queue_full) {outage['dropped'] or 0:,.0f}.")
    return "\n\n".join(out), {"file": file_only, "pure": pure, "all": every, "outage": outage,
                              "durable": durable, "sessions": many, "side_by_side": side}


if __name__ == "__main__":
    text, _ = run(quick="--quick" in sys.argv)
    print(text)
