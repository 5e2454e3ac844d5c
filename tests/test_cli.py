"""The ``amid`` command as a user runs it: real subprocesses, real signals, real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from amid.service import STOP_SIGNAL_REPEAT_WINDOW
from amid.simulator import AMISimulator

AMID = [sys.executable, "-m", "amid.cli"]
ROOT = Path(__file__).resolve().parent.parent


def env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("AMID_") and k != "NOTIFY_SOCKET"}
    base.update(extra)
    return base


async def run_amid(*args: str, timeout: float = 30, env_extra: dict | None = None,
                   stdin: bytes | None = None) -> tuple[int, bytes, bytes]:
    proc = await asyncio.create_subprocess_exec(
        *AMID, *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        env=env(**(env_extra or {})), cwd=ROOT)
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate(stdin)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode, out, err


@pytest.fixture
async def sim():
    async with AMISimulator(call_spread=0.0, auth_failure_delay=0.05) as simulator:
        yield simulator


def conn_args(sim: AMISimulator) -> list[str]:
    return ["--host", f"127.0.0.1:{sim.port}", "--username", "amid"]


# ---------------------------------------------------------------- check-config

async def test_check_config_accepts_the_shipped_example():
    code, out, err = await run_amid("check-config", "--config", "config/amid.yaml")
    assert code == 0, err.decode()
    assert b"configuration OK" in out


async def test_check_config_lists_every_problem_with_key_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("servers:\n  - host: pbx\n    port: many\n    username: amid\n    secret: x\n"
                   "sinks:\n  - name: f\n    type: file\n    pathh: /tmp/x\n")
    code, _, err = await run_amid("check-config", "--config", str(bad))
    assert code == 78
    text = err.decode()
    assert f"{bad}:3: servers[0].port" in text
    assert f"{bad}:9: sinks[0].pathh" in text
    # `amid run` refuses to start with the same messages
    code, _, err2 = await run_amid("run", "--config", str(bad))
    assert code == 78 and f"{bad}:3: servers[0].port" in err2.decode()


# ---------------------------------------------------------------- tail / action

async def test_tail_prints_every_event_as_a_json_line(sim):
    async def originate_when_logged_in():
        await sim.wait_for_sessions(1, timeout=20)
        sim.originate("Local/200@test", exten="100")
    task = asyncio.create_task(originate_when_logged_in())
    code, out, err = await run_amid("tail", *conn_args(sim), "--count", "82",
                                    env_extra={"AMID_SECRET": "amidsecret"})
    await task
    assert code == 0, err.decode()
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == 82
    names = [line["event"] for line in lines]
    assert names.count("Newchannel") == 4 and names.count("Hangup") == 4
    assert [line["seq"] for line in lines] == list(range(1, 83))


async def test_tail_raw_writes_a_capture_that_simulate_replays(sim, tmp_path):
    async def originate_when_logged_in():
        await sim.wait_for_sessions(1, timeout=20)
        sim.originate("Local/200@test", exten="100")
    task = asyncio.create_task(originate_when_logged_in())
    secret = tmp_path / "secret"
    secret.write_text("amidsecret\n")
    code, raw, err = await run_amid("tail", *conn_args(sim), "--secret-file", str(secret),
                                    "--count", "82", "--raw")
    await task
    assert code == 0, err.decode()
    assert raw.startswith(b"Asterisk Call Manager/11.0.0\r\n")
    capture = tmp_path / "capture.raw"
    capture.write_bytes(raw)
    from amid.simulator import ReplayServer
    async with ReplayServer(capture) as server:
        code, out, err = await run_amid("tail", "--host", f"127.0.0.1:{server.port}",
                                        "--username", "amid", "--count", "82",
                                        env_extra={"AMID_SECRET": "amidsecret"})
    assert code == 0, err.decode()
    assert len(out.splitlines()) == 82


async def test_action_prints_json_and_exit_status_follows_the_response(sim):
    code, out, err = await run_amid("action", *conn_args(sim), "Ping",
                                    env_extra={"AMID_SECRET": "amidsecret"})
    assert code == 0, err.decode()
    assert json.loads(out)["response"]["Ping"] == "Pong"
    code, out, _ = await run_amid("action", *conn_args(sim), "NoSuchAction",
                                  env_extra={"AMID_SECRET": "amidsecret"})
    assert code == 1 and json.loads(out)["response"]["Response"] == "Error"
    code, out, _ = await run_amid("action", *conn_args(sim), "Command", "Command=core show version",
                                  env_extra={"AMID_SECRET": "amidsecret"})
    assert code == 0 and json.loads(out)["response"]["Output"].startswith("Asterisk 22")


@pytest.mark.parametrize("command", [["action", "Ping"], ["tail"]])
async def test_wrong_secret_is_one_clear_line_without_the_secret(sim, command):
    code, out, err = await run_amid(command[0], *conn_args(sim), *command[1:],
                                    env_extra={"AMID_SECRET": "not-the-s3cret"})
    assert code == 1
    assert b"not-the-s3cret" not in err + out
    assert err.decode().strip() == (f"amid {command[0]}: login to 127.0.0.1:{sim.port} as 'amid' "
                                    "failed: Authentication failed")


@pytest.mark.parametrize("args, message", [
    (["--host", "pbx:abc"], "amid: --host 'pbx:abc' is not HOST[:PORT]"),
    (["--host", "127.0.0.1:99999"], "amid: port 99999 is not in 1-65535"),
    (["--host", "[::1]x"], "amid: --host '[::1]x' is not HOST[:PORT]"),
    (["--tls", "--tls-ca", "no-such-ca.pem"], "amid: no --tls-ca file no-such-ca.pem"),
])
async def test_a_bad_host_or_ca_file_is_one_line(args, message):
    code, out, err = await run_amid("action", *args, "--username", "amid", "--secret", "x", "Ping")
    assert (code, out, err.decode().strip()) == (1, b"", message)


async def test_an_unreadable_secret_file_is_one_line_naming_the_resolved_path(sim, tmp_path):
    code, out, err = await run_amid("tail", *conn_args(sim), "--secret-file", "no-such-secret")
    assert code == 1 and out == b""
    assert err.decode().strip() == (f"amid: cannot read secret file {ROOT / 'no-such-secret'}: "
                                    "No such file or directory")


async def test_simulate_says_listening_once_bound_and_refuses_bad_arguments_in_one_line(tmp_path):
    proc = await asyncio.create_subprocess_exec(
        *AMID, "simulate", "--listen", "127.0.0.1:0", stderr=subprocess.PIPE, env=env(), cwd=ROOT)
    try:
        async with asyncio.timeout(30):
            line = (await proc.stderr.readline()).decode()
        # The real port, and it answers: the line comes only after the bind.
        assert line.startswith("amid simulate: listening on 127.0.0.1:") and ":0 " not in line
        port = int(line.split("127.0.0.1:")[1].split()[0])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert (await reader.readline()).startswith(b"Asterisk Call Manager/")
        writer.close()
        # The address is taken now: a second simulator says so in one line.
        code, _, err = await run_amid("simulate", "--listen", f"127.0.0.1:{port}")
        assert code == 1 and b"address already in use" in err and b"Traceback" not in err
    finally:
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(30):
            assert await proc.wait() == 0

    not_a_capture = tmp_path / "hostname"
    not_a_capture.write_text("vm\n")
    code, _, err = await run_amid("simulate", "--listen", "127.0.0.1:0", "--replay", str(not_a_capture))
    assert code == 1 and err.decode().startswith(f"amid simulate: {not_a_capture} is not an AMI capture")
    code, _, err = await run_amid("simulate", "--replay", str(tmp_path / "missing.raw"))
    assert code == 2 and err.decode().strip() == f"amid simulate: no capture file {tmp_path / 'missing.raw'}"
    for args, message in ((["--tls-cert", "c.pem"], b"--tls-cert and --tls-key go together"),
                          (["--replay", "x.raw", "--replay-speed", "2"], b"--replay-speed needs --replay-verbatim"),
                          (["--replay-verbatim"], b"need --replay FILE"),
                          (["--listen", "127.0.0.1:99999"], b"port 99999 is not in 0-65535"),
                          (["--tls-cert", "c.pem", "--tls-key", "k.pem"], b"no --tls-cert file c.pem"),
                          (["--call-rate", "-1"], b"--call-rate: must be 0 or more")):
        code, _, err = await run_amid("simulate", *args)
        assert code == 2 and message in err and b"Traceback" not in err


async def test_demo_shows_events_within_seconds():
    code, out, err = await run_amid("demo", "--call-rate", "20", "--count", "300", timeout=60)
    assert code == 0, err.decode()
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == 300  # exactly --count
    assert {"Newchannel", "OriginateResponse"} <= {line["event"] for line in lines}


async def test_demo_without_calls_says_only_the_login_events_come():
    code, out, err = await run_amid("demo", "--call-rate", "0", "--count", "2", timeout=60)
    assert code == 0, err.decode()
    assert [json.loads(line)["event"] for line in out.splitlines()] == ["FullyBooted", "SuccessfulAuth"]
    assert b"--call-rate 0 starts no calls: only the login's two events come" in err


async def test_demo_stops_quietly_when_its_reader_goes_away():
    """`amid demo | head -1`: once the pipe is closed the demo exits 0 by itself (before, it
    ran on, retrying writes into a pipe nobody reads, until interrupted)."""
    proc = await asyncio.create_subprocess_exec(
        *AMID, "demo", "--call-rate", "20", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL, env=env(), cwd=ROOT)
    try:
        async with asyncio.timeout(30):
            first = await proc.stdout.readline()
            assert json.loads(first)["server"] == "demo"
            proc.stdout.feed_eof()
            proc._transport.get_pipe_transport(1).close()   # the reader goes away
            err = await proc.stderr.read()             # the demo ends by itself
            assert await proc.wait() == 0, err.decode()
            assert err.decode().splitlines()[1:] == []  # its banner line, no warnings
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_demo_piped_into_head_exits_quietly():
    """`amid demo | head -3`: a real pipe into a real head; three lines, then the demo ends by
    itself with status 0 and nothing on stderr but its banner."""
    read_end, write_end = os.pipe()
    try:
        demo = await asyncio.create_subprocess_exec(
            *AMID, "demo", "--call-rate", "20", stdout=write_end, stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL, env=env(), cwd=ROOT)
        head = await asyncio.create_subprocess_exec(
            "head", "-3", stdin=read_end, stdout=subprocess.PIPE, env=env())
    finally:
        os.close(read_end)
        os.close(write_end)
    try:
        async with asyncio.timeout(30):
            out, _ = await head.communicate()
            err = await demo.stderr.read()
            assert await demo.wait() == 0, err.decode()
    finally:
        for proc in (demo, head):
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert [json.loads(line)["server"] for line in out.splitlines()] == ["demo"] * 3
    assert err.decode().splitlines()[1:] == []  # its banner line, no warnings


# ---------------------------------------------------------------- run under "systemd"

class NotifySocket:
    """A unix datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[dict[str, str]] = []

    def poll(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return
            self.messages.append(dict(line.split("=", 1) for line in data.decode().splitlines()))

    async def wait_for(self, key: str, value: str | None = None, after: int = 0,
                       timeout: float = 20) -> int:
        async with asyncio.timeout(timeout):
            while True:
                self.poll()
                for i, msg in enumerate(self.messages[after:], after):
                    if key in msg and (value is None or msg[key] == value):
                        return i
                await asyncio.sleep(0.02)


def daemon_config(tmp_path: Path, sim: AMISimulator, events_file: Path, **extra) -> Path:
    config = {
        "servers": [{"name": "pbx1", "host": "127.0.0.1", "port": sim.port, "username": "amid",
                     "secret_file": str(tmp_path / "secret"), "ping_interval": "200ms",
                     "ping_timeout": "1s"}],
        "sinks": [{"name": "file", "type": "file", "path": str(events_file), "overflow": "spool",
                   "batch": {"max_wait": "10ms"}}],
        "http": {"listen": "127.0.0.1:0"},
        "state_dir": str(tmp_path / "state"),
        "shutdown_timeout": "10s",
        **extra,
    }
    (tmp_path / "secret").write_text("amidsecret\n")
    path = tmp_path / "amid.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


async def test_run_talks_to_systemd_reloads_and_stops_without_losing_events(sim, tmp_path):
    events_file = tmp_path / "events.jsonl"
    config = daemon_config(tmp_path, sim, events_file)
    notify = NotifySocket(tmp_path / "notify.sock")
    proc = await asyncio.create_subprocess_exec(
        *AMID, "run", "--config", str(config), "--log-format", "json",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
        env=env(NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC="200000"))
    try:
        ready = await notify.wait_for("READY", "1")
        assert "connected to pbx1" in notify.messages[ready].get("STATUS", "")
        await notify.wait_for("WATCHDOG", "1", after=ready)
        # load while we reload: a good config, then a bad one
        sim.call_rate = 0
        for _ in range(5):
            sim.originate("Local/200@test", exten="100")
        good = yaml.safe_load(config.read_text())
        good["sinks"].append({"name": "copy", "type": "file", "path": str(tmp_path / "copy.jsonl"),
                              "batch": {"max_wait": "10ms"}})
        config.write_text(yaml.safe_dump(good))
        proc.send_signal(signal.SIGHUP)
        reloading = await notify.wait_for("RELOADING", "1", after=ready)
        assert "MONOTONIC_USEC" in notify.messages[reloading]
        ready2 = await notify.wait_for("READY", "1", after=reloading)
        config.write_text("servers: [oops\n")
        proc.send_signal(signal.SIGHUP)
        reloading2 = await notify.wait_for("RELOADING", "1", after=ready2)
        await notify.wait_for("READY", "1", after=reloading2)
        for _ in range(5):
            sim.originate("Local/200@test", exten="100")
        await asyncio.sleep(0)  # let the simulator start emitting
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()[-3000:]
    notify.poll()
    stopping = [i for i, m in enumerate(notify.messages) if m.get("STOPPING") == "1"]
    assert stopping and stopping[0] > reloading2
    logs = [json.loads(line) for line in out.splitlines() if line.startswith(b"{")]  # JSON logs: stdout
    assert any("reload refused" in entry["message"] for entry in logs)
    assert any(entry["message"] == "configuration reloaded" for entry in logs), logs
    assert sum("metrics and health" in entry["message"] for entry in logs) == 1
    # nothing lost: every event the simulator sent to the daemon's session is in the file
    records = [json.loads(line) for line in events_file.read_text().splitlines()]
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids))
    names = [r["event"] for r in records]
    assert names.count("OriginateResponse") == 10
    copy = [json.loads(line) for line in (tmp_path / "copy.jsonl").read_text().splitlines()]
    assert copy and {r["id"] for r in copy} <= set(ids)


@contextlib.asynccontextmanager
async def daemon_with_a_batch_stuck_in_flight(sim, tmp_path, events_file, **hook):
    """A real `amid run` with a file sink and a webhook whose receiver holds the first request:
    yields (process, receiver) once that request is in flight; the process is killed at the end
    if it still runs."""
    from http_receiver import HttpReceiver
    async with HttpReceiver() as receiver:
        receiver.stall()  # the drain after the first signal waits for this receiver
        config = daemon_config(tmp_path, sim, events_file, shutdown_timeout="20s")
        data = yaml.safe_load(config.read_text())
        data["sinks"].append({"name": "hook", "type": "webhook", "url": receiver.url, "timeout": 60,
                              **hook})
        config.write_text(yaml.safe_dump(data))
        notify = NotifySocket(tmp_path / "notify.sock")
        proc = await asyncio.create_subprocess_exec(
            *AMID, "run", "--config", str(config), stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, cwd=ROOT, env=env(NOTIFY_SOCKET=str(notify.path)))
        try:
            await notify.wait_for("READY", "1")
            sim.originate("Local/200@test", exten="100")
            await receiver.wait_for_requests(1)      # a batch is stuck in flight
            proc.notify = notify
            yield proc, receiver
        finally:
            receiver.release()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_a_second_stop_signal_exits_at_once(sim, tmp_path, sig):
    async with daemon_with_a_batch_stuck_in_flight(sim, tmp_path, tmp_path / "events.jsonl") as (proc, _):
        proc.send_signal(sig)
        first_signal = time.monotonic()
        await proc.notify.wait_for("STOPPING", "1")
        # A repeat within STOP_SIGNAL_REPEAT_WINDOW is the same request (test below).
        await asyncio.sleep(max(0.0, first_signal + STOP_SIGNAL_REPEAT_WINDOW + 0.1 - time.monotonic()))
        started = time.monotonic()
        proc.send_signal(sig)
        async with asyncio.timeout(10):
            await proc.wait()
        assert proc.returncode == 128 + sig
        assert time.monotonic() - started < 10   # not the 20 s drain


async def test_two_stop_signals_1ms_apart_are_one_request_and_drain(sim, tmp_path):
    """`timeout -s TERM` (and a supervisor signalling a process group) deliver two SIGTERMs at
    once: the daemon drains a slow webhook and exits 0 instead of dropping what it holds."""
    events_file = tmp_path / "events.jsonl"
    async with daemon_with_a_batch_stuck_in_flight(sim, tmp_path, events_file,
                                                   batch={"max_wait": "10ms"}) as (proc, receiver):
        proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.001)               # the gap `timeout -s TERM` leaves, give or take
        proc.send_signal(signal.SIGTERM)
        await proc.notify.wait_for("STOPPING", "1")
        receiver.release()                       # now the drain can finish
        async with asyncio.timeout(20):
            _, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()[-3000:]
    assert b"still draining" in err
    file_ids = [json.loads(line)["id"] for line in events_file.read_text().splitlines()]
    hook_ids = [record["id"] for record in receiver.delivered_records]
    assert file_ids and sorted(hook_ids) == sorted(file_ids)   # all drained, none dropped


async def test_run_names_sink_plugins_that_failed_to_load(tmp_path):
    """A plugin that cannot be imported makes its sink type unknown: say why, not just that."""
    site = tmp_path / "site"
    info = site / "amid_broken_sink-0.1.0.dist-info"   # what `pip install` leaves behind
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: amid_broken_sink\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[amid.sinks]\nbroken = amid_broken_sink_mod:create\n")
    (site / "amid_broken_sink_mod.py").write_text("raise RuntimeError('missing dependency: libfoo')\n")
    config = tmp_path / "amid.yaml"
    config.write_text(yaml.safe_dump({
        "servers": [{"host": "127.0.0.1", "username": "amid", "secret": "x"}],
        "sinks": [{"name": "b", "type": "broken"}]}))
    for command in ("run", "check-config"):
        code, _, err = await run_amid(command, "--config", str(config),
                                      env_extra={"PYTHONPATH": str(site)})
        text = err.decode()
        assert code == 78, text
        assert ("sinks[0].type: sink type 'broken' is not available: sink plugin 'broken' "
                "(amid_broken_sink_mod:create) failed to load: RuntimeError: missing dependency: "
                "libfoo") in text
        assert "sink plugin 'broken'" in text and "missing dependency: libfoo" in text
        assert "Traceback" not in text


async def test_run_names_http_listen_when_it_cannot_bind_and_warns_without_sinks(sim, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        config = daemon_config(tmp_path, sim, tmp_path / "events.jsonl", sinks=[],
                               http={"listen": address})
        code, _, err = await run_amid("run", "--config", str(config))
    text = err.decode()
    assert code == 1, text
    assert "no sinks configured: events are received and counted" in text
    code, _, err = await run_amid("check-config", "--config", str(config))
    assert code == 0 and b"warning: no sinks configured" in err
    [error] = [line for line in text.splitlines() if "ERROR" in line]
    assert f"http.listen {address}: " in error and "address already in use" in error
    assert "Traceback" not in text


async def test_sigterm_under_load_loses_nothing(sim, tmp_path):
    """SIGTERM while the simulator streams as fast as it can: the daemon logs off, Asterisk's
    side stops after Goodbye, and every event the simulator sent is in the file."""
    events_file = tmp_path / "events.jsonl"
    config = daemon_config(tmp_path, sim, events_file)
    notify = NotifySocket(tmp_path / "notify.sock")
    proc = await asyncio.create_subprocess_exec(
        *AMID, "run", "--config", str(config), stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, cwd=ROOT, env=env(NOTIFY_SOCKET=str(notify.path)))
    try:
        await notify.wait_for("READY", "1")
        before = sim.stats.events_sent
        stream = asyncio.create_task(sim.stream_events(200_000))
        async with asyncio.timeout(20):
            while sim.stats.events_sent - before < 20_000:
                await asyncio.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(60):
            _, err = await proc.communicate()
        async with asyncio.timeout(10):
            await stream
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()[-3000:]
    sent = sim.stats.events_sent  # FullyBooted and SuccessfulAuth included
    lines = events_file.read_bytes().count(b"\n")
    assert 20_000 < sent < 200_000 + 10
    assert lines == sent, err.decode()[-5000:]


async def test_tail_into_a_reader_that_goes_away_exits_quietly(sim):
    """`amid tail | head -1`: the pipe closes; tail must end at once without tracebacks."""
    sim.call_rate = 0
    read_fd, write_fd = os.pipe()
    proc = await asyncio.create_subprocess_exec(
        *AMID, "tail", *conn_args(sim), stdout=write_fd, stderr=subprocess.PIPE, cwd=ROOT,
        env=env(AMID_SECRET="amidsecret"))
    os.close(write_fd)
    try:
        await sim.wait_for_sessions(1, timeout=20)
        sim.originate("Local/200@test", exten="100")
        reader = os.fdopen(read_fd, "rb")
        first = await asyncio.to_thread(reader.readline)
        assert first.startswith(b'{"id":')
        reader.close()                                  # the reader goes away
        for _ in range(3):
            sim.originate("Local/200@test", exten="100")  # more output to write into the pipe
        async with asyncio.timeout(20):
            _, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0
    assert b"Traceback" not in err and b"Broken pipe" not in err


@pytest.mark.parametrize("capture", ["s04_originate_events", "s07f_odd_values", "s07g_userevent_crlf"])
async def test_tail_prints_every_event_of_a_real_asterisk_call_unaltered(capture):
    """The real Asterisk 22 bytes (tests/fixtures) played to `amid tail`: every event, in order,
    every field value byte for byte (non-UTF-8 values through fields_b64), nothing added."""
    import base64

    from amid.ami.protocol import Parser, recover_bytes
    from amid.simulator import ReplayServer
    path = Path(__file__).parent / "fixtures" / f"{capture}.raw"
    expected = [m for m in Parser().feed(path.read_bytes()) if m.kind == "event"]
    async with ReplayServer(path) as server:
        code, out, err = await run_amid("tail", "--host", f"127.0.0.1:{server.port}", "--username", "amid",
                                        "--count", str(len(expected)), env_extra={"AMID_SECRET": "x"})
    assert code == 0, err.decode()
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["event"] for r in records] == [m.name for m in expected]
    for record, message in zip(records, expected, strict=False):
        got: list[tuple[str, bytes]] = []
        raw_values = record.get("fields_b64", {})
        for key, value in record["fields"].items():
            values = value if isinstance(value, list) else [value]
            if key in raw_values:
                b64 = raw_values[key]
                values_bytes = [base64.b64decode(v) for v in (b64 if isinstance(b64, list) else [b64])]
            else:
                values_bytes = [v.encode() for v in values]
            got += [(key, v) for v in values_bytes]
        # the record groups repeated keys; compare as the multiset of (key, value) per key order
        want = [(k, recover_bytes(v)) for k, v in message.fields]
        assert sorted(got) == sorted(want)
        assert list(dict.fromkeys(k for k, _ in got)) == list(dict.fromkeys(k for k, _ in want))


# ---------------------------------------------------------------- operator polish (issue 16)

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def test_healthcheck_asks_the_configured_http_listen_from_file_and_environment(sim, tmp_path):
    """`amid healthcheck` (the container HEALTHCHECK) reads http.listen as `amid run` does:
    from --config/$AMID_CONFIG and AMID_* overrides; not a fixed 127.0.0.1:9180."""
    events_file = tmp_path / "events.jsonl"
    config = daemon_config(tmp_path, sim, events_file)
    listen = f"127.0.0.1:{free_port()}"
    daemon_env = {"AMID_CONFIG": str(config), "AMID_HTTP__LISTEN": listen}
    code, out, _ = await run_amid("healthcheck", env_extra=daemon_env)
    assert code == 1 and f"http://{listen}/readyz: " in out.decode()  # nothing listens yet
    proc = await asyncio.create_subprocess_exec(
        *AMID, "run", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT,
        env=env(**daemon_env))
    try:
        async with asyncio.timeout(20):
            while True:
                code, out, _ = await run_amid("healthcheck", env_extra=daemon_env)
                if code == 0:
                    break
                await asyncio.sleep(0.1)
        assert out.decode().startswith(f"http://{listen}/readyz: HTTP 200 ")
        # The file alone (no override) says 127.0.0.1:0: not where the daemon listens.
        code, _, _ = await run_amid("healthcheck", "--config", str(config))
        assert code == 1
        # --url still asks exactly where it is told.
        code, _, _ = await run_amid("healthcheck", "--url", f"http://{listen}/livez")
        assert code == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            await proc.wait()
    assert proc.returncode == 0


async def test_healthcheck_says_why_when_there_is_nothing_to_ask(tmp_path):
    config = tmp_path / "amid.yaml"
    config.write_text("servers: [{host: 127.0.0.1, username: amid, secret: x}]\nhttp: {listen: off}\n")
    code, out, _ = await run_amid("healthcheck", "--config", str(config))
    assert (code, out.decode()) == (1, "amid healthcheck: http.listen is off: no /readyz to ask\n")
    config.write_text("servers: [{host: 127.0.0.1, username: amid, secret: x}]\nhttp: {listen: 7}\n")
    code, out, _ = await run_amid("healthcheck", "--config", str(config))
    assert code == 1 and "http.listen: listen must be host:port" in out.decode()


def subcommand_parsers() -> dict[str, object]:
    import argparse

    from amid.cli import build_parser
    parser = build_parser()
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_there_is_a_help_test_for_every_subcommand():
    assert {"run", "check-config", "demo", "simulate", "tail", "action", "healthcheck",
            "init-config"} <= set(subcommand_parsers())


@pytest.mark.parametrize("name", sorted(subcommand_parsers()))
def test_every_subcommand_help_has_a_one_line_description_and_shows_defaults(name, capsys):
    from amid.cli import main
    command = subcommand_parsers()[name]
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    description = text.split("\n\n")[1]
    assert description.strip() and "\n" not in description.strip(), description
    assert description == command.description
    for action in command._actions:
        if not action.option_strings or action.help == "==SUPPRESS==":
            continue
        if action.default is None or action.default is False or action.dest == "help":
            continue
        # Each option with a default says it, in its own help text.
        rendered = command._get_formatter()._expand_help(action) if action.help else ""
        assert "default" in rendered, (action.option_strings, rendered)


async def test_init_config_prints_the_sample_config_byte_for_byte():
    code, out, err = await run_amid("init-config")
    assert (code, err) == (0, b"")
    assert out == (ROOT / "config" / "amid.yaml").read_bytes()


async def _tail_blocked_on_its_reader(n: int) -> tuple[AMISimulator, asyncio.subprocess.Process, int]:
    """`amid tail` streaming ``n`` events into a pipe nobody reads yet; returns once the first
    SIGINT has ended its session, i.e. it is writing out what it holds."""
    sim = AMISimulator(stream_on_login=n)
    await sim.start()
    read_fd, write_fd = os.pipe()
    proc = await asyncio.create_subprocess_exec(
        *AMID, "tail", *conn_args(sim), stdout=write_fd, stderr=subprocess.PIPE, cwd=ROOT,
        env=env(AMID_SECRET="amidsecret"))
    os.close(write_fd)
    async with asyncio.timeout(20):
        await sim.wait_for_sessions(1, timeout=20)
        while sim.stats.events_sent < n:  # all sent; a 64 KiB pipe holds ~60 of them
            await asyncio.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        while sim.sessions:  # tail logged off: it holds the rest for its reader
            await asyncio.sleep(0.01)
    return sim, proc, read_fd


async def test_tail_gives_a_slow_reader_every_event_it_received():
    """`amid tail | less`: after Ctrl-C the events already received wait for the reader however
    long it takes (no deadline that drops them), in order, each a whole JSON line."""
    sim, proc, read_fd = await _tail_blocked_on_its_reader(20_000)
    try:
        with os.fdopen(read_fd, "rb") as reader:
            out = await asyncio.to_thread(reader.read)
        async with asyncio.timeout(20):
            _, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await sim.close()
    assert proc.returncode == 0, err.decode()
    seqs = [json.loads(line)["seq"] for line in out.splitlines()]
    assert len(seqs) > 1_000  # far more than the pipe held when it logged off
    assert seqs == list(range(1, len(seqs) + 1))


async def test_tail_second_signal_gives_up_on_a_stuck_reader_and_says_so():
    sim, proc, read_fd = await _tail_blocked_on_its_reader(20_000)
    try:
        proc.send_signal(signal.SIGINT)  # the second: stop waiting for the reader
        with os.fdopen(read_fd, "rb") as reader:  # the write under way ends once the pipe drains
            out = await asyncio.to_thread(reader.read)
        async with asyncio.timeout(20):
            _, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await sim.close()
    assert proc.returncode == 1
    assert b"interrupted with" in err and b"bytes of events not yet written to stdout" in err, err.decode()
    assert b"Traceback" not in err
    # What was already handed to write() when it gave up still arrives (how much is a matter of
    # timing), whole lines in order; the rest is dropped.
    lines = out.splitlines()
    assert all(json.loads(line)["seq"] == i for i, line in enumerate(lines, 1))


def test_tail_stdout_writes_keep_every_byte_in_order_through_short_writes(monkeypatch, tmp_path):
    """`amid tail` writes its batches with writev, which may write less than asked (a signal
    landing mid-write): the rest must follow, in order, at most IOV_MAX buffers a call."""
    from amid import cli
    real_writev = os.writev
    calls: list[int] = []

    def short_writev(fd: int, buffers) -> int:
        buffers = [bytes(b) for b in buffers]
        calls.append(len(buffers))
        joined = b"".join(buffers)
        cut = (len(buffers[0]) // 2, len(buffers[0]) + 3, len(joined))[len(calls) % 3]
        return real_writev(fd, [joined[:max(1, min(cut, len(joined)))]])

    monkeypatch.setattr(os, "writev", short_writev)
    chunks = [f"{i}:".encode() + b"x" * (i % 50) + b"\n" for i in range(3000)]
    path = tmp_path / "out"
    with path.open("wb") as out:
        cli._write_all(out, chunks)
    assert path.read_bytes() == b"".join(chunks)
    assert max(calls) == 1024 and len(calls) > 3
