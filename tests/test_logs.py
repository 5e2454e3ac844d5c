"""Logging setup: JSON lines, text lines, journald fields, idempotence, secret redaction, rate limiting."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from amid import logs
from amid.logs import JsonFormatter, RateLimitedLog, TextFormatter, redact_secrets, setup_logging

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def restore_root_logger():
    """setup_logging configures the root logger; put it back as pytest had it."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    access_level = logging.getLogger("aiohttp.access").level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(access_level)


def owned_handlers() -> list[logging.Handler]:
    return [h for h in logging.getLogger().handlers if getattr(h, logs._OWNED_MARK, False)]


# ---------------------------------------------------------------------------------------------------- json


def test_json_lines_parse_and_carry_extras() -> None:
    out = io.StringIO()
    setup_logging("json", "info", stream_json=out, stream_text=io.StringIO())
    log = logging.getLogger("amid.sinks.delivery")
    log.warning("delivery failed after %d attempts", 3, extra={"server": "pbx1", "sink": "webhook"})
    log.info("plain")

    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["level"] == "warning"
    assert first["logger"] == "amid.sinks.delivery"
    assert first["message"] == "delivery failed after 3 attempts"
    assert first["server"] == "pbx1" and first["sink"] == "webhook"
    assert first["ts"].endswith("Z") and "T" in first["ts"]
    assert list(first)[:4] == ["ts", "level", "logger", "message"]
    assert set(second) == {"ts", "level", "logger", "message"}


def test_json_exception_is_a_string_and_odd_values_do_not_break_it() -> None:
    out = io.StringIO()
    setup_logging("json", "debug", stream_json=out)
    log = logging.getLogger("amid.test")
    try:
        raise ValueError("bad frame")
    except ValueError:
        log.exception("parser crashed", extra={"server": "pbx1", "peer": ("10.0.0.1", 5038), "level": "spoof"})

    document = json.loads(out.getvalue())
    assert isinstance(document["exc"], str)
    assert "ValueError: bad frame" in document["exc"]
    assert document["peer"] == ["10.0.0.1", 5038]
    assert document["level"] == "error"  # core keys win over extras


def test_json_formatter_stands_alone() -> None:
    record = logging.LogRecord("amid", logging.ERROR, __file__, 1, "x=%s", ("é",), None)
    record.sink = object()
    document = json.loads(JsonFormatter().format(record))
    assert document["message"] == "x=é"
    assert document["sink"].startswith("<object object")


# ---------------------------------------------------------------------------------------------------- text


def test_text_format_appends_extras() -> None:
    err = io.StringIO()
    setup_logging("text", "info", stream_text=err, stream_json=io.StringIO())
    log = logging.getLogger("amid.session")
    log.warning("login failed", extra={"server": "pbx1", "sink": "webhook"})
    log.info("with spaces", extra={"reason": "connection refused"})
    log.info("no extras")

    lines = err.getvalue().splitlines()
    assert lines[0].endswith(" WARNING amid.session: login failed server=pbx1 sink=webhook")
    assert lines[0][:4].isdigit() and lines[0].split(" ", 1)[0].endswith("Z")
    assert lines[1].endswith('with spaces reason="connection refused"')
    assert lines[2].endswith("INFO amid.session: no extras")


def test_text_under_journald_uses_priority_prefixes(tmp_path) -> None:
    stderr_file = (tmp_path / "stderr").open("w")
    status = os.fstat(stderr_file.fileno())
    environ = {"JOURNAL_STREAM": f"{status.st_dev}:{status.st_ino}"}
    setup_logging("text", "debug", stream_text=stderr_file, environ=environ)
    log = logging.getLogger("amid.x")
    log.error("boom", extra={"sink": "file"})
    log.debug("detail")
    try:
        raise RuntimeError("inner")
    except RuntimeError:
        log.warning("caught", exc_info=True)
    stderr_file.flush()

    lines = (tmp_path / "stderr").read_text().splitlines()
    assert lines[0] == "<3>ERROR amid.x: boom sink=file"
    assert lines[1] == "<7>DEBUG amid.x: detail"
    assert lines[2] == "<4>WARNING amid.x: caught"
    assert all(line.startswith("<4>") for line in lines[3:])  # every traceback line keeps the priority
    assert lines[-1] == "<4>RuntimeError: inner"
    stderr_file.close()


def test_text_on_other_streams_has_timestamps(tmp_path) -> None:
    stderr_file = (tmp_path / "stderr").open("w")
    setup_logging("text", "info", stream_text=stderr_file, environ={"JOURNAL_STREAM": "1:2"})
    logging.getLogger("amid").info("hello")
    stderr_file.close()
    assert not (tmp_path / "stderr").read_text().startswith("<")


# ---------------------------------------------------------------------------------------- level, idempotence


def test_level_filters_records() -> None:
    out = io.StringIO()
    setup_logging("json", "WARNING", stream_json=out)
    log = logging.getLogger("amid.level")
    log.info("hidden")
    log.warning("shown")
    assert [json.loads(line)["message"] for line in out.getvalue().splitlines()] == ["shown"]

    setup_logging("json", "debug", stream_json=out)
    log.debug("now visible")
    assert json.loads(out.getvalue().splitlines()[-1])["message"] == "now visible"


def test_unknown_level_or_format_is_rejected() -> None:
    with pytest.raises(ValueError, match="log level"):
        setup_logging("text", "loud")
    with pytest.raises(ValueError, match="log format"):
        setup_logging("xml", "info")  # type: ignore[arg-type]


def test_setup_is_idempotent_and_leaves_foreign_handlers() -> None:
    foreign = logging.NullHandler()
    logging.getLogger().addHandler(foreign)
    first_out, second_out = io.StringIO(), io.StringIO()

    setup_logging("text", "info", stream_text=first_out)
    setup_logging("text", "info", stream_text=first_out)
    assert len(owned_handlers()) == 1
    setup_logging("json", "info", stream_json=second_out)
    assert len(owned_handlers()) == 1
    assert foreign in logging.getLogger().handlers

    logging.getLogger("amid").warning("once")
    assert first_out.getvalue() == ""
    assert len(second_out.getvalue().splitlines()) == 1
    logging.getLogger().removeHandler(foreign)


def test_access_log_is_quiet_at_info() -> None:
    setup_logging("text", "info", stream_text=io.StringIO())
    assert not logging.getLogger("aiohttp.access").isEnabledFor(logging.INFO)
    setup_logging("text", "error", stream_text=io.StringIO())
    assert not logging.getLogger("aiohttp.access").isEnabledFor(logging.WARNING)


# ---------------------------------------------------------------------------------------------------- secrets


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "Action: Login\r\nUsername: amid\r\nSecret: s3cret pass\r\n",
            "Action: Login\r\nUsername: amid\r\nSecret: ***\r\n",
        ),
        (repr(b"Action: Login\r\nKey: 0cc175b9\r\n"), repr(b"Action: Login\r\nKey: ***\r\n")),
        (repr({"Username": "amid", "secret": "s3cret"}), repr({"Username": "amid", "secret": "***"})),
        (repr([("Secret", "s3cret")]), repr([("Secret", "***")])),
        ("servers[0].secret: Field required", "servers[0].secret: Field required"),
        ("monkey: banana", "monkey: banana"),
        ("LoadCredential=ami-secret:/etc/amid/ami-secret", "LoadCredential=ami-secret:/etc/amid/ami-secret"),
        ("login refused, Secret: hunter2 rejected", "login refused, Secret: ***"),
    ],
)
def test_redact_secrets(text, expected) -> None:
    assert redact_secrets(text) == expected


def test_secrets_never_reach_any_format() -> None:
    out, err = io.StringIO(), io.StringIO()
    log = logging.getLogger("amid.ami.session")
    for fmt in ("json", "text"):
        setup_logging(fmt, "debug", stream_json=out, stream_text=err)
        log.debug("sent %r", b"Action: Login\r\nUsername: amid\r\nSecret: hunter2\r\n\r\n")
        try:
            raise RuntimeError("Action: Login\nSecret: hunter2")
        except RuntimeError:
            log.exception("failed")
    written = out.getvalue() + err.getvalue()
    assert "hunter2" not in written
    assert written.count("Secret: ***") >= 4  # message and exception text, in both formats


def test_bad_format_args_do_not_raise_from_the_filter() -> None:
    setup_logging("text", "info", stream_text=io.StringIO())
    logging.raiseExceptions, previous = False, logging.raiseExceptions
    try:
        logging.getLogger("amid").info("%d", "not a number")  # reported by the handler, not raised here
    finally:
        logging.raiseExceptions = previous


# ---------------------------------------------------------------------------------------------------- journal


def test_journal_handler_sends_priority_and_fields() -> None:
    pytest.importorskip("systemd.journal", reason="systemd-python (amid[systemd]) is not installed")
    sent: list[tuple[str, dict]] = []
    handler = logs.build_journal_handler(sender=lambda MESSAGE, **fields: sent.append((MESSAGE, fields)))
    handler.addFilter(logs.SecretRedactingFilter())
    log = logging.getLogger("amid.journal.fields")
    log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.DEBUG)
    try:
        log.error("sink down %s", "Secret: hunter2", extra={"server": "pbx1", "sink": "webhook"})
        log.debug("detail")
    finally:
        log.removeHandler(handler)
        log.propagate = True
        log.setLevel(logging.NOTSET)

    (message, fields), (_, debug_fields) = sent
    assert message == "sink down Secret: ***"
    assert fields["PRIORITY"] == "3"
    assert fields["SERVER"] == "pbx1" and fields["SINK"] == "webhook"
    assert fields["SYSLOG_IDENTIFIER"] == "amid"
    assert fields["LOGGER"] == "amid.journal.fields"
    assert "CODE_ARGS" not in fields  # args may carry secrets
    assert all(name == name.upper() and not name.startswith("_") for name in fields)
    assert debug_fields["PRIORITY"] == "7"


def test_journal_falls_back_to_text_without_systemd_python() -> None:
    def no_systemd_python() -> logging.Handler:
        raise ImportError("No module named 'systemd'")  # what build_journal_handler raises then
    err = io.StringIO()
    handler = setup_logging("journal", "info", stream_text=err, journal_handler=no_systemd_python)
    assert isinstance(handler.formatter, TextFormatter)
    logging.getLogger("amid").info("still logged")
    lines = err.getvalue().splitlines()
    assert "journal logging unavailable: systemd-python is not installed" in lines[0]
    assert "WARNING" in lines[0]
    assert lines[1].endswith("still logged")


def test_journal_falls_back_to_text_without_journald(tmp_path) -> None:
    pytest.importorskip("systemd.journal", reason="systemd-python (amid[systemd]) is not installed")
    err = io.StringIO()
    handler = setup_logging("journal", "info", stream_text=err, journal_socket=str(tmp_path / "no-journald"))
    assert isinstance(handler.formatter, TextFormatter)
    assert "journald is not running" in err.getvalue()


def _parse_native_journal(datagram: bytes) -> dict[str, str]:
    """Decode journald's native protocol: KEY=value lines, or KEY, 64-bit LE length, value for binary values."""
    fields: dict[str, str] = {}
    position = 0
    while position < len(datagram):
        line_end = datagram.index(b"\n", position)
        line = datagram[position:line_end]
        if b"=" in line:
            key, value = line.split(b"=", 1)
            position = line_end + 1
        else:
            key = line
            size = int.from_bytes(datagram[line_end + 1 : line_end + 9], "little")
            value = datagram[line_end + 9 : line_end + 9 + size]
            position = line_end + 9 + size + 1
        fields[key.decode()] = value.decode()
    return fields


_JOURNAL_CHILD = textwrap.dedent(
    """
    import logging
    from amid.logs import setup_logging
    handler = setup_logging("journal", "debug")
    assert type(handler).__name__ == "JournalHandler", handler
    log = logging.getLogger("amid.sinks.webhook")
    log.warning("retrying delivery", extra={"server": "pbx1", "sink": "webhook"})
    log.debug("sent %r", b"Action: Login\\r\\nSecret: hunter2\\r\\n")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("worker crashed", extra={"sink": "webhook"})
    """
)


def test_journal_over_the_real_native_protocol(tmp_path) -> None:
    """libsystemd's own sender writes to a socket we bind, in a private mount namespace where /run is ours."""
    pytest.importorskip("systemd.journal", reason="systemd-python (amid[systemd]) is not installed")
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare(1) is not installed")
    fake_run = tmp_path / "run"
    (fake_run / "systemd" / "journal").mkdir(parents=True)
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(fake_run / "systemd" / "journal" / "socket"))
    receiver.settimeout(5)
    try:
        environ = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        command = [unshare, "--mount", "sh", "-c", 'mount --bind "$0" /run && exec "$1" -c "$2"',
                   str(fake_run), sys.executable, _JOURNAL_CHILD]
        result = subprocess.run(command, env=environ, capture_output=True, text=True, timeout=60)
        if result.returncode != 0 and "Operation not permitted" in result.stderr:
            pytest.skip(f"cannot create a mount namespace here: {result.stderr.strip()}")
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""  # no "--- Logging error ---"
        entries = [_parse_native_journal(receiver.recv(65536)) for _ in range(3)]
    finally:
        receiver.close()

    warning, debug, error = entries
    assert warning["MESSAGE"] == "retrying delivery"
    assert warning["PRIORITY"] == "4"
    assert warning["SERVER"] == "pbx1" and warning["SINK"] == "webhook"
    assert warning["SYSLOG_IDENTIFIER"] == "amid"
    assert debug["PRIORITY"] == "7"
    assert "hunter2" not in debug["MESSAGE"] and "Secret: ***" in debug["MESSAGE"]
    assert error["PRIORITY"] == "3"
    assert "RuntimeError: boom" in error["EXCEPTION_TEXT"]
    assert error["SINK"] == "webhook"


# ---------------------------------------------------------------------------------------------------- rate limit


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rate_limited_log_counts_what_it_suppressed() -> None:
    out = io.StringIO()
    setup_logging("json", "info", stream_json=out)
    clock = FakeClock()
    limited = RateLimitedLog(logging.getLogger("amid.drops"), interval=10.0, clock=clock)

    assert limited.log("full:webhook", logging.WARNING, "queue full on %s", "webhook", extra={"sink": "webhook"})
    assert not limited.log("full:webhook", logging.WARNING, "queue full on %s", "webhook", extra={"sink": "webhook"})
    assert not limited.log("full:webhook", logging.WARNING, "queue full on %s", "webhook", extra={"sink": "webhook"})
    assert limited.log("full:file", logging.WARNING, "queue full on %s", "file")  # another key is independent
    clock.now += 10.0
    assert limited.log("full:webhook", logging.WARNING, "queue full on %s", "webhook", extra={"sink": "webhook"})
    clock.now += 10.0
    assert limited.log("full:webhook", logging.WARNING, "queue full on %s", "webhook")

    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["message"] for r in records] == [
        "queue full on webhook",
        "queue full on file",
        "queue full on webhook (2 similar messages suppressed)",
        "queue full on webhook",
    ]
    assert records[2]["suppressed"] == 2 and records[2]["sink"] == "webhook"
    assert "suppressed" not in records[3]


def test_rate_limited_log_bounds_its_keys() -> None:
    setup_logging("text", "info", stream_text=io.StringIO())
    limited = RateLimitedLog(logging.getLogger("amid.drops"), interval=60.0, clock=FakeClock(), max_keys=2)
    for key in ("a", "b", "c"):
        assert limited.log(key, logging.WARNING, "x")
    assert len(limited._state) == 2
    assert limited.log("a", logging.WARNING, "x")  # evicted, so logged again


def test_rate_limited_log_respects_the_level() -> None:
    setup_logging("text", "error", stream_text=io.StringIO())
    limited = RateLimitedLog(logging.getLogger("amid.drops"), interval=60.0, clock=FakeClock())
    assert not limited.log("k", logging.WARNING, "x")
