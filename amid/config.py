"""Load and validate the amid configuration: ``load(path, environ) -> Config``.

``load`` reads a YAML file (or nothing, when ``path`` is None), applies environment
overrides, resolves ``*_file`` secrets, validates everything with pydantic and returns a
frozen :class:`Config`. When anything is wrong it raises :class:`ConfigError` listing
*every* problem at once, each naming the key path and the YAML line (or the environment
variable) it comes from::

    config/amid.yaml:14: servers[0].port: Input should be a valid integer
    config/amid.yaml:9: sinks[0].pathh: unknown key
    AMID_HTTP__LISTEN (environment): http.listen: invalid port 'x'

It never configures logging, prints or exits: the CLI decides what to do with the error.

Values
    Durations: ``5s``, ``250ms``, ``1m``, ``1h``, ``1d``, ``1m30s``, or a plain number of
    seconds. Sizes: a plain number of bytes, ``512k``/``512KiB`` (1024), ``64MiB``, ``1GiB``,
    ``1KB``/``1MB``/``1GB`` (powers of 1000). Unknown keys are errors everywhere.

Secrets
    Every secret-bearing key (``secret``, ``password``, ``*_secret``, ``*_password``, also
    inside a sink's own keys) may instead be given as ``<key>_file``: the file is read and
    one trailing newline stripped. Giving both is an error. A relative ``*_file`` path of a
    secret is resolved against ``$CREDENTIALS_DIRECTORY`` (systemd ``LoadCredential=``) when
    that is set, else against the working directory. Sink options models therefore declare
    only ``<key>``, never ``<key>_file``. Secret values never appear in ``repr()`` or errors.

    ``${VAR}`` in the string value of any ``*_file`` key, of ``state_dir`` and of a sink's
    ``dead_letter`` is replaced from the environment; an unset variable is an error.

Environment overrides (container use)
    ``AMID_<PATH>=<value>`` sets one value before validation. ``<PATH>`` is the key path with
    parts separated by ``__``, case-insensitive; a list item is addressed by its index or by
    its ``name`` (compared case-insensitively, ``-`` and ``.`` matching ``_``)::

        AMID_SERVERS__0__HOST=pbx               servers[0].host
        AMID_SERVERS__PBX1__SECRET_FILE=/run/secrets/ami
        AMID_HTTP__LISTEN=0.0.0.0:9180
        AMID_LOG__FORMAT=json
        AMID_SINKS__EVENTS_FILE__PATH=/data/events.jsonl
        AMID_SINKS__1__TYPE=webhook             index == length appends a new item

    Shortcuts for the one-server case: ``AMID_HOST``, ``AMID_PORT``, ``AMID_USERNAME``,
    ``AMID_SECRET``, ``AMID_SECRET_FILE`` address ``servers[0]`` (created when missing).
    Values are parsed as YAML (``true``, ``5038``, ``on``, ``[call, system]`` work; an empty
    value is null), except secrets, ``*_file`` paths and every string-typed setting, which
    are taken verbatim (``AMID_SINKS__0__PATH=-`` is stdout, ``AMID_USERNAME=yes`` the user
    "yes"; a setting that may be null is null for an empty value, ``null`` or ``~``). Setting
    ``<key>`` removes ``<key>_file`` from the same mapping and vice versa, so an override
    replaces whichever form the file used. ``AMID_CONFIG`` (the CLI reads it) and ``AMID_PURE_PYTHON``
    (see amid.ami._accel) are not config keys.
    Missing mappings along the path are created; a scalar in the way is replaced.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from annotated_types import Ge, Gt, Le
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from amid.ami.address import split_host_port
from amid.sinks.base import BatchDefaults
from amid.sinks.registry import SinkTypes, SinkTypeUnavailable
from amid.units import (
    DeprecatedKeys,
    Duration,
    PositiveDuration,
    PositiveSize,
    Size,
    TlsConfig,
    TlsSetting,
    parse_duration,
    parse_size,
)

__all__ = [
    "Config",
    "ConfigError",
    "DeprecatedKeys",
    "Duration",
    "HttpConfig",
    "LogConfig",
    "PositiveDuration",
    "PositiveSize",
    "Problem",
    "ServerConfig",
    "SinkConfig",
    "Size",
    "TlsConfig",
    "load",
    "parse_duration",
    "parse_size",
    "split_host_port",
]

DEFAULT_STATE_DIR = "amid-state"
ENV_PREFIX = "AMID_"
# Environment variables with the AMID_ prefix that are not config overrides.
_ENV_IGNORED = frozenset({"AMID_CONFIG", "AMID_PURE_PYTHON"})  # the CLI's; amid.ami._accel's
_SERVER_SHORTCUTS = frozenset({"host", "port", "username", "secret", "secret_file"})

Loc = tuple[str | int, ...]


# ---------------------------------------------------------------------------------------
# Problems and the error


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the configuration.

    ``path`` is the key path (``servers[0].port``; empty for whole-file problems), ``line``
    the 1-based YAML line or None, ``source`` the config file name (None without a file),
    ``env_var`` the environment variable the offending value came from (then ``line`` is None).
    """

    path: str
    line: int | None
    message: str
    source: str | None = None
    env_var: str | None = None

    def __str__(self) -> str:
        if self.env_var is not None:
            where = f"{self.env_var} (environment): "
        elif self.source is not None:
            where = f"{self.source}:{self.line}: " if self.line is not None else f"{self.source}: "
        else:
            where = f"line {self.line}: " if self.line is not None else ""
        return f"{where}{self.path}: {self.message}" if self.path else f"{where}{self.message}"


class ConfigError(Exception):
    """The configuration is invalid; ``problems`` lists every problem found."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = list(problems)
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join(str(p) for p in self.problems)


# ---------------------------------------------------------------------------------------
# Durations and sizes

# ---------------------------------------------------------------------------------------
# Small value validators


def _field_error(field: str, message: str) -> PydanticCustomError:
    """An error a model-level validator attributes to one of its fields (see _loc_of)."""
    return PydanticCustomError("amid_field", "{message}", {"message": message, "field": field})


_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def _check_name(value: str) -> str:
    if not _NAME.fullmatch(value):
        raise PydanticCustomError(
            "name", "a name may contain only letters, digits, '_', '.' and '-'")
    return value


Name = Annotated[str, AfterValidator(_check_name)]


def _none_is_empty_section(value: Any) -> Any:
    # "queue:" with every line commented out is YAML null: treat it as "all defaults".
    return {} if value is None else value


def _one_or_more(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


_EVENT_CLASSES = frozenset({
    "system", "call", "log", "verbose", "command", "agent", "user", "config", "dtmf",
    "reporting", "cdr", "dialplan", "originate", "agi", "cc", "aoc", "test", "security",
    "message", "all",
})


def _parse_events(value: Any) -> bool | tuple[str, ...]:
    """``on``/``off`` (YAML booleans or strings) or a list of AMI event classes."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("on", "off"):
        return value.strip().lower() == "on"
    if isinstance(value, str):
        value = [part for part in value.split(",")]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        classes = tuple(v.strip().lower() for v in value)
        unknown = [c for c in classes if c not in _EVENT_CLASSES]
        if unknown:
            raise PydanticCustomError(
                "events", "unknown event class {unknown}; known: {known}",
                {"unknown": ", ".join(repr(c) for c in unknown),
                 "known": ", ".join(sorted(_EVENT_CLASSES))})
        return classes
    raise PydanticCustomError("events", "events must be on, off or a list of event classes")


def _check_single_line(value: str) -> str:
    if "\r" in value or "\n" in value:
        raise PydanticCustomError("single_line", "must not contain a line break")
    return value


SingleLine = Annotated[str, AfterValidator(_check_single_line)]


# ---------------------------------------------------------------------------------------
# The models


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)


class ReconnectConfig(_Model):
    """Bounds of the reconnect backoff."""

    min_delay: PositiveDuration = 1.0
    max_delay: PositiveDuration = 60.0
    # A session lost sooner than this after its login counts as a failed attempt.
    stable_after: Annotated[Duration, Ge(0)] = 10.0

    @model_validator(mode="after")
    def _ordered(self) -> ReconnectConfig:
        if self.min_delay > self.max_delay:
            raise _field_error("max_delay", "max_delay must not be less than min_delay")
        return self


class ServerConfig(_Model):
    """One Asterisk AMI endpoint. ``secret`` is the resolved secret (hidden from repr)."""

    name: Name = "default"
    host: Annotated[str, Field(min_length=1)]
    port: Annotated[int, Field(ge=1, le=65535)] = 5038
    username: Annotated[str, Field(min_length=1), AfterValidator(_check_single_line)]
    # A line break would end the AMI header (a secret file with an extra blank line, a YAML
    # block scalar): refused here, with the key and line, instead of failing every login.
    secret: Annotated[str, Field(min_length=1, repr=False), AfterValidator(_check_single_line)]
    auth: Literal["md5", "plain"] = "md5"
    tls: TlsSetting = None
    ping_interval: PositiveDuration = 20.0
    ping_timeout: PositiveDuration = 5.0
    connect_timeout: PositiveDuration = 10.0
    action_timeout: PositiveDuration = 10.0
    reconnect: Annotated[ReconnectConfig, BeforeValidator(_none_is_empty_section)] = \
        ReconnectConfig()
    events: Annotated[bool | tuple[str, ...], PlainValidator(_parse_events)] = True
    filters: tuple[SingleLine, ...] = ()
    max_message_bytes: PositiveSize = 1024 * 1024
    # More malformed messages than this within malformed_window drop the connection.
    max_malformed: Annotated[int, Ge(0)] = 100
    malformed_window: PositiveDuration = 60.0
    # After a small read, leave the socket this long so one read carries many of Asterisk's
    # one-event writes (the daemon's cost is per read); 0 reads at once.
    read_coalesce: Annotated[Duration, Ge(0), Le(0.05)] = 0.002

    @model_validator(mode="before")
    @classmethod
    def _port_from_host(cls, data: Any) -> Any:
        # "host: pbx:5038" is accepted when port is not given too; the host validator
        # reports the conflict otherwise.
        if isinstance(data, dict) and isinstance(data.get("host"), str) and "port" not in data:
            try:
                host, port = split_host_port(data["host"])
            except ValueError:
                return data
            if port is not None:
                data = {**data, "host": host, "port": port}
        return data

    @field_validator("host")
    @classmethod
    def _host_without_port(cls, value: str) -> str:
        try:
            _, port = split_host_port(value)
        except ValueError as exc:
            raise PydanticCustomError("host", "{reason}", {"reason": str(exc)}) from None
        if port is not None:
            raise PydanticCustomError(
                "host", "host includes a port and port is also given: give the port once")
        return value


class QueueConfig(_Model):
    """Bounds of a sink's in-memory queue."""

    max_events: Annotated[int, Gt(0)] = 100_000
    max_bytes: PositiveSize = 64 * 1024**2


class SpoolConfig(_Model):
    """The disk spool (used only with ``overflow: spool``)."""

    max_bytes: PositiveSize = 1024**3
    fallback: Literal["drop_oldest", "drop_newest"] = "drop_oldest"
    fsync_interval: Annotated[PositiveDuration, Field(le=0.1)] = 0.1


class BatchConfig(_Model):
    """How a sink's worker groups events into one ``send``."""

    max_events: Annotated[int, Gt(0)] = 500
    max_bytes: PositiveSize = 1024**2
    # 0: send what is queued at once; while a send is in flight the next batch fills up by
    # itself, so batches grow with the load and a quiet PBX gets no added latency.
    max_wait: Annotated[Duration, Ge(0)] = 0.0


class RetryConfig(_Model):
    """Bounds of the delivery retry backoff (capped exponential, full jitter)."""

    min_delay: PositiveDuration = 0.5
    max_delay: PositiveDuration = 30.0
    # A start or send attempt still running after this is abandoned and retried: a guard for
    # sinks that never answer (built-in sinks time out sooner, on their own network waits).
    attempt_timeout: PositiveDuration = 120.0

    @model_validator(mode="after")
    def _ordered(self) -> RetryConfig:
        if self.min_delay > self.max_delay:
            raise _field_error("max_delay", "max_delay must not be less than min_delay")
        return self


def _match_values(value: Any) -> Any:
    # "Priority: 1" is an int in YAML but a glob for us.
    if isinstance(value, Mapping):
        return {k: str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
                for k, v in value.items()}
    return value


class SinkConfig(_Model):
    """One sink: routing filter, delivery settings, and its type's validated ``options``.

    ``dead_letter`` is filled in by :func:`load` (default
    ``<state_dir>/dead-letter/<name>.jsonl``), so it is never None in a loaded Config.
    """

    name: Name
    type: Annotated[str, Field(min_length=1)]
    include: Annotated[tuple[Annotated[str, Field(min_length=1)], ...],
                       BeforeValidator(_one_or_more)] = ("*",)
    exclude: Annotated[tuple[Annotated[str, Field(min_length=1)], ...],
                       BeforeValidator(_one_or_more)] = ()
    match: Annotated[dict[str, str], BeforeValidator(_match_values)] = Field(default_factory=dict)
    overflow: Literal["drop_oldest", "drop_newest", "spool"] = "drop_oldest"
    queue: Annotated[QueueConfig, BeforeValidator(_none_is_empty_section)] = QueueConfig()
    spool: Annotated[SpoolConfig, BeforeValidator(_none_is_empty_section)] = SpoolConfig()
    batch: Annotated[BatchConfig, BeforeValidator(_none_is_empty_section)] = BatchConfig()
    retry: Annotated[RetryConfig, BeforeValidator(_none_is_empty_section)] = RetryConfig()
    dead_letter: Path | None = None
    # The type-specific keys, validated by that type's options model before this model is
    # built (a plain dict for a type registered without a model).
    options: Any = None


# The keys every sink has; all other keys of a sink mapping belong to its type.
_SINK_COMMON_KEYS = frozenset(SinkConfig.model_fields) - {"options"}


class HttpConfig(_Model):
    """The metrics/health HTTP server. ``listen`` None disables it."""

    listen: str | None = "127.0.0.1:9180"

    @field_validator("listen", mode="before")
    @classmethod
    def _empty_disables(cls, value: Any) -> Any:
        if value == "" or value is False:  # `listen: ""`, or `off` (YAML's false)
            return None
        if isinstance(value, str) and value.strip().lower() in ("off", "null", "~"):
            return None  # AMID_HTTP__LISTEN=off: environment values of a string stay strings
        if isinstance(value, (bool, int)):  # `listen: 9180`, `on`
            raise PydanticCustomError("listen", "listen must be host:port, e.g. 127.0.0.1:9180 "
                                      "(null, \"\" or off disables it)")
        return value

    @field_validator("listen")
    @classmethod
    def _host_and_port(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                _, port = split_host_port(value)
            except ValueError as exc:
                raise PydanticCustomError("listen", "{reason}", {"reason": str(exc)}) from None
            if port is None:
                raise PydanticCustomError("listen", "listen must be host:port, e.g. "
                                          "127.0.0.1:9180 or [::1]:9180")
        return value

    @property
    def address(self) -> tuple[str, int] | None:
        """``(host, port)`` to bind, or None when disabled."""
        if self.listen is None:
            return None
        host, port = split_host_port(self.listen)
        assert port is not None  # checked by the validator
        return host, port


class LogConfig(_Model):
    """Logging settings (applied by ``amid.logs``, never by the loader)."""

    level: Annotated[Literal["debug", "info", "warning", "error", "critical"],
                     BeforeValidator(lambda v: v.lower() if isinstance(v, str) else v)] = "info"
    format: Literal["text", "json", "journal"] = "text"


def _at_least_one_server(value: tuple[ServerConfig, ...]) -> tuple[ServerConfig, ...]:
    if not value:
        raise PydanticCustomError(
            "servers", "at least one server is required (in the config file, or with "
                       "AMID_HOST, AMID_USERNAME and AMID_SECRET)")
    return value


class Config(_Model):
    """The validated configuration."""

    servers: Annotated[tuple[ServerConfig, ...], AfterValidator(_at_least_one_server)]
    sinks: tuple[SinkConfig, ...] = ()
    http: Annotated[HttpConfig, BeforeValidator(_none_is_empty_section)] = HttpConfig()
    state_dir: Path = Path(DEFAULT_STATE_DIR)
    shutdown_timeout: PositiveDuration = 20.0
    start_timeout: Annotated[Duration, Ge(0)] = 30.0
    log: Annotated[LogConfig, BeforeValidator(_none_is_empty_section)] = LogConfig()


# ---------------------------------------------------------------------------------------
# The loader


def load(path: str | os.PathLike[str] | None, environ: Mapping[str, str], *,
         sink_option_models: Mapping[str, Any] | None = None) -> Config:
    """Read, override, validate; return the Config or raise ConfigError with every problem.

    ``path`` None means no file: the configuration is built from ``AMID_*`` environment
    overrides and defaults. ``sink_option_models`` maps a sink ``type`` to the pydantic
    model of that type's own keys (a value of None accepts any keys as a plain dict, e.g.
    for a plugin without a model); a lookup may raise (the type cannot be loaded: the sink is
    refused with that reason). By default the built-in types of :mod:`amid.sinks.registry`
    (``SinkTypes.discover().option_models`` adds the plugins), each imported only if used.
    """
    loader = _Loader(None if path is None else os.fspath(path), environ)
    models: Mapping[str, Any] = (SinkTypes.builtin().option_models if sink_option_models is None
                                 else sink_option_models)
    return loader.run(models)


class _Loader:
    """One load: the raw data plus where every value came from."""

    def __init__(self, path: str | None, environ: Mapping[str, str]) -> None:
        self.path = path
        self.environ = environ
        self.problems: list[Problem] = []
        self.lines: dict[Loc, int] = {}        # key path -> YAML line of the key/item
        self.env_origin: dict[Loc, str] = {}   # key path -> environment variable that set it
        self.renamed: dict[Loc, Loc] = {}      # "secret" path -> the "secret_file" path it came from
        self.reported: set[Loc] = set()        # secrets whose _file failed: no follow-up errors
        self.env_raw: dict[Loc, str] = {}      # key path -> the environment value as written
        self.meant: set[Loc] = set()           # keys an unknown key was probably meant to be

    # -- problems -------------------------------------------------------------------

    def problem(self, loc: Loc, message: str) -> None:
        if any(loc[:len(done)] == done for done in self.reported):
            return
        for resolved, original in self.renamed.items():
            if loc[:len(resolved)] == resolved:
                loc = original + loc[len(resolved):]
                break
        line, env_var = self._origin(loc)
        self.problems.append(Problem(_format_loc(loc), line, message, self.path, env_var))

    def _origin(self, loc: Loc) -> tuple[int | None, str | None]:
        """(line, environment variable) of the innermost known key of ``loc``."""
        for size in range(len(loc), 0, -1):
            prefix = loc[:size]
            if prefix in self.env_origin:
                return None, self.env_origin[prefix]
            if prefix in self.lines:
                return self.lines[prefix], None
        return None, None

    def env_problem(self, var: str, loc: Loc, message: str) -> None:
        self.problems.append(Problem(_format_loc(loc), None, message, self.path, var))

    def unknown_key(self, loc: Loc, known: frozenset[str]) -> None:
        """Report an unknown key; the key it was probably meant to be is then not also
        reported as missing (a typo is one problem, not two)."""
        close = difflib.get_close_matches(str(loc[-1]), sorted(known), n=1)
        if close:
            self.meant.add((*loc[:-1], close[0]))
            self.problem(loc, f"unknown key (did you mean {close[0]!r}?)")
        else:
            self.problem(loc, "unknown key")

    def add_validation_errors(self, exc: ValidationError, prefix: Loc = (),
                              skip_keys: frozenset[str | int | None] = frozenset()) -> None:
        """Report pydantic's errors; ``skip_keys``: first-level keys already reported."""
        errors = [error for error in exc.errors(include_url=False, include_input=False)
                  if _blamed_key(error) not in skip_keys]
        # Unknown keys first: their "did you mean" silences the matching "missing".
        errors.sort(key=lambda error: error["type"] != "extra_forbidden")
        for error in errors:
            loc: Loc = prefix + tuple(error["loc"])
            ctx = error.get("ctx") or {}
            message = error["msg"]
            if error["type"] == "amid_field":
                loc = loc + (ctx["field"],)
            elif error["type"] == "extra_forbidden":
                model = None if prefix else _model_at(loc[:-1])
                if model is None or not isinstance(loc[-1], str):
                    self.problem(loc, "unknown key")
                else:
                    self.unknown_key(loc, _model_keys(model) - {"options"})
                continue
            elif error["type"] == "missing":
                if loc in self.meant:
                    continue
                key = loc[-1] if loc else ""
                message = (f"required: give {key} or {key}_file" if _is_secret_key(key)
                           else "required key is missing")
            elif error["type"] in ("tuple_type", "list_type"):
                message = "Input should be a list"
            elif error["type"] in ("value_error", "assertion_error") and "error" in ctx:
                # A validator's own words, without pydantic's "Value error, " prefix.
                message = str(ctx["error"])
            self.problem(loc, message)

    # -- steps ----------------------------------------------------------------------

    def run(self, sink_option_models: Mapping[str, Any]) -> Config:
        data = self.read_file() if self.path is not None else {}
        if data is None:
            raise ConfigError(self.problems)
        self.apply_environment(data)
        self.keep_env_strings(data, sink_option_models)
        self.resolve_files(data, ())
        self.fill_defaults(data)
        self.check_names(data)
        config_input = self.split_sinks(data, sink_option_models)
        config: Config | None = None
        try:
            config = Config.model_validate(config_input)
        except ValidationError as exc:
            self.add_validation_errors(exc)
        if self.problems or config is None:
            raise ConfigError(_in_file_order(_unique(self.problems)))
        return _with_dead_letter_paths(config)

    def read_file(self) -> dict[str, Any] | None:
        """Parse the YAML file, index line numbers; None (with a problem) when unusable."""
        assert self.path is not None
        try:
            with open(self.path, encoding="utf-8") as stream:
                text = stream.read()
        except FileNotFoundError:
            self.problems.append(Problem("", None, "config file not found", self.path))
            return None
        except (OSError, UnicodeDecodeError) as exc:
            self.problems.append(Problem("", None, f"cannot read config file: {_reason(exc)}",
                                         self.path))
            return None
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return {}
            raw_secrets: dict[Loc, str] = {}
            self._index_nodes(node, (), raw_secrets, set())
            data = loader.construct_document(node)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            detail = " ".join(str(part) for part in (exc.context, exc.problem) if part)
            self.problems.append(Problem("", mark.line + 1 if mark else None,
                                         f"YAML syntax error: {detail}", self.path))
            return None
        except yaml.YAMLError as exc:
            self.problems.append(Problem("", None, f"YAML syntax error: {exc}", self.path))
            return None
        finally:
            loader.dispose()
        if not isinstance(data, dict):
            self.problems.append(Problem("", 1, "the top level must be a mapping of keys",
                                         self.path))
            return None
        for loc, raw in raw_secrets.items():
            _set_at(data, loc, raw)
        return data

    def _index_nodes(self, node: yaml.Node, loc: Loc, raw_secrets: dict[Loc, str],
                     active: set[int]) -> None:
        """Record each key's line, report duplicate keys, keep secrets as written."""
        if id(node) in active:  # a recursive alias
            return
        active.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first_line: dict[Any, int] = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = _scalar_key(key_node)
                if key is None:
                    continue
                line = key_node.start_mark.line + 1
                key_loc = loc + (key,)
                if key in first_line:
                    self.lines[key_loc] = line
                    self.problem(key_loc, f"duplicate key (first given on line {first_line[key]})")
                first_line[key] = line
                self.lines[key_loc] = line
                if (isinstance(value_node, yaml.ScalarNode) and _is_secret_key(key)
                        and value_node.tag not in ("tag:yaml.org,2002:str",
                                                   "tag:yaml.org,2002:null")):
                    # "secret: 0123" must stay "0123", not become the int 123.
                    raw_secrets[key_loc] = value_node.value
                self._index_nodes(value_node, key_loc, raw_secrets, active)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                self.lines[loc + (index,)] = item.start_mark.line + 1
                self._index_nodes(item, loc + (index,), raw_secrets, active)
        active.discard(id(node))

    def apply_environment(self, data: dict[str, Any]) -> None:
        """Apply ``AMID_*`` overrides in a stable order (list indices numerically)."""
        overrides: list[tuple[Any, str, list[str]]] = []
        for var in self.environ:
            if not var.upper().startswith(ENV_PREFIX) or var.upper() in _ENV_IGNORED:
                continue
            parts = [part.lower() for part in var[len(ENV_PREFIX):].split("__")]
            if len(parts) == 1 and parts[0] in _SERVER_SHORTCUTS:
                parts = ["servers", "0", parts[0]]
            if any(not part for part in parts):
                self.env_problem(var, (), "empty part in the key path (parts are "
                                          "separated by '__')")
                continue
            order = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts)
            overrides.append((order, var, parts))
        for _, var, parts in sorted(overrides):
            self._apply_override(data, var, parts, self.environ[var])

    def _apply_override(self, data: dict[str, Any], var: str, parts: list[str],
                        raw: str) -> None:
        container: Any = data
        loc: Loc = ()
        for position, part in enumerate(parts):
            last = position == len(parts) - 1
            next_part = None if last else parts[position + 1]
            if isinstance(container, list):
                key: str | int | None = self._list_index(container, part, last, var, loc)
                if key is None:
                    return
                if key == len(container):
                    container.append(None)
            else:
                key = part
            loc = loc + (key,)
            if last:
                value = _env_value(part, raw)
                container[key] = value
                self.env_raw[loc] = raw
                if isinstance(container, dict):
                    # The override replaces whichever form (secret / secret_file) was used.
                    twin = part[:-5] if part.endswith("_file") else f"{part}_file"
                    if _is_secret_key(twin) or _is_secret_key(part):
                        container.pop(twin, None)
                self.env_origin[loc] = var
                return
            child = container.get(key) if isinstance(container, dict) else container[key]
            if not isinstance(child, (dict, list)):
                # Missing (or a scalar such as "tls: false" being refined): create it.
                child = [] if next_part is not None and next_part.isdigit() else {}
                container[key] = child
            container = child

    def keep_env_strings(self, data: dict[str, Any], sink_option_models: Mapping[str, Any]) -> None:
        """A string-typed setting takes its environment value as written, not as YAML:
        ``-``, ``yes``, ``123`` or ``[a]`` stay strings (an empty value is null; ``null``
        and ``~`` too where the setting may be null)."""
        for loc, raw in self.env_raw.items():
            kind = _string_kind(self._annotation_at(loc, data, sink_option_models))
            if not raw.strip():
                continue  # an empty value is null, as documented: the default applies
            if kind == "str" or (kind == "optional_str" and _env_value("", raw) is not None):
                _set_at(data, loc, raw)

    def _annotation_at(self, loc: Loc, data: dict[str, Any],
                       sink_option_models: Mapping[str, Any]) -> Any:
        """The declared type of the setting at ``loc`` (None when unknown)."""
        model: type[BaseModel] | None = Config
        path = loc
        if (len(loc) >= 3 and loc[0] == "sinks" and isinstance(loc[1], int)
                and loc[2] not in _SINK_COMMON_KEYS):
            sinks = data.get("sinks")
            sink = sinks[loc[1]] if isinstance(sinks, list) and loc[1] < len(sinks) else None
            sink_type = sink.get("type") if isinstance(sink, dict) else None
            if not isinstance(sink_type, str) or sink_type not in sink_option_models:
                return None
            try:
                model = sink_option_models[sink_type]
            except Exception:  # reported, with its reason, by split_sinks
                return None
            path = loc[2:]
        for part in path[:-1]:
            if isinstance(part, int) or model is None:
                continue
            field = _field_named(model, part)
            model = _find_model(field.annotation) if field is not None else None
        if model is None or not isinstance(path[-1], str):
            return None
        field = _field_named(model, path[-1])
        return field.annotation if field is not None else None

    def _list_index(self, items: list[Any], part: str, last: bool, var: str,
                    loc: Loc) -> int | None:
        if part.isdigit():
            index = int(part)
            if index > len(items):
                self.env_problem(var, loc + (index,),
                                 f"index {index} is out of range: there are {len(items)} "
                                 f"items (use {len(items)} to add one)")
                return None
            return index
        # A sink without a name is named after its type (see fill_defaults).
        names = [item.get("name", item.get("type")) if isinstance(item, dict) else None
                 for item in items]
        for index, name in enumerate(names):
            if isinstance(name, str) and _normal_name(name) == _normal_name(part):
                return index
        known = ", ".join(name for name in names if isinstance(name, str))
        self.env_problem(var, loc, f"no item named {part!r}"
                         + (f" (names: {known})" if known else "") + "; use an index to add one")
        return None

    def resolve_files(self, node: Any, loc: Loc) -> None:
        """Expand ``${VAR}`` in paths; replace ``<secret>_file`` keys by the file content."""
        if isinstance(node, list):
            for index, item in enumerate(node):
                self.resolve_files(item, loc + (index,))
            return
        if not isinstance(node, dict):
            return
        for key in list(node):
            value = node[key]
            key_loc = loc + (key,)
            if not isinstance(key, str):
                continue
            expands = key.endswith("_file") or key_loc == ("state_dir",) or (
                len(key_loc) == 3 and key_loc[0] == "sinks" and key == "dead_letter")
            if expands and isinstance(value, str):
                value = self._expand(value, key_loc)
                if value is None:
                    continue
                node[key] = value
            secret_key = key[:-5]
            if key.endswith("_file") and _is_secret_key(secret_key):
                # The _file key is consumed here whatever happens, so pydantic never sees it.
                del node[key]
                if secret_key in node:
                    self.problem(key_loc, f"give either {secret_key} or {key}, not both")
                    continue
                self.renamed[loc + (secret_key,)] = key_loc
                if not isinstance(value, str) or not value:
                    secret = None
                    self.problem(key_loc, "must be the path of a file holding the secret")
                else:
                    secret = self._read_secret(value, key_loc)
                if secret is None:
                    # Reported once; "secret is missing" would only repeat it.
                    self.reported.add(loc + (secret_key,))
                    continue
                node[secret_key] = secret
            elif key != "match":  # field globs, never paths or secrets
                self.resolve_files(value, key_loc)

    def _expand(self, value: str, loc: Loc) -> str | None:
        missing: list[str] = []

        def substitute(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in self.environ:
                missing.append(name)
                return ""
            return self.environ[name]

        expanded = _ENV_REFERENCE.sub(substitute, value)
        if missing:
            self.problem(loc, "environment variable " + ", ".join(missing) + " is not set")
            return None
        return expanded

    def _read_secret(self, file_name: str, loc: Loc) -> str | None:
        credentials = self.environ.get("CREDENTIALS_DIRECTORY")
        file_path = Path(file_name)
        if credentials and not file_path.is_absolute():
            file_path = Path(credentials) / file_path
        try:
            content = file_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            self.problem(loc, f"cannot read {file_path}: {_reason(exc)}")
            return None
        if content.endswith("\r\n"):
            return content[:-2]
        return content[:-1] if content.endswith("\n") else content

    def fill_defaults(self, data: dict[str, Any]) -> None:
        """Defaults that depend on the environment or on other keys."""
        if data.get("state_dir") is None:
            # systemd's StateDirectory= may list several directories, separated by ':'.
            state_directory = self.environ.get("STATE_DIRECTORY", "").split(":")[0]
            data["state_dir"] = state_directory or DEFAULT_STATE_DIR
        sinks = data.get("sinks")
        if sinks is None:
            data["sinks"] = []
        elif isinstance(sinks, list):
            for sink in sinks:
                if isinstance(sink, dict) and "name" not in sink and isinstance(
                        sink.get("type"), str):
                    sink["name"] = sink["type"]
        if data.get("servers") is None:
            data["servers"] = []

    def check_names(self, data: dict[str, Any]) -> None:
        """Server names are needed when there are several; all names are unique."""
        servers = data.get("servers")
        if isinstance(servers, list):
            if len(servers) > 1:
                for index, server in enumerate(servers):
                    if isinstance(server, dict) and "name" not in server:
                        self.problem(("servers", index),
                                     "name is required when there is more than one server")
            self._unique_names("server", servers, "servers")
        if isinstance(data.get("sinks"), list):
            self._unique_names("sink", data["sinks"], "sinks")

    def _unique_names(self, what: str, items: list[Any], key: str) -> None:
        first: dict[str, int] = {}
        for index, item in enumerate(items):
            name = item.get("name") if isinstance(item, dict) else None
            if not isinstance(name, str):
                continue
            if name in first:
                where = f"{key}[{first[name]}]"
                self.problem((key, index, "name"),
                             f"duplicate {what} name {name!r} (also used by {where})")
            else:
                first[name] = index

    def split_sinks(self, data: dict[str, Any],
                    sink_option_models: Mapping[str, Any]) -> dict[str, Any]:
        """Validate each sink's own keys with its type's model; keep the common keys."""
        sinks = data.get("sinks")
        if not isinstance(sinks, list):
            return data
        common_sinks: list[Any] = []
        for index, sink in enumerate(sinks):
            if not isinstance(sink, dict):
                common_sinks.append(sink)
                continue
            common = {k: v for k, v in sink.items() if k in _SINK_COMMON_KEYS}
            own = {k: v for k, v in sink.items() if k not in _SINK_COMMON_KEYS}
            sink_type = sink.get("type")
            if isinstance(sink_type, str) and sink_type:
                options = common["options"] = self._validate_options(
                    ("sinks", index), sink_type, own, sink_option_models)
                # A sink type may say how long its batches wait by default (the webhook's
                # requests are dear); the config's own batch.max_wait always wins.
                batch = common.get("batch")
                if isinstance(options, BatchDefaults) and (
                        batch is None or (isinstance(batch, dict) and "max_wait" not in batch)):
                    common["batch"] = {**(batch or {}), "max_wait": options.default_batch_max_wait}
            common_sinks.append(common)
        return {**data, "sinks": common_sinks}

    def _validate_options(self, loc: Loc, sink_type: str, own: dict[str, Any],
                          sink_option_models: Mapping[str, Any]) -> Any:
        if sink_type not in sink_option_models:
            known = ", ".join(sorted(sink_option_models)) or "none"
            self.problem(loc + ("type",), f"unknown sink type {sink_type!r} (known types: {known})")
            return None
        try:
            model = sink_option_models[sink_type]
        except Exception as exc:  # the sink module itself is broken: name it, do not crash
            why = str(exc) if isinstance(exc, SinkTypeUnavailable) else f"{type(exc).__name__}: {exc}"
            self.problem(loc + ("type",), f"sink type {sink_type!r} is not available: {why}")
            return None
        if model is None:
            return own
        # Checked here too so that unknown keys are errors even if the model ignores extras.
        known_keys = _model_keys(model)
        unknown = [key for key in own if key not in known_keys]
        for key in unknown:
            self.unknown_key((*loc, key), known_keys | _SINK_COMMON_KEYS)
        values = {k: v for k, v in own.items() if k not in unknown}
        try:
            return model.model_validate(values)
        except ValidationError as exc:
            self.add_validation_errors(exc, loc)
            failed = frozenset(_blamed_key(error) for error in exc.errors())
        # The model's own checks across keys run only once every key is valid: validate
        # again without the keys just reported, so that their problems are listed too.
        rest = {k: v for k, v in values.items() if k not in failed}
        if len(rest) < len(values):
            try:
                model.model_validate(rest)
            except ValidationError as exc:
                self.add_validation_errors(exc, loc, skip_keys=failed)
        return None


# ---------------------------------------------------------------------------------------
# Helpers


_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _is_secret_key(key: Any) -> bool:
    return isinstance(key, str) and (
        key in ("secret", "password") or key.endswith(("_secret", "_password")))


def _env_value(key: str, raw: str) -> Any:
    """Parse an environment value as YAML, except secrets and paths (taken verbatim)."""
    if _is_secret_key(key) or key.endswith("_file"):
        return raw
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    if value is None and raw.strip() not in ("", "~", "null", "Null", "NULL"):
        return raw  # e.g. "#abc", which YAML reads as a comment
    return value


def _normal_name(name: str) -> str:
    return name.lower().replace("-", "_").replace(".", "_")


def _scalar_key(node: yaml.Node) -> Any:
    if not isinstance(node, yaml.ScalarNode):
        return None
    if node.tag == "tag:yaml.org,2002:str":
        return node.value
    try:
        return yaml.safe_load(node.value)
    except yaml.YAMLError:
        return node.value


def _set_at(data: Any, loc: Loc, value: Any) -> None:
    for part in loc[:-1]:
        data = data[part]
    data[loc[-1]] = value


def _format_loc(loc: Loc) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if isinstance(exc, UnicodeDecodeError):
        return "not valid UTF-8"
    return str(exc)


def _model_keys(model: type[BaseModel]) -> frozenset[str]:
    keys: set[str] = set()
    for name, field in model.model_fields.items():
        keys.add(name)
        if field.alias:
            keys.add(field.alias)
    return frozenset(keys)


def _blamed_key(error: Any) -> str | int | None:
    """The first-level key a pydantic error is about (a model check names it in ctx)."""
    if error["type"] == "amid_field":
        return (error.get("ctx") or {}).get("field")
    return error["loc"][0] if error["loc"] else None


def _field_named(model: type[BaseModel], key: str) -> Any:
    """The field of ``model`` a config key sets (by name or alias), or None."""
    for name, field in model.model_fields.items():
        if key in (name, field.alias):
            return field
    return None


def _string_kind(annotation: Any) -> str | None:
    """``"str"`` for a str (or path) setting, ``"optional_str"`` for one that may also be
    None, else None (the value's YAML type matters)."""
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    if annotation in (str, Path):
        return "str"
    if get_origin(annotation) in (Union, UnionType):
        members = [arg for arg in get_args(annotation) if arg is not type(None)]
        if (len(members) < len(get_args(annotation))
                and all(_string_kind(member) == "str" for member in members)):
            return "optional_str"
    return None


def _unique(problems: list[Problem]) -> list[Problem]:
    seen: set[Problem] = set()
    result = []
    for problem in problems:
        if problem not in seen:
            seen.add(problem)
            result.append(problem)
    return result


def _in_file_order(problems: list[Problem]) -> list[Problem]:
    return sorted(problems, key=lambda p: (p.line is None, p.line or 0))


def _model_at(loc: Loc) -> type[BaseModel] | None:
    """The Config sub-model that validates the mapping at ``loc`` (list indices skipped)."""
    model: type[BaseModel] = Config
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        found = _find_model(field.annotation) if field is not None else None
        if found is None:
            return None
        model = found
    return model


def _find_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _find_model(arg)
        if found is not None:
            return found
    return None


def _with_dead_letter_paths(config: Config) -> Config:
    sinks = tuple(
        sink if sink.dead_letter is not None else sink.model_copy(
            update={"dead_letter": config.state_dir / "dead-letter" / f"{sink.name}.jsonl"})
        for sink in config.sinks)
    return config.model_copy(update={"sinks": sinks})

