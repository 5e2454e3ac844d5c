"""``amid top`` used as a person would: in a real terminal (tmux) against a real daemon on the
simulator, reading the screen; and ``--once`` as a script would."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from amid_procs import AMID, daemon, poll, simulator

from amid.top import _quantile, metrics_url


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run_top(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TERM": "xterm-256color"}  # colour must come from a terminal, not TERM
    return subprocess.run([*AMID, "top", *args], capture_output=True, text=True, timeout=30,
                          check=False, env=env)


def test_metrics_url_and_quantile() -> None:
    assert metrics_url("http://127.0.0.1:9180") == "http://127.0.0.1:9180/metrics"
    assert metrics_url("http://h:1/metrics/") == "http://h:1/metrics"
    # 100 observations between two scrapes, 99 of them at most 1 ms: p99 lands in (0.5 ms, 1 ms].
    older = {0.0005: 10.0, 0.001: 10.0, float("inf"): 10.0}
    newer = {0.0005: 50.0, 0.001: 109.0, float("inf"): 110.0}
    assert _quantile(0.99, newer, older) == pytest.approx(0.0005 + 0.0005 * (99 - 40) / 59)
    assert _quantile(0.99, older, older) is None  # nothing delivered meanwhile


def test_once_prints_one_plain_snapshot(tmp_path: Path) -> None:
    with simulator(tmp_path, call_rate=20) as sim, daemon(tmp_path, sim.port) as amid:
        done = run_top("--once", "--interval", "1", "--url", amid.url)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "\x1b" not in out  # no colour or cursor codes when the output is not a terminal
    server = re.search(r"^pbx1\s+up\s+([\d,]+\.\d)\s+(\S+)\s+(\S+)\s+(\d+)$", out, re.MULTILINE)
    assert server, out
    assert float(server.group(1).replace(",", "")) > 0  # events/s over the interval
    for sink in ("events", "hangups"):
        row = re.search(rf"^{sink}\s+file\s+ok\s+([\d,]+\.\d)\s+([\d,]+\.\d)\s", out, re.MULTILINE)
        assert row and float(row.group(1).replace(",", "")) > 0, out


def test_once_says_when_the_daemon_does_not_answer() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    done = run_top("--once", "--url", url)
    assert done.returncode == 1
    assert f"amid at {url}/metrics does not answer: connection refused" in " ".join(done.stderr.split())


class Tmux:
    """A private tmux server (its own socket) running one program in a fixed-size window."""

    def __init__(self, tmp_path: Path) -> None:
        tmux = shutil.which("tmux")
        if tmux is None:
            if os.environ.get("CI"):
                pytest.fail("tmux is missing (Debian package 'tmux')")
            pytest.skip("tmux not installed")
        self._base = [tmux, "-S", str(tmp_path / "tmux.sock"), "-f", os.devnull]
        self._env = {**os.environ, "TERM": "xterm-256color"}
        self._status = tmp_path / "exit-status"

    def __call__(self, *args: str) -> str:
        done = subprocess.run([*self._base, *args], capture_output=True, text=True, timeout=10,
                              check=True, env=self._env)
        return done.stdout

    def start(self, argv: list[str]) -> None:
        # The shell notes the exit status in a file: tmux reaps its panes' processes only when
        # its SIGCHLD handling gets round to it, which under load took more than ten seconds.
        command = f"{shlex.join(argv)}; echo $? > {shlex.quote(str(self._status))}"
        self("new-session", "-d", "-s", "top", "-x", "132", "-y", "40", command)

    def screen(self, *, escapes: bool = False) -> str:
        return self("capture-pane", "-p", *(["-e"] if escapes else []), "-t", "top")

    def exit_status(self) -> str | None:
        """None while the program runs, then its exit status."""
        status = self._status.read_text().strip() if self._status.exists() else ""
        return status or None

    def close(self) -> None:
        subprocess.run([*self._base, "kill-server"], capture_output=True, timeout=10, check=False)


@pytest.fixture
def tmux(tmp_path: Path) -> Iterator[Tmux]:
    terminal = Tmux(tmp_path)
    yield terminal
    terminal.close()


SERVER_ROW = re.compile(r"^\s*pbx1\s+up\s+([\d,]+\.\d)\s+\S+\s+\S+\s+0\s*$", re.MULTILINE)


def test_live_view_in_a_terminal(tmp_path: Path, tmux: Tmux) -> None:
    with simulator(tmp_path, call_rate=20) as sim:
        with daemon(tmp_path, sim.port) as amid:
            tmux.start([*AMID, "top", "--url", amid.url])

            def rows() -> str | None:
                screen = tmux.screen()
                sinks = all(re.search(rf"^\s*{sink}\s+file\s+ok\s", screen, re.MULTILINE)
                            for sink in ("events", "hangups"))
                return screen if SERVER_ROW.search(screen) and sinks else None
            screen = poll(rows, 20, "a row per server and per sink")
            assert "SERVER" in screen and "EVENTS/S" in screen and "P99 LATENCY" in screen
            assert "q quits" in screen

            # The view refreshes by itself: the events/s of pbx1 takes new values as calls come.
            rates: set[float] = set()

            def rates_move() -> bool:
                found = SERVER_ROW.search(tmux.screen())
                if found and float(found.group(1).replace(",", "")) > 0:
                    rates.add(float(found.group(1).replace(",", "")))
                return len(rates) >= 3
            poll(rates_move, 20, "the events/s to move", interval=0.3)
            assert "\x1b[" in tmux.screen(escapes=True)  # colour on a terminal

        # The daemon has stopped: one clear line says so, and the view keeps trying.
        def down_line() -> str | None:
            screen = tmux.screen()
            return screen if "does not answer" in screen else None
        screen = poll(down_line, 15, "the daemon-down line")
        assert f"amid at {amid.url}/metrics does not answer: connection refused" in " ".join(screen.split())
        assert not SERVER_ROW.search(screen)

    tmux("send-keys", "-t", "top", "q")
    assert poll(tmux.exit_status, 10, "q to quit amid top") == "0", tmux.screen()
