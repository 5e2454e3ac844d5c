"""Tests of amid.config: the example, every error kind with its line, env overrides, secrets."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Literal

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, ConfigDict, SecretStr, ValidationError

from amid.config import Config, ConfigError, Problem, load, parse_duration, parse_size

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "amid.yaml"
SECRET = "s3cr3t-Value-42"


class FileOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str
    fsync: Literal["never", "interval", "batch"] = "interval"


class WebhookOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)
    url: str
    secret: SecretStr | None = None


MODELS = {"file": FileOptions, "webhook": WebhookOptions}

MINIMAL = """\
servers:
  - host: 127.0.0.1
    username: amid
    secret: amidsecret
"""


def write(tmp_path: Path, text: str, name: str = "amid.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def line_of(path: Path, needle: str, occurrence: int = 1) -> int:
    """1-based line of the n-th line containing ``needle`` (so tests do not hard-code numbers)."""
    found = [number for number, line in enumerate(path.read_text().splitlines(), 1)
             if needle in line]
    return found[occurrence - 1]


def problems_of(path: Path | None, environ: dict[str, str] | None = None,
                models: dict | None = None) -> list[Problem]:
    with pytest.raises(ConfigError) as info:
        load(path, environ or {}, sink_option_models=MODELS if models is None else models)
    return info.value.problems


def only_problem(path: Path | None, environ: dict[str, str] | None = None) -> Problem:
    problems = problems_of(path, environ)
    assert len(problems) == 1, problems
    return problems[0]


# --- the example ---------------------------------------------------------------------------


def test_example_loads_against_the_simulator_settings():
    config = load(EXAMPLE, {}, sink_option_models={"file": FileOptions})

    assert isinstance(config, Config)
    [server] = config.servers
    assert (server.name, server.host, server.port) == ("pbx1", "127.0.0.1", 5038)
    assert (server.username, server.secret, server.auth) == ("amid", "amidsecret", "md5")
    assert server.tls is None and server.events is True
    assert (server.ping_interval, server.ping_timeout) == (20.0, 5.0)
    assert server.max_message_bytes == 1024 * 1024
    [sink] = config.sinks  # the syslog and webhook sinks are commented out
    assert (sink.name, sink.type, sink.overflow) == ("events-file", "file", "spool")
    assert sink.options == FileOptions(path="amid-events.jsonl")
    assert sink.spool.fsync_interval == 0.1
    assert sink.queue.max_bytes == 64 * 1024**2
    assert config.http.address == ("127.0.0.1", 9180)
    assert config.state_dir == Path("amid-state")
    assert sink.dead_letter == Path("amid-state/dead-letter/events-file.jsonl")
    assert config.shutdown_timeout == 20.0 and config.start_timeout == 30.0
    assert (config.log.level, config.log.format) == ("info", "text")


def test_example_loads_with_the_real_sink_option_models():
    pytest.importorskip("amid.sinks.file")
    config = load(EXAMPLE, {})
    assert config.sinks[0].options.path == "amid-events.jsonl"


def test_state_directory_from_systemd_is_the_default_state_dir(tmp_path):
    config = load(EXAMPLE, {"STATE_DIRECTORY": f"{tmp_path}/a:{tmp_path}/b"},
                  sink_option_models=MODELS)
    assert config.state_dir == tmp_path / "a"
    assert config.sinks[0].dead_letter == tmp_path / "a" / "dead-letter" / "events-file.jsonl"


def test_minimal_config_gets_documented_defaults(tmp_path):
    config = load(write(tmp_path, MINIMAL), {}, sink_option_models=MODELS)
    [server] = config.servers
    assert (server.name, server.port, server.auth) == ("default", 5038, "md5")
    assert server.reconnect.min_delay == 1.0 and server.reconnect.max_delay == 60.0
    assert config.sinks == ()
    assert config.http.listen == "127.0.0.1:9180"


def test_config_is_immutable(tmp_path):
    config = load(write(tmp_path, MINIMAL), {}, sink_option_models=MODELS)
    with pytest.raises(ValidationError):
        config.servers[0].port = 1  # type: ignore[misc]


def test_short_forms(tmp_path):
    path = write(tmp_path, """\
        servers:
          - host: "[::1]:5039"
            username: amid
            secret: 0123
            tls: true
            events: [call, System]
            filters: ["Event: Newchannel", "!Event: VarSet"]
        sinks:
          - type: file
            path: out.jsonl
            include: Newchannel
            match: {Priority: 1, Context: "from-*"}
            queue:
        http:
          listen: ""
        """)
    config = load(path, {}, sink_option_models=MODELS)
    [server] = config.servers
    assert (server.host, server.port) == ("::1", 5039)
    assert server.secret == "0123"  # as written, not the YAML integer 123
    assert server.tls is not None and server.tls.verify is True
    assert server.events == ("call", "system")
    assert server.filters == ("Event: Newchannel", "!Event: VarSet")
    [sink] = config.sinks
    assert sink.name == "file"  # defaults to the type
    assert sink.include == ("Newchannel",)
    assert sink.match == {"Priority": "1", "Context": "from-*"}
    assert sink.queue.max_events == 100_000  # an empty section means all defaults
    assert config.http.listen is None and config.http.address is None
    off = load(write(tmp_path, MINIMAL + "http: {listen: off}\n", "off.yaml"), {},
               sink_option_models=MODELS)
    assert off.http.listen is None


def test_plugin_type_without_a_model_keeps_its_keys_as_a_dict(tmp_path):
    path = write(tmp_path, MINIMAL + "sinks:\n  - type: kafka\n    topic: ami\n")
    config = load(path, {}, sink_option_models={"kafka": None})
    assert config.sinks[0].options == {"topic": "ami"}


# --- every error kind, with its line -------------------------------------------------------


@pytest.mark.parametrize(("yaml_text", "needle", "path", "message"), [
    (MINIMAL + "    port: abc\n", "port: abc", "servers[0].port",
     "Input should be a valid integer"),
    (MINIMAL + "    hots: x\n", "hots: x", "servers[0].hots", "unknown key (did you mean 'host'?)"),
    (MINIMAL + "colour: blue\n", "colour:", "colour", "unknown key"),
    (MINIMAL + "    ping_interval: 5x\n", "ping_interval", "servers[0].ping_interval",
     "invalid duration '5x'"),
    (MINIMAL + "    ping_timeout: -1s\n", "ping_timeout", "servers[0].ping_timeout",
     "cannot be negative"),
    (MINIMAL + "    ping_timeout: 0\n", "ping_timeout", "servers[0].ping_timeout",
     "greater than 0"),
    (MINIMAL + "    max_message_bytes: 12 parsecs\n", "max_message_bytes",
     "servers[0].max_message_bytes", "invalid size"),
    (MINIMAL + "    auth: sha1\n", "auth:", "servers[0].auth", "'md5' or 'plain'"),
    (MINIMAL + "    events: [call, cal]\n", "events:", "servers[0].events",
     "unknown event class 'cal'"),
    (MINIMAL + "    filters: [\"Event: A\\r\\nAction: Logoff\"]\n", "filters:",
     "servers[0].filters[0]", "must not contain a line break"),
    (MINIMAL + "    reconnect: {min_delay: 10s, max_delay: 1s}\n", "reconnect:",
     "servers[0].reconnect.max_delay", "must not be less than min_delay"),
    (MINIMAL + "    tls: {key_file: k.pem}\n", "tls:", "servers[0].tls.key_file",
     "needs cert_file"),
    (MINIMAL + "    tls: yes please\n", "tls:", "servers[0].tls", "true, false or a mapping"),
    (MINIMAL.replace("127.0.0.1", "pbx:5038") + "    port: 5039\n", "host:",
     "servers[0].host", "port is also given"),
    (MINIMAL.replace("127.0.0.1", "pbx:http"), "host:", "servers[0].host", "invalid port"),
    (MINIMAL.replace("    username: amid\n", ""), "- host", "servers[0].username",
     "required key is missing"),
    (MINIMAL.replace("    secret: amidsecret\n", ""), "- host", "servers[0].secret",
     "give secret or secret_file"),
    (MINIMAL + "    secret_file: x\n", "secret_file", "servers[0].secret_file",
     "give either secret or secret_file, not both"),
    (MINIMAL + "    name: pbx 1\n", "name: pbx", "servers[0].name", "only letters, digits"),
    ("servers: []\n", "servers:", "servers", "at least one server is required"),
    ("servers: {host: pbx}\n", "servers:", "servers", "Input should be a list"),
    (MINIMAL + "http: {listen: 9180}\n", "http:", "http.listen", "must be host:port"),
    (MINIMAL + "http: {listen: on}\n", "http:", "http.listen", "off disables it"),
    (MINIMAL + "http: {listen: localhost}\n", "http:", "http.listen", "must be host:port"),
    (MINIMAL + "log: {format: xml}\n", "log:", "log.format", "'text', 'json' or 'journal'"),
    (MINIMAL + "state_dir: ${NOPE}/x\n", "state_dir", "state_dir",
     "environment variable NOPE is not set"),
    (MINIMAL + "sinks:\n  - type: file\n    path: x\n    pathh: x\n", "pathh", "sinks[0].pathh",
     "unknown key (did you mean 'path'?)"),
    (MINIMAL + "sinks:\n  - type: file\n", "- type: file", "sinks[0].path",
     "required key is missing"),
    (MINIMAL + "sinks:\n  - type: file\n    path: x\n    fsync: always\n", "fsync:",
     "sinks[0].fsync", "'never', 'interval' or 'batch'"),
    (MINIMAL + "sinks:\n  - type: kafka\n", "type: kafka", "sinks[0].type",
     "unknown sink type 'kafka' (known types: file, webhook)"),
    (MINIMAL + "sinks:\n  - name: a\n", "- name: a", "sinks[0].type", "required key is missing"),
    (MINIMAL + "sinks:\n  - type: file\n    path: x\n    overflow: block\n", "overflow",
     "sinks[0].overflow", "'drop_oldest', 'drop_newest' or 'spool'"),
    (MINIMAL + "sinks:\n  - type: file\n    path: x\n    spool: {fsync_interval: 1s}\n",
     "spool:", "sinks[0].spool.fsync_interval", "less than or equal to 0.1"),
    (MINIMAL + "sinks:\n  - type: file\n    path: x\n    queue:\n      max_event: 5\n",
     "max_event:", "sinks[0].queue.max_event", "unknown key (did you mean 'max_events'?)"),
    (MINIMAL + "sinks:\n  - type: file\n    path: x\n    retry: {min_delay: 1m, max_delay: 1s}\n",
     "retry:", "sinks[0].retry.max_delay", "must not be less than min_delay"),
    (MINIMAL + "sinks:\n  - type: file\n    path: x\n    batch: {max_bytes: 0}\n",
     "batch:", "sinks[0].batch.max_bytes", "greater than 0"),
])
def test_each_error_names_its_key_and_line(tmp_path, yaml_text, needle, path, message):
    config_path = write(tmp_path, yaml_text)
    problem = only_problem(config_path)
    assert problem.path == path
    assert problem.line == line_of(config_path, needle)
    assert message in problem.message
    assert str(problem) == f"{config_path}:{problem.line}: {path}: {problem.message}"


def test_error_line_format_matches_the_documented_shape(tmp_path):
    config_path = write(tmp_path, MINIMAL + "    port: abc\n")
    with pytest.raises(ConfigError) as info:
        load(config_path, {}, sink_option_models=MODELS)
    assert str(info.value).startswith(f"{config_path}:5: servers[0].port: Input should be a "
                                      "valid integer")


def test_yaml_syntax_error_names_the_line(tmp_path):
    config_path = write(tmp_path, MINIMAL + "sinks:\n  - type: file\n   path: [x\n")
    problem = only_problem(config_path)
    assert problem.path == ""
    assert problem.line == line_of(config_path, "path: [x")
    assert str(problem).startswith(f"{config_path}:{problem.line}: YAML syntax error: ")


def test_duplicate_yaml_keys_are_errors(tmp_path):
    config_path = write(tmp_path, MINIMAL + "    port: 1\n    port: 2\n")
    problem = only_problem(config_path)
    assert problem.path == "servers[0].port"
    assert problem.line == line_of(config_path, "port: 2")
    assert problem.message == f"duplicate key (first given on line {line_of(config_path, 'port: 1')})"


def test_missing_file_is_a_clear_error(tmp_path):
    problem = only_problem(tmp_path / "nope.yaml")
    assert str(problem) == f"{tmp_path / 'nope.yaml'}: config file not found"


def test_top_level_must_be_a_mapping(tmp_path):
    problem = only_problem(write(tmp_path, "- servers\n"))
    assert "top level must be a mapping" in problem.message


def test_empty_file_and_no_file_need_a_server(tmp_path):
    for path in (write(tmp_path, "# nothing yet\n"), None):
        problem = only_problem(path)
        assert problem.path == "servers" and "at least one server" in problem.message


def test_duplicate_and_missing_names(tmp_path):
    config_path = write(tmp_path, """\
        servers:
          - {name: a, host: h, username: u, secret: s}
          - {name: a, host: h, username: u, secret: s}
          - {host: h, username: u, secret: s}
        sinks:
          - {type: file, path: x}
          - {type: file, path: y}
        """)
    problems = problems_of(config_path)
    assert [(p.path, p.line, p.message) for p in problems] == [
        ("servers[1].name", 3, "duplicate server name 'a' (also used by servers[0])"),
        ("servers[2]", 4, "name is required when there is more than one server"),
        ("sinks[1].name", 7, "duplicate sink name 'file' (also used by sinks[0])"),
    ]


def test_every_problem_is_reported_at_once_in_file_order(tmp_path):
    config_path = write(tmp_path, """\
        servers:
          - name: pbx1
            host: pbx1
            port: many
            username: amid
            secret: x
          - name: pbx2
            host: pbx2
            username: amid
            secret: x
            ping_interval: soon
        sinks:
          - name: out
            type: file
            pathh: out.jsonl
          - name: hook
            type: webhook
            url: http://127.0.0.1:8080/
            overflow: maybe
          - name: out
            type: smoke-signals
        shutdown_timeout: -5
        """)
    with pytest.raises(ConfigError) as info:
        load(config_path, {}, sink_option_models=MODELS)
    expected = [
        (4, "servers[0].port"),
        (11, "servers[1].ping_interval"),
        (15, "sinks[0].pathh"),  # the typo is one problem: no "sinks[0].path is missing" too
        (19, "sinks[1].overflow"),
        (20, "sinks[2].name"),  # duplicate
        (21, "sinks[2].type"),  # unknown type
        (22, "shutdown_timeout"),
    ]
    assert [(p.line, p.path) for p in info.value.problems] == expected
    lines = str(info.value).splitlines()
    assert len(lines) == len(info.value.problems) == len(expected)
    assert all(line.startswith(f"{config_path}:") for line in lines)


# --- durations and sizes -------------------------------------------------------------------


@pytest.mark.parametrize(("text", "seconds"), [
    ("5s", 5.0), ("250ms", 0.25), ("1m", 60.0), ("1h", 3600.0), ("1.5s", 1.5), ("1d", 86400.0),
    ("1m30s", 90.0), ("2 s", 2.0), ("10", 10.0), ("0.5", 0.5), (3, 3.0), (0.1, 0.1), (0, 0.0),
    ("1S", 1.0), (".5s", 0.5),
])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["-1s", -1, "5x", "", "s", "1s5", "fast", True, None, [1],
                                 float("nan"), float("inf"), "1 m 30 s"])
def test_parse_duration_refuses(bad):
    with pytest.raises(ValueError):
        parse_duration(bad)


@pytest.mark.parametrize(("text", "size"), [
    (0, 0), (1024, 1024), ("1024", 1024), ("512k", 512 * 1024), ("512KiB", 512 * 1024),
    ("64MiB", 64 * 1024**2), ("64m", 64 * 1024**2), ("1GiB", 1024**3), ("1GB", 10**9),
    ("1KB", 1000), ("1MB", 10**6), ("100B", 100), ("1.5MiB", 1536 * 1024), ("2 MiB", 2 * 1024**2),
    (4096.0, 4096),
])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["-1", -1, "1XB", "MiB", "", True, None, 1.5, "64 MiB 2"])
def test_parse_size_refuses(bad):
    with pytest.raises(ValueError):
        parse_size(bad)


@given(st.integers(min_value=0, max_value=10**9),
       st.sampled_from([("ms", 0.001), ("s", 1), ("m", 60), ("h", 3600), ("", 1)]))
def test_duration_round_trip(number, unit):
    suffix, factor = unit
    assert math.isclose(parse_duration(f"{number}{suffix}"), number * factor, rel_tol=1e-12)


@given(st.integers(min_value=0, max_value=2**40),
       st.sampled_from([("", 1), ("B", 1), ("k", 1024), ("KiB", 1024), ("KB", 1000),
                        ("MiB", 1024**2), ("MB", 1000**2), ("GiB", 1024**3)]))
def test_size_round_trip(number, unit):
    suffix, factor = unit
    assert parse_size(f"{number}{suffix}") == number * factor


@given(st.floats(min_value=0, max_value=1e9, allow_nan=False))
def test_duration_of_a_plain_number_is_that_number(seconds):
    assert parse_duration(seconds) == seconds
    assert parse_duration(repr(seconds)) == seconds


# --- environment overrides -----------------------------------------------------------------


def test_environment_overrides_nested_keys(tmp_path):
    config = load(EXAMPLE, {
        "AMID_SERVERS__0__HOST": "pbx.example.net",
        "AMID_SERVERS__PBX1__PORT": "5039",          # by name, parsed as a YAML integer
        "AMID_SERVERS__0__TLS": "on",                  # YAML boolean
        "AMID_SERVERS__0__EVENTS": "[call, system]",   # YAML flow list
        "amid_http__listen": "0.0.0.0:9999",           # case-insensitive
        "AMID_LOG__FORMAT": "json",
        "AMID_SINKS__EVENTS_FILE__PATH": "/data/events.jsonl",  # "-" in the name matches "_"
        "AMID_SINKS__0__QUEUE__MAX_BYTES": "1MiB",
        "AMID_CONFIG": "/somewhere/else.yaml",         # the CLI's, ignored here
        "AMID_PURE_PYTHON": "1",                       # amid.ami._accel's, ignored here
        "OTHER": "x",
    }, sink_option_models=MODELS)
    server = config.servers[0]
    assert (server.host, server.port, server.events) == ("pbx.example.net", 5039, ("call", "system"))
    assert server.tls is not None
    assert config.http.address == ("0.0.0.0", 9999)
    assert config.log.format == "json"
    assert config.sinks[0].options.path == "/data/events.jsonl"
    assert config.sinks[0].queue.max_bytes == 1024**2


def test_unnamed_sink_is_addressed_by_its_type(tmp_path):
    path = write(tmp_path, MINIMAL + "sinks:\n  - type: file\n    path: x\n")
    config = load(path, {"AMID_SINKS__FILE__PATH": "y"}, sink_option_models=MODELS)
    assert config.sinks[0].options.path == "y"


def test_yaml_anchors_and_merge_keys_work(tmp_path):
    path = write(tmp_path, """\
        x-common: &common {username: amid, secret: amidsecret, ping_interval: 5s}
        servers:
          - {<<: *common, name: a, host: pbx1}
          - {<<: *common, name: b, host: pbx2, ping_interval: 1s}
        """)
    problem = only_problem(path)  # x-common is not a key of ours
    assert (problem.path, problem.line) == ("x-common", 1)
    path.write_text(path.read_text().replace("x-common: &common", "log: {level: DEBUG}\n_c: &common"))
    problem = only_problem(path)
    assert (problem.path, problem.message) == ("_c", "unknown key")


def test_one_server_shortcut_without_a_file(tmp_path):
    config = load(None, {"AMID_HOST": "pbx:5040", "AMID_USERNAME": "amid",
                         "AMID_SECRET": "0123", "AMID_SINKS__0__TYPE": "file",
                         "AMID_SINKS__0__PATH": "out.jsonl", "AMID_HTTP__LISTEN": ""},
                  sink_option_models=MODELS)
    [server] = config.servers
    assert (server.name, server.host, server.port, server.username) == ("default", "pbx", 5040,
                                                                        "amid")
    assert server.secret == "0123"  # secrets are taken verbatim, never parsed as YAML
    assert config.sinks[0].options.path == "out.jsonl"
    assert config.http.listen is None


def test_shortcut_overrides_the_first_server_of_the_file_and_secret_file_replaces_secret(
        tmp_path):
    secret_file = tmp_path / "ami-secret"
    secret_file.write_text(f"{SECRET}\n")
    config = load(EXAMPLE, {"AMID_PORT": "6000", "AMID_SECRET_FILE": str(secret_file)},
                  sink_option_models=MODELS)
    assert config.servers[0].port == 6000
    assert config.servers[0].secret == SECRET


def test_secret_file_in_the_environment_with_credentials_directory(tmp_path):
    (tmp_path / "ami").write_text("from-credentials\n")
    config = load(None, {"AMID_HOST": "pbx", "AMID_USERNAME": "u", "AMID_SECRET_FILE": "ami",
                         "CREDENTIALS_DIRECTORY": str(tmp_path)}, sink_option_models=MODELS)
    assert config.servers[0].secret == "from-credentials"


def test_environment_problems_name_the_variable(tmp_path):
    problems = problems_of(EXAMPLE, {
        "AMID_SERVERS__0__PORT": "many",
        "AMID_SINKS__EVENTS_FILE__PATHH": "x",
        "AMID_SINKS__NOPE__PATH": "x",
        "AMID_SERVERS__3__HOST": "x",
        "AMID_SERVERS____HOST": "x",
        "AMID_COLOUR": "blue",
    })
    by_source = {p.env_var: p for p in problems}
    assert set(by_source) == {"AMID_SERVERS__0__PORT", "AMID_SINKS__EVENTS_FILE__PATHH",
                              "AMID_SINKS__NOPE__PATH", "AMID_SERVERS__3__HOST",
                              "AMID_SERVERS____HOST", "AMID_COLOUR"}
    assert all(p.line is None for p in problems)
    assert str(by_source["AMID_SERVERS__0__PORT"]) == (
        "AMID_SERVERS__0__PORT (environment): servers[0].port: Input should be a valid integer, "
        "unable to parse string as an integer")
    assert by_source["AMID_SINKS__EVENTS_FILE__PATHH"].path == "sinks[0].pathh"
    assert "no item named 'nope' (names: events-file)" in by_source["AMID_SINKS__NOPE__PATH"].message
    assert "index 3 is out of range: there are 1 items" in by_source["AMID_SERVERS__3__HOST"].message
    assert "empty part" in by_source["AMID_SERVERS____HOST"].message
    assert (by_source["AMID_COLOUR"].path, by_source["AMID_COLOUR"].message) == ("colour",
                                                                               "unknown key")


def test_unreadable_secret_file_from_environment_names_the_variable(tmp_path):
    problem = only_problem(EXAMPLE, {"AMID_SECRET_FILE": str(tmp_path / "missing")})
    assert problem.env_var == "AMID_SECRET_FILE" and problem.path == "servers[0].secret_file"
    assert str(tmp_path / "missing") in problem.message


# --- secrets -------------------------------------------------------------------------------


def test_secrets_never_appear_in_repr_str_or_errors(tmp_path):
    hook_secret = tmp_path / "hook-secret"
    hook_secret.write_text("hook-" + SECRET)
    good = write(tmp_path, f"""\
        servers:
          - host: pbx
            username: amid
            secret: {SECRET}
        sinks:
          - type: webhook
            url: http://127.0.0.1:8080/events
            secret_file: {hook_secret}
        """)
    config = load(good, {}, sink_option_models=MODELS)
    assert config.servers[0].secret == SECRET
    assert config.sinks[0].options.secret.get_secret_value() == "hook-" + SECRET
    for text in (repr(config), str(config), repr(config.servers[0]), str(config.sinks)):
        assert SECRET not in text

    bad = write(tmp_path, f"""\
        servers:
          - host: pbx
            port: nope
            username: [amid]
            secret: {SECRET}
            secret_file: {hook_secret}
        password: {SECRET}
        sinks:
          - type: webhook
            url: 42
            secret: {SECRET}
            password_file: {hook_secret}
        """, name="bad.yaml")
    with pytest.raises(ConfigError) as info:
        load(bad, {"AMID_SERVERS__0__SECRET": SECRET}, sink_option_models=MODELS)
    assert len(info.value.problems) >= 4
    assert SECRET not in str(info.value) and SECRET not in repr(info.value.problems)


def test_secret_file_strips_one_trailing_newline(tmp_path):
    (tmp_path / "s").write_text("line\n")
    path = write(tmp_path, MINIMAL.replace("secret: amidsecret", f"secret_file: {tmp_path}/s"))
    assert load(path, {}, sink_option_models=MODELS).servers[0].secret == "line"


def test_relative_secret_file_uses_credentials_directory(tmp_path, monkeypatch):
    credentials = tmp_path / "creds"
    credentials.mkdir()
    (credentials / "ami-secret").write_text("from-credentials\n")
    (tmp_path / "ami-secret").write_text("from-cwd\n")
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, MINIMAL.replace("secret: amidsecret", "secret_file: ami-secret"))

    with_credentials = load(path, {"CREDENTIALS_DIRECTORY": str(credentials)},
                            sink_option_models=MODELS)
    without = load(path, {}, sink_option_models=MODELS)
    assert with_credentials.servers[0].secret == "from-credentials"
    assert without.servers[0].secret == "from-cwd"


def test_absolute_secret_file_ignores_credentials_directory(tmp_path):
    (tmp_path / "abs").write_text("absolute")
    path = write(tmp_path, MINIMAL.replace("secret: amidsecret", f"secret_file: {tmp_path}/abs"))
    config = load(path, {"CREDENTIALS_DIRECTORY": "/nonexistent"}, sink_option_models=MODELS)
    assert config.servers[0].secret == "absolute"


def test_variables_expand_in_file_keys_and_state_dir(tmp_path):
    (tmp_path / "ami").write_text("expanded")
    path = write(tmp_path, MINIMAL.replace("secret: amidsecret", "secret_file: ${SECRETS}/ami")
                 + "state_dir: ${DATA}/state\n")
    config = load(path, {"SECRETS": str(tmp_path), "DATA": "/var/lib/x"},
                  sink_option_models=MODELS)
    assert config.servers[0].secret == "expanded"
    assert config.state_dir == Path("/var/lib/x/state")


def test_unreadable_secret_file_names_key_line_and_path_not_content(tmp_path):
    directory = tmp_path / "a-directory"
    directory.mkdir()
    path = write(tmp_path, MINIMAL.replace("secret: amidsecret", f"secret_file: {directory}"))
    problem = only_problem(path)
    assert problem.path == "servers[0].secret_file"
    assert problem.line == line_of(path, "secret_file")
    assert f"cannot read {directory}: Is a directory" == problem.message


def test_empty_secret_file_is_an_error_at_the_file_key(tmp_path):
    (tmp_path / "empty").write_text("\n")
    path = write(tmp_path, MINIMAL.replace("secret: amidsecret", f"secret_file: {tmp_path}/empty"))
    problem = only_problem(path)
    assert (problem.path, problem.line) == ("servers[0].secret_file", line_of(path, "secret_file"))
    assert "at least 1 character" in problem.message


def test_sink_option_secret_file_both_given_is_an_error(tmp_path):
    path = write(tmp_path, MINIMAL + "sinks:\n  - type: webhook\n    url: http://h/\n"
                 "    secret: a\n    secret_file: /x\n")
    problem = only_problem(path)
    assert (problem.path, problem.line) == ("sinks[0].secret_file", line_of(path, "secret_file"))


def test_sink_options_take_durations_and_sizes_like_the_rest_of_the_config(tmp_path):
    """The built-in sinks' own keys use the same units as amid's keys (5s, 250ms, 4KiB)."""
    from amid.service import SinkTypes
    path = tmp_path / "units.yaml"
    path.write_text(
        "servers: [{host: pbx, username: amid, secret: x}]\n"
        "sinks:\n"
        "  - {name: f, type: file, path: /tmp/x.jsonl, fsync_interval: 250ms, rotate_bytes: 4KiB}\n"
        "  - {name: s, type: syslog, address: 'udp://127.0.0.1:514', send_timeout: 2s,"
        " udp_max_bytes: 4KiB}\n"
        "  - {name: w, type: webhook, url: 'http://127.0.0.1:1/x', timeout: 1m}\n")
    config = load(path, {}, sink_option_models=SinkTypes.discover().option_models)
    file_opts, syslog_opts, webhook_opts = (s.options for s in config.sinks)
    assert file_opts.fsync_interval == 0.25 and file_opts.rotate_bytes == 4096
    assert syslog_opts.send_timeout == 2.0 and syslog_opts.udp_max_bytes == 4096
    assert webhook_opts.timeout == 60.0


def test_a_secret_with_a_line_break_is_refused_without_showing_it(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("TOPSECRET\n\n")      # one trailing newline is stripped, the second is not
    path = tmp_path / "c.yaml"
    path.write_text(f"servers:\n  - host: pbx\n    username: amid\n    secret_file: {secret}\n")
    with pytest.raises(ConfigError) as err:
        load(path, {})
    text = str(err.value)
    assert "servers[0].secret" in text and "line break" in text and "TOPSECRET" not in text


# ---------------------------------------------------------------------------------------
# Operator polish (issue 16) and every problem of every sink (issue 13)


def real_problems(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> list[str]:
    """check-config's lines for ``text``, validated with the real sink option models."""
    from amid.service import SinkTypes
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load(path, environ or {}, sink_option_models=SinkTypes.discover().option_models)
    return [f"{p.path}: {p.message}" for p in info.value.problems]


def test_a_typo_in_a_key_is_one_problem_not_also_a_missing_key(tmp_path):
    problems = real_problems(tmp_path, MINIMAL + """\
sinks:
  - {name: out, type: file, pathh: out.jsonl}
  - {name: hook, type: webhook, urll: "http://127.0.0.1:1/"}
servers_x: 1
""")
    assert problems == [
        "sinks[0].pathh: unknown key (did you mean 'path'?)",
        "sinks[1].urll: unknown key (did you mean 'url'?)",
        "servers_x: unknown key (did you mean 'servers'?)",
    ]
    # A missing key with no typo nearby is still reported as missing.
    assert real_problems(tmp_path, MINIMAL + "sinks: [{name: out, type: file}]\n") == [
        "sinks[0].path: required key is missing"]


def test_every_problem_of_every_sink_is_listed(tmp_path):
    """A sink's checks across keys (its model's own validator) are not hidden by another bad
    key of the same sink, e.g. a bad whsec_ secret next to a bad timeout."""
    problems = real_problems(tmp_path, MINIMAL + """\
sinks:
  - name: hook
    type: webhook
    url: http://127.0.0.1:1/
    secret: whsec_!!!
    timeout: soon
    tls_ca_file: /etc/ssl/ca.pem
  - {name: out, type: file, path: "-", rotate_bytes: 1MiB, mode: rw}
  - {name: log, type: syslog, address: "udp://127.0.0.1:514", tcp_framing: lf, facility: nope}
""")
    assert problems == [
        "sinks[0].secret: secret #1: the part after whsec_ is not valid base64",
        ("sinks[0].timeout: invalid duration 'soon': use a number of seconds or e.g. '250ms', "
         "'5s', '1m', '1h'"),
        "sinks[0].tls_ca_file: tls_ca_file needs an https:// url",
        "sinks[1].mode: mode must be octal permission bits like 0640, not 'rw'",
        "sinks[1]: rotate_bytes cannot be used with path '-' (standard output)",
        next(p for p in problems if p.startswith("sinks[2].facility: unknown facility 'nope'")),
        "sinks[2]: tcp_framing only applies to a tcp:// or tls:// address",
    ]


def test_messages_carry_no_library_prefixes(tmp_path):
    problems = real_problems(tmp_path, MINIMAL + """\
sinks:
  - {name: out, type: file, path: "-", rotate_bytes: 1MiB}
  - {name: log, type: syslog, address: "udp://127.0.0.1:514", tls_verify: false}
  - {name: hook, type: webhook, url: "http://127.0.0.1:1/", tls_key_file: /k}
""")
    assert len(problems) == 3, problems
    for problem in problems:
        assert not any(prefix in problem for prefix in ("Value error", "Assertion failed",
                                                        "value_error")), problem


@pytest.mark.parametrize("value", ["-", "yes", "no", "on", "off", "123", "0x1F", "1.5", "null",
                                   "~", "[a, b]", "{a: b}", "#1", "2026-12-05", "'quoted'"])
def test_string_settings_from_the_environment_stay_strings(tmp_path, value):
    from amid.service import SinkTypes
    path = write(tmp_path, """\
        servers: [{host: 127.0.0.1, username: amid, secret: x}]
        sinks: [{name: out, type: file, path: out.jsonl},
                {name: log, type: syslog, address: "udp://127.0.0.1:514"}]
        """)
    environ = {"AMID_SINKS__0__PATH": value, "AMID_SERVERS__0__USERNAME": value,
               "AMID_SINKS__LOG__APP_NAME": value}
    config = load(path, environ, sink_option_models=SinkTypes.discover().option_models)
    assert config.sinks[0].options.path == value
    assert config.servers[0].username == value
    assert config.sinks[1].options.app_name == value


def test_environment_values_of_other_types_are_still_yaml(tmp_path):
    environ = {"AMID_HOST": "127.0.0.1", "AMID_USERNAME": "amid", "AMID_SECRET": "x",
               "AMID_PORT": "5039", "AMID_SERVERS__0__EVENTS": "[call, system]",
               "AMID_SERVERS__0__TLS": "true", "AMID_STATE_DIR": "", "AMID_HTTP__LISTEN": "off"}
    config = load(None, environ, sink_option_models=MODELS)
    server = config.servers[0]
    assert (server.port, server.events, server.tls is not None) == (5039, ("call", "system"), True)
    assert config.http.listen is None
    assert config.state_dir == Path("amid-state")  # empty: null, so the default
    assert load(None, {**environ, "AMID_HTTP__LISTEN": "null"},
                sink_option_models=MODELS).http.listen is None
    assert load(None, {**environ, "AMID_HTTP__LISTEN": "127.0.0.1:9"},
                sink_option_models=MODELS).http.listen == "127.0.0.1:9"


def test_a_webhook_batches_for_10ms_unless_the_config_says_otherwise(tmp_path):
    path = write(tmp_path, MINIMAL + """\
sinks:
  - {name: hook, type: webhook, url: "http://127.0.0.1:9/x"}
  - {name: hook0, type: webhook, url: "http://127.0.0.1:9/x", batch: {max_wait: 0s}}
  - {name: hook_events, type: webhook, url: "http://127.0.0.1:9/x", batch: {max_events: 50}}
  - {name: file, type: file, path: /tmp/x.jsonl}
""")
    sinks = {sink.name: sink for sink in load(path, {}).sinks}
    assert sinks["hook"].batch.max_wait == 0.010
    assert sinks["hook0"].batch.max_wait == 0.0, "the config's own setting wins"
    assert (sinks["hook_events"].batch.max_wait, sinks["hook_events"].batch.max_events) == (0.010, 50)
    assert sinks["file"].batch.max_wait == 0.0, "other types send at once"
