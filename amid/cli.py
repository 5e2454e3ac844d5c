"""The ``amid`` command: parses arguments, calls the library, the daemon or the simulator,
and decides exit codes. Nothing else in amid exits the process.

    amid run --config /etc/amid/amid.yaml     the daemon
    amid check-config --config FILE           validate a config, list every problem
    amid demo                                 simulator + daemon pipeline, JSON lines on stdout
    amid simulate --listen 127.0.0.1:5038     the Asterisk 22 AMI simulator
    amid tail --host pbx --username amid --secret-file F     print every event as JSON
    amid action --host pbx ... CoreShowChannels              send one action, print the answer
    amid healthcheck                          exit 0 if /readyz says ready (container HEALTHCHECK)
    amid top                                  live view of a running daemon's servers and sinks
    amid init-config > /etc/amid/amid.yaml    the commented sample config
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from amid import __version__
from amid.ami._accel import REASON, SPEEDUPS
from amid.ami.address import format_host

log = logging.getLogger("amid.cli")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_CONFIG = 78  # EX_CONFIG: systemd shows it as a configuration problem

DEFAULT_CONFIG = "/etc/amid/amid.yaml"


def _add_connection_args(p: argparse.ArgumentParser) -> None:
    env = os.environ
    p.add_argument("--host", default=env.get("AMID_HOST", "127.0.0.1"),
                   help="Asterisk host, optionally host:port ($AMID_HOST if set)")
    p.add_argument("--port", type=int, default=None,
                   help="AMI port (default: the one in --host, else 5038)")
    p.add_argument("--username", default=env.get("AMID_USERNAME"), help="AMI user ($AMID_USERNAME if set)")
    secret = p.add_mutually_exclusive_group()
    secret.add_argument("--secret", default=None,
                        help="AMI secret (visible in `ps`: prefer --secret-file or $AMID_SECRET)")
    secret.add_argument("--secret-file", default=env.get("AMID_SECRET_FILE"),
                        help="file holding the AMI secret ($AMID_SECRET_FILE if set)")
    p.add_argument("--auth", choices=("md5", "plain"), default="md5", help="login method")
    p.add_argument("--tls", action="store_true", help="connect with TLS")
    p.add_argument("--tls-ca", default=None, help="CA file to verify the server with")
    p.add_argument("--tls-no-verify", action="store_true", help="do not verify the server certificate")
    p.add_argument("--events", default="on", help="event mask sent at login (on, off, call,system,...)")
    p.add_argument("--timeout", type=float, default=10.0, help="connect/action timeout in seconds")


def _non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _speedups_text() -> str:
    if SPEEDUPS == "c":
        return "C accelerator"
    return f"pure Python: {REASON}"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none (None, off) or where the
    help text already says what it is."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (action.default is None or action.default is False
                or action.default == argparse.SUPPRESS or "default" in text
                or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="amid", description="Asterisk Manager Interface event daemon",
                                     formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version",
                        version=f"amid {__version__} (read path: {_speedups_text()})")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def logging_args(p: argparse.ArgumentParser, default_format: str | None = None,
                     from_config: bool = False, level: str = "info") -> None:
        default = "from the config, else text on stderr" if from_config else "text on stderr"
        p.add_argument("--log-format", choices=("text", "json", "journal"), default=default_format,
                       help=f"log format (default: {default})")
        level_default = "from the config, else info" if from_config else level
        p.add_argument("--log-level", default=None,
                       help=f"debug, info, warning, error (default: {level_default})")

    run = sub.add_parser("run", help="run the daemon")
    run.add_argument("--config", default=None,
                     help=f"config file (default $AMID_CONFIG, else {DEFAULT_CONFIG} if it exists; "
                          "without a file, AMID_* environment variables configure amid)")
    logging_args(run, from_config=True)

    check = sub.add_parser("check-config", help="validate a config file and list every problem")
    check.add_argument("--config", default=None, help="config file (default as for run)")

    demo = sub.add_parser("demo", help="simulator + daemon pipeline; events as JSON lines on stdout")
    demo.add_argument("--call-rate", type=_non_negative, default=2.0,
                      help="simulated calls per second (0: none)")
    demo.add_argument("--count", type=int, default=None, help="exit after this many events")
    logging_args(demo, level="warning")

    sim = sub.add_parser("simulate", help="run the Asterisk 22 AMI simulator")
    sim.add_argument("--listen", default="127.0.0.1:5038", help="host:port to listen on")
    sim.add_argument("--replay", default=None, help="serve this raw capture to every client")
    sim.add_argument("--replay-verbatim", action="store_true",
                     help="send the capture byte for byte, responses included, without answering "
                          "the client: its login gets no answer of its own (default: answer the "
                          "client's login and pings, play the events)")
    sim.add_argument("--replay-speed", type=float, default=0.0,
                     help="with --replay-verbatim: pace by the capture's .chunks timings times this "
                          "factor (0: as fast as possible)")
    sim.add_argument("--call-rate", type=_non_negative, default=0.0, help="calls per second to generate")
    sim.add_argument("--stream-rate", type=_non_negative, default=0.0,
                     help="numbered events per second to every session that logs in with events on "
                          "(call events with AmidTestSession/AmidTestSeq fields; 0: none)")
    sim.add_argument("--write-mode", choices=("per-event", "chunked"), default="per-event",
                     help="per-event: each event its own send(), as Asterisk writes (default); "
                          "chunked: the events due at one tick in one write")
    sim.add_argument("--stats-file", default=None,
                     help="write the counters and numbered streams as JSON here (twice a second, "
                          "and at exit)")
    sim.add_argument("--tls-cert", default=None, help="serve TLS with this certificate (PEM)")
    sim.add_argument("--tls-key", default=None, help="private key for --tls-cert")
    logging_args(sim)

    tail = sub.add_parser("tail", help="log in, ping, print every event as one JSON line")
    _add_connection_args(tail)
    tail.add_argument("--count", type=int, default=None, help="exit after N events")
    tail.add_argument("--raw", action="store_true",
                      help="write the raw bytes received instead (a capture `amid simulate --replay` plays)")
    tail.add_argument("--ping-interval", type=float, default=1.0, help="seconds between pings (default 1)")
    logging_args(tail, level="warning")

    action = sub.add_parser("action", help="send one action and print the response as JSON")
    _add_connection_args(action)
    action.add_argument("name", help="action name, e.g. CoreShowChannels")
    action.add_argument("fields", nargs="*", metavar="Key=Value", help="action fields")
    logging_args(action, level="warning")

    health = sub.add_parser("healthcheck", help="exit 0 if the daemon's /readyz answers 200")
    health.add_argument("--config", default=None,
                        help="config file whose http.listen to ask (default as for run: "
                             "$AMID_CONFIG, else /etc/amid/amid.yaml if it exists, with AMID_* "
                             "overrides)")
    health.add_argument("--url", default=None,
                        help="ask this URL instead (default: /readyz at the configured http.listen)")
    health.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")

    sub.add_parser("init-config", help="print the commented sample config "
                                       "(amid init-config > /etc/amid/amid.yaml)")

    top = sub.add_parser("top", help="live view of a running daemon (reads its /metrics); q quits")
    top.add_argument("--url", default="http://127.0.0.1:9180",
                     help="the daemon's http.listen address (default: %(default)s)")
    top.add_argument("--once", action="store_true",
                     help="print one plain snapshot (rates over --interval) and exit, for scripts")
    top.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (default: 1)")

    # Every subcommand, also one added elsewhere: its one-line summary heads its --help, and
    # its options show their defaults.
    for choice in sub._choices_actions:
        command = sub.choices[choice.dest]
        command.formatter_class = _HelpFormatter
        if not command.description:
            command.description = choice.help
    return parser


def _config_path(arg: str | None) -> str | None:
    path = arg or os.environ.get("AMID_CONFIG")
    if path:
        return path
    return DEFAULT_CONFIG if Path(DEFAULT_CONFIG).exists() else None


def _setup_logging(fmt: str | None, level: str | None, default_format: str = "text") -> None:
    from amid.logs import setup_logging
    setup_logging(fmt or default_format, (level or "info").lower())  # type: ignore[arg-type]


def _read_secret(args: argparse.Namespace) -> str:
    if args.secret is not None:
        return args.secret
    if args.secret_file:
        path = Path(args.secret_file).resolve()
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise SystemExit(f"amid: cannot read secret file {path}: {reason}") from None
        return text[:-1] if text.endswith("\n") else text
    secret = os.environ.get("AMID_SECRET")
    if secret is None:
        raise SystemExit("amid: give --secret-file FILE, --secret, or set AMID_SECRET")
    return secret


def _client_from_args(args: argparse.Namespace, **kw: Any):
    from amid.ami.address import parse_host
    from amid.ami.session import DEFAULT_PORT, AMIClient
    from amid.ami.tls import TlsSettings, client_context
    if not args.username:
        raise SystemExit("amid: --username is required (or set AMID_USERNAME)")
    try:
        host, port = parse_host(args.host, DEFAULT_PORT) if args.port is None else (args.host, args.port)
    except ValueError:
        raise SystemExit(f"amid: --host {args.host!r} is not HOST[:PORT]") from None
    tls = None
    if args.tls:
        if args.tls_ca and not Path(args.tls_ca).is_file():  # the ssl error does not name it
            raise SystemExit(f"amid: no --tls-ca file {args.tls_ca}")
        tls = client_context(TlsSettings(ca_file=args.tls_ca, verify=not args.tls_no_verify))
    try:
        return AMIClient(host, port, username=args.username, secret=_read_secret(args),
                         auth=args.auth, ssl=tls, events=args.events, connect_timeout=args.timeout,
                         action_timeout=args.timeout, **kw)
    except ValueError as exc:  # e.g. a port out of range
        raise SystemExit(f"amid: {exc}") from None


def _connect_failure(client: Any, exc: Exception) -> str:
    from amid.ami.session import LoginError
    if isinstance(exc, LoginError):  # Asterisk does not say whether the user or the secret is wrong
        return f"login to {client.host}:{client.port} as {client.username!r} failed: {exc}"
    return str(exc) or type(exc).__name__


def message_json(msg: Any) -> dict[str, Any]:
    from amid._encode import encode_record
    return json.loads(encode_record({"fields": msg.to_dict()}))["fields"]


# ---------------------------------------------------------------------------- commands

def cmd_check_config(args: argparse.Namespace) -> int:
    from amid.config import ConfigError
    from amid.service import config_warnings, load_config
    from amid.sinks.registry import SinkTypes
    path = _config_path(args.config)
    types = SinkTypes.discover()
    for err in types.errors:
        print(f"warning: {err}", file=sys.stderr)
    try:
        config = load_config(path, os.environ, types)
    except ConfigError as exc:
        print(f"{path or 'environment'}: invalid configuration:\n{exc}", file=sys.stderr)
        return EXIT_CONFIG
    for warning in config_warnings(config):
        print(f"warning: {warning}", file=sys.stderr)
    print(f"{path or 'environment'}: configuration OK")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from amid.config import ConfigError
    from amid.service import load_config, run_daemon
    from amid.sinks.registry import SinkTypes
    from amid.systemd import Notifier
    path = _config_path(args.config)
    types = SinkTypes.discover()
    try:
        config = load_config(path, os.environ, types)
    except ConfigError as exc:
        # Logging is not configured yet (its settings live in the config): plain stderr.
        print(f"amid: refusing to start, {path or 'environment'} is invalid:\n{exc}", file=sys.stderr)
        return EXIT_CONFIG
    _setup_logging(args.log_format or config.log.format, args.log_level or config.log.level)
    notifier = Notifier(os.environ)
    pinned = frozenset(key for key, value in (("level", args.log_level), ("format", args.log_format))
                       if value)
    return _run_loop(run_daemon(path, os.environ, notifier=notifier, config=config, types=types,
                                log_pinned=pinned))


def _run_loop(coro) -> int:
    try:
        import uvloop  # optional extra: amid[uvloop]
        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        return runner.run(coro)


async def _demo(args: argparse.Namespace, quiet: _QuietAfterReaderGone | None = None) -> int:
    """Simulator + the daemon's pipeline in one process; events as JSON lines on stdout."""
    import tempfile
    with tempfile.TemporaryDirectory(prefix="amid-demo-") as state_dir:
        return await _demo_in(args, Path(state_dir), quiet)


async def _demo_in(args: argparse.Namespace, state: Path, quiet: _QuietAfterReaderGone | None) -> int:
    import yaml

    from amid.service import Daemon, load_config
    from amid.simulator import AMISimulator
    from amid.sinks.registry import SinkTypes
    async with AMISimulator(call_rate=args.call_rate) as sim:
        demo_config = {
            "servers": [{"name": "demo", "host": "127.0.0.1", "port": sim.port, "username": "amid",
                         "secret": "amidsecret"}],
            "sinks": [{"name": "stdout", "type": "file", "path": "-", "batch": {"max_wait": "20ms"}}],
            "http": {"listen": None}, "state_dir": str(state), "shutdown_timeout": "5s",
        }
        config_path = state / "amid-demo.yaml"
        config_path.write_text(yaml.safe_dump(demo_config))
        types = SinkTypes.builtin()
        daemon = Daemon(load_config(str(config_path), {}, types), config_path=str(config_path),
                        environ={}, types=types)
        if args.count is not None:
            daemon.stop_after(args.count)
        if quiet is not None:
            quiet.reader_gone = lambda: daemon.sink_is_disabled("stdout")
        print(f"amid demo: simulator on 127.0.0.1:{sim.port}, {args.call_rate:g} calls/s; "
              "events follow as JSON lines (Ctrl-C to stop)", file=sys.stderr)
        if not args.call_rate:
            print("amid demo: --call-rate 0 starts no calls: only the login's two events come",
                  file=sys.stderr)

        async def stop_when_reader_gone() -> None:
            # `amid demo | head`: the stdout sink is disabled (its queue dropped) once the reader
            # of the pipe is gone; stop as `yes | head` does.
            await daemon.sink_disabled("stdout")
            daemon.request_stop()
        stopper = asyncio.create_task(stop_when_reader_gone())
        try:
            return await daemon.run()
        finally:
            stopper.cancel()


class _QuietAfterReaderGone(logging.Filter):
    """`amid demo | head`: once the reader of stdout is gone, the stdout sink's complaints
    (disabled, events dropped) are expected, and not worth a screenful."""

    def __init__(self) -> None:
        super().__init__()
        self.reader_gone: Callable[[], bool] = lambda: False  # set by the demo (a Daemon hook)

    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(record, "sink", None) != "stdout" or not self.reader_gone()


def cmd_demo(args: argparse.Namespace) -> int:
    _setup_logging(args.log_format, args.log_level or "warning")
    quiet = _QuietAfterReaderGone()
    for handler in logging.getLogger().handlers:
        handler.addFilter(quiet)
    return _run_loop(_demo(args, quiet))


def cmd_simulate(args: argparse.Namespace) -> int:
    from amid.ami.protocol import ProtocolError
    from amid.simulator.server import parse_listen, serve_forever
    _setup_logging(args.log_format, args.log_level)
    try:
        host, _ = parse_listen(args.listen)
    except ValueError as exc:
        print(f"amid simulate: --listen {args.listen!r}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    for flag, file in (("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key)):
        if file and not Path(file).is_file():  # the ssl module's error does not name the file
            print(f"amid simulate: no {flag} file {file}", file=sys.stderr)
            return EXIT_USAGE
    options: dict[str, Any] = {"tls_cert": args.tls_cert, "tls_key": args.tls_key}
    if args.replay:
        if not Path(args.replay).is_file():
            print(f"amid simulate: no capture file {args.replay}", file=sys.stderr)
            return EXIT_USAGE
        options.update(replay=args.replay, interactive=not args.replay_verbatim,
                       speed=args.replay_speed or None)
    else:
        options.update(call_rate=args.call_rate, stream_rate=args.stream_rate,
                       write_mode=args.write_mode, stats_file=args.stats_file)

    def listening(port: int) -> None:  # called once the socket is bound
        what = f"replaying {args.replay}" if args.replay else "user amid / secret amidsecret"
        if args.tls_cert:
            what = f"TLS; {what}"
        print(f"amid simulate: listening on {format_host(host)}:{port} ({what})", file=sys.stderr)

    async def main() -> int:
        task = asyncio.create_task(serve_forever(args.listen, ready=listening, **options))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        try:
            await task
        except asyncio.CancelledError:
            pass
        except ProtocolError as exc:  # --replay of a file that is not an AMI capture
            print(f"amid simulate: {args.replay} is not an AMI capture: {exc}", file=sys.stderr)
            return EXIT_FAILURE
        except (OSError, ValueError) as exc:  # address in use, unreadable certificate...
            print(f"amid simulate: cannot serve on {args.listen}: {exc}", file=sys.stderr)
            return EXIT_FAILURE
        return EXIT_OK
    return _run_loop(main())


class _StdoutWriter:
    """Writes to stdout from a thread, fed by a queue: a slow pager or a full pipe must not
    stall the event loop (Asterisk drops a client that stops reading for ~100 ms), and a reader
    that went away (``amid tail | head``) ends the command quietly."""

    def __init__(self, out: BinaryIO | None = None, limit_bytes: int = 256 << 20) -> None:
        self._out = out
        self._chunks: list[bytes] = []
        self._size = 0
        self._in_flight = 0
        self._limit = limit_bytes
        self._wakeup = asyncio.Event()
        self.closed = asyncio.Event()   # stdout is gone, or the writer gave up
        self.error: str | None = None
        self._finishing = False

    @property
    def unwritten(self) -> int:
        """Bytes queued or being written that stdout has not taken yet."""
        return self._size + self._in_flight

    def write(self, data: bytes) -> None:
        if self.closed.is_set():
            return
        if self._size + len(data) > self._limit:
            self.error = "stdout is not keeping up (more than 256 MiB waiting)"
            self.closed.set()
            return
        self._chunks.append(data)
        self._size += len(data)
        self._wakeup.set()

    async def run(self) -> None:
        out = self._out or sys.stdout.buffer
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            chunks, self._chunks, size, self._size = self._chunks, [], self._size, 0
            if chunks:
                self._in_flight = size
                try:
                    await asyncio.to_thread(_write_all, out, chunks)
                except OSError:  # BrokenPipeError included: the reader went away
                    self.closed.set()
                    return
                self._in_flight = 0
            if self._finishing and not self._chunks:
                return

    async def finish(self, task: asyncio.Task[None], interrupted: asyncio.Event) -> bool:
        """Write out everything queued, then end ``task`` (the :meth:`run` task). A live reader
        gets all of it however slowly it reads (``amid tail --count N | less``: the pager reads
        as the user pages); only ``interrupted`` (a second SIGINT/SIGTERM) gives up. True when
        nothing was given up."""
        self._finishing = True
        self._wakeup.set()
        from amid.ami.aio import first_of
        await first_of(task, interrupted.wait())
        return task.done()


_IOV_MAX = 1024  # the smallest IOV_MAX Linux and the BSDs allow


def _write_all(out: BinaryIO, chunks: list[bytes]) -> None:
    """Write ``chunks`` in order with ``writev`` (one syscall for up to 1024 batches, no
    copy into one big buffer: at 250k events/s that copy and its fresh pages cost a quarter of
    `amid tail`'s time), or joined where ``out`` has no file descriptor."""
    try:
        fd = out.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both
        out.write(b"".join(chunks))
        out.flush()
        return
    out.flush()  # nothing should be buffered there; if it is, it goes first
    pending: list[bytes | memoryview] = list(chunks)
    while pending:
        batch = pending[:_IOV_MAX]
        written = os.writev(fd, batch)
        done = 0
        for piece in batch:
            if written < len(piece):
                pending[done] = memoryview(piece)[written:]
                break
            written -= len(piece)
            done += 1
        del pending[:done]


async def _tail(args: argparse.Namespace) -> int:
    from amid.ami.aio import cancel_and_wait, first_of
    from amid.records import Record
    writer = _StdoutWriter()
    writer_task = asyncio.create_task(writer.run())
    done = asyncio.Event()
    interrupted = asyncio.Event()  # a second signal while the last events are written out
    seen = 0
    client = _client_from_args(args, ping_interval=args.ping_interval,
                               ping_timeout=max(2.0, args.ping_interval))

    def on_events(events: list) -> None:
        # The daemon's read path: every event of one read at once, their records encoded in
        # one call and written with one write.
        nonlocal seen
        if done.is_set():
            return
        if args.count is not None and seen + len(events) >= args.count:
            events = events[:args.count - seen]
            done.set()
        seen += len(events)
        if not args.raw and events:
            lines = Record.jsons(Record.of_events(events, "tail"))
            lines.append(b"")  # the last line's newline, in the same join (one copy, not two)
            writer.write(b"\n".join(lines))

    def on_signal() -> None:
        (interrupted if done.is_set() else done).set()

    if args.raw:
        client.add_raw_listener(writer.write)
    client.add_batch_listener(on_events)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    try:
        try:
            await client.connect()
        except Exception as exc:  # connection or login problems: one clear line, no traceback
            print(f"amid tail: {_connect_failure(client, exc)}", file=sys.stderr)
            return EXIT_FAILURE
        await first_of(writer.closed.wait(), done.wait())
        await client.close()
        if not await writer.finish(writer_task, interrupted):
            writer.error = f"interrupted with {writer.unwritten:,} bytes of events not yet written to stdout"
    finally:
        await cancel_and_wait(writer_task)
    if writer.error:
        print(f"amid tail: {writer.error}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def cmd_tail(args: argparse.Namespace) -> int:
    _setup_logging(args.log_format, args.log_level or "warning")
    return _run_loop(_tail(args))


def _parse_fields(items: Sequence[str]) -> list[tuple[str, str]]:
    fields = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"amid action: field {item!r} is not Key=Value")
        fields.append((key, value))
    return fields


async def _action(args: argparse.Namespace) -> int:
    client = _client_from_args(args, reconnect=False, ping_interval=0)
    fields = _parse_fields(args.fields)
    try:
        await client.connect()
    except Exception as exc:
        print(f"amid action: {_connect_failure(client, exc)}", file=sys.stderr)
        return EXIT_FAILURE
    try:
        response = await client.send_action(args.name, fields)
    except Exception as exc:
        print(f"amid action: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        await client.close()
    result: dict[str, Any] = {"response": message_json(response)}
    if response.events or response.list_complete is not None:
        result["events"] = [message_json(e) for e in response.events]
        if response.list_complete is not None:
            result["complete"] = message_json(response.list_complete)
    print(json.dumps(result, ensure_ascii=False, indent=2))
    return EXIT_FAILURE if response.is_error else EXIT_OK


def cmd_action(args: argparse.Namespace) -> int:
    _setup_logging(args.log_format, args.log_level or "warning")
    return _run_loop(_action(args))


def cmd_top(args: argparse.Namespace) -> int:
    from amid.top import run_top
    return run_top(args.url, once=args.once, interval=args.interval)


def cmd_healthcheck(args: argparse.Namespace) -> int:
    from amid.http import healthcheck
    url = args.url or _configured_readyz(args.config)
    if url is None:
        return EXIT_FAILURE
    return healthcheck(url, args.timeout, out=sys.stdout)


def _configured_readyz(config_arg: str | None) -> str | None:
    """The /readyz URL of the http.listen the daemon reads (the same file and AMID_*
    variables as ``amid run``); None, said on stdout, when there is none to ask."""
    from amid.config import ConfigError
    from amid.service import load_config
    from amid.sinks.registry import SinkTypes
    path = _config_path(config_arg)
    try:
        config = load_config(path, os.environ, SinkTypes.discover())
    except ConfigError as exc:
        print(f"amid healthcheck: {path or 'environment'} is invalid:\n{exc}")
        return None
    address = config.http.address
    if address is None:
        print("amid healthcheck: http.listen is off: no /readyz to ask")
        return None
    host, port = address
    # A wildcard listens on loopback too; ask there.
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://{format_host(host)}:{port}/readyz"


def cmd_init_config(args: argparse.Namespace) -> int:
    from importlib.resources import files
    sys.stdout.buffer.write(files("amid").joinpath("sample-config.yaml").read_bytes())
    sys.stdout.flush()
    return EXIT_OK


COMMANDS = {"run": cmd_run, "check-config": cmd_check_config, "demo": cmd_demo,
            "simulate": cmd_simulate, "tail": cmd_tail, "action": cmd_action,
            "healthcheck": cmd_healthcheck, "top": cmd_top, "init-config": cmd_init_config}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "simulate":
        if bool(args.tls_cert) != bool(args.tls_key):
            parser.error("simulate: --tls-cert and --tls-key go together")
        if args.replay_speed and not args.replay_verbatim:
            parser.error("simulate: --replay-speed needs --replay-verbatim (an interactive replay "
                         "plays the events as fast as the client reads)")
        if (args.replay_verbatim or args.replay_speed) and not args.replay:
            parser.error("simulate: --replay-verbatim and --replay-speed need --replay FILE")
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `amid tail | head`: the reader went away; not an error worth a traceback.
        with contextlib.suppress(Exception):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - stays open for the interpreter's exit
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
