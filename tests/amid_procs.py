"""Test helpers: the real programs as an operator runs them, as subprocesses on loopback.

    with simulator(tmp_path, call_rate=20) as sim, daemon(tmp_path, sim.port) as amid:
        text = amid.metrics()

Every process writes its output to a file (no pipe to fill up); waits poll that file, or an
HTTP endpoint, with a deadline, and a process that exits early fails the wait with its output.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import yaml

__all__ = ["AMID", "Daemon", "Proc", "Simulator", "daemon", "poll", "simulator"]

_T = TypeVar("_T")

# The installed console script when there is one (what an operator runs), else the same entry point.
_script = Path(sys.executable).with_name("amid")
AMID: list[str] = [str(_script)] if _script.exists() else [
    sys.executable, "-c", "import sys; from amid.cli import main; sys.exit(main())"]


def poll(check: Callable[[], _T | None], timeout: float, what: str, interval: float = 0.05) -> _T:
    """Call ``check`` until it returns something other than None (or False); fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result is not None and result is not False:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class Proc:
    """One subprocess with its output (stdout and stderr) in ``log``."""

    def __init__(self, argv: Sequence[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        with log.open("wb") as out:
            self.popen = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out,
                                          stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        """The first match of ``pattern`` in the output; fails if the process exits first."""
        def check() -> re.Match[str] | None:
            found = re.search(pattern, self.output())
            if found is None and self.popen.poll() is not None:
                raise AssertionError(f"{self.popen.args!r} exited {self.popen.returncode}:\n{self.output()}")
            return found
        return poll(check, timeout, f"{pattern!r} from {self.popen.args!r}")

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, wait up to ``timeout``, then SIGKILL; return the exit status."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        return self.popen.returncode


class Simulator(Proc):
    port: int


class Daemon(Proc):
    port: int   # the HTTP port of /metrics
    config: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def metrics(self, timeout: float = 5.0) -> str:
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=timeout) as response:
            return response.read().decode()

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/readyz", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def reload(self) -> None:
        self.popen.send_signal(signal.SIGHUP)


@contextmanager
def simulator(tmp_path: Path, *, call_rate: float = 20.0) -> Iterator[Simulator]:
    """``amid simulate`` on an ephemeral loopback port, starting ``call_rate`` calls a second."""
    proc = Simulator([*AMID, "simulate", "--listen", "127.0.0.1:0", "--call-rate", f"{call_rate:g}"],
                     tmp_path / "simulate.log")
    try:
        proc.port = int(proc.wait_for(r"listening on 127\.0\.0\.1:(\d+)").group(1))
        yield proc
    finally:
        proc.stop()


def default_sinks(tmp_path: Path) -> list[dict[str, Any]]:
    """A spooled file sink that takes everything and a file sink whose filter discards most."""
    return [
        {"name": "events", "type": "file", "path": str(tmp_path / "events.jsonl"), "overflow": "spool",
         "spool": {"max_bytes": "64MiB"}, "batch": {"max_wait": "5ms"}},
        {"name": "hangups", "type": "file", "path": str(tmp_path / "hangups.jsonl"),
         "include": ["Hangup"]},
    ]


@contextmanager
def daemon(tmp_path: Path, sim_port: int, *, sinks: list[dict[str, Any]] | None = None,
           ready_timeout: float = 20.0) -> Iterator[Daemon]:
    """``amid run`` against the simulator, metrics on an ephemeral port, ready when it returns."""
    config = {
        "servers": [{"name": "pbx1", "host": "127.0.0.1", "port": sim_port, "username": "amid",
                     "secret": "amidsecret", "ping_interval": "1s", "ping_timeout": "2s",
                     "reconnect": {"min_delay": "100ms", "max_delay": "500ms"}}],
        "sinks": default_sinks(tmp_path) if sinks is None else sinks,
        "http": {"listen": "127.0.0.1:0"},
        "state_dir": str(tmp_path / "state"),
        "shutdown_timeout": "5s",
    }
    path = tmp_path / "amid.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {key: value for key, value in os.environ.items() if not key.startswith("AMID_")}
    proc = Daemon([*AMID, "run", "--config", str(path), "--log-format", "text"],
                  tmp_path / "amid.log", env=env)
    proc.config = path
    try:
        proc.port = int(proc.wait_for(r"metrics and health on http://127\.0\.0\.1:(\d+)/").group(1))
        poll(proc.ready, ready_timeout, "amid's /readyz")
        yield proc
    finally:
        status = proc.stop()
        assert status == 0, f"amid run exited {status}:\n{proc.output()}"
