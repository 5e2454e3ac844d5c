"""Durations and sizes as people write them in config files: ``5s``, ``250ms``, ``64MiB``, and
the TLS block (``tls: {ca_file, verify, cert_file, key_file, server_hostname}``).

Shared by the config loader and by every sink's options model (``Duration``, ``Size``,
``TlsConfig``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from fractions import Fraction
from typing import Annotated, Any, Protocol, runtime_checkable

from annotated_types import Gt
from pydantic import BaseModel, BeforeValidator, ConfigDict, model_validator
from pydantic_core import PydanticCustomError

from amid.ami.tls import TlsSettings

__all__ = ["DeprecatedKeys", "Duration", "PositiveDuration", "PositiveSize", "Size", "TlsConfig",
           "TlsSetting", "parse_duration", "parse_size"]

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h|d)", re.IGNORECASE)
_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1024, "kib": 1024, "kb": 1000,
    "m": 1024**2, "mib": 1024**2, "mb": 1000**2,
    "g": 1024**3, "gib": 1024**3, "gb": 1000**3,
    "t": 1024**4, "tib": 1024**4, "tb": 1000**4,
}
_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)", re.IGNORECASE)


def _plain_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    return None


def parse_duration(value: Any) -> float:
    """Return ``value`` in seconds: ``"5s"``, ``"250ms"``, ``"1m30s"``, ``"1.5h"``, or a number.

    A plain number (or numeric string) is seconds. Negative, infinite and NaN values,
    booleans and unknown units raise ValueError.
    """
    number = _plain_number(value)
    if number is None:
        if not isinstance(value, str):
            raise ValueError(f"a duration must be a number of seconds or a string like '5s', "
                             f"not {type(value).__name__}")
        text = value.strip()
        if text.startswith("-"):
            raise ValueError(f"a duration cannot be negative: {value!r}")
        try:
            number = float(text)
        except ValueError:
            number = _parse_duration_text(text, value)
    if number != number or number in (float("inf"), float("-inf")):
        raise ValueError(f"invalid duration {value!r}")
    if number < 0:
        raise ValueError(f"a duration cannot be negative: {value!r}")
    return number


def _parse_duration_text(text: str, original: str) -> float:
    total, position = 0.0, 0
    for match in _DURATION_PART.finditer(text):
        if match.start() != position:
            break
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2).lower()]
        position = match.end()
    if position != len(text) or not text:
        raise ValueError(f"invalid duration {original!r}: use a number of seconds or e.g. "
                         "'250ms', '5s', '1m', '1h'")
    return total


def parse_size(value: Any) -> int:
    """Return ``value`` in bytes: ``"64MiB"``, ``"512k"`` (=``"512KiB"``), ``"1GB"``, or an int.

    ``k``/``m``/``g``/``t`` and ``KiB``… are powers of 1024, ``KB``/``MB``… powers of 1000.
    Fractions are allowed with a unit (``"1.5MiB"``) and rounded down to whole bytes.
    Negative values, booleans and unknown units raise ValueError.
    """
    if isinstance(value, bool):
        raise ValueError("a size must be a number of bytes or a string like '64MiB'")
    if isinstance(value, int):
        number = value
    elif isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"a size in bytes must be a whole number: {value!r}")
        number = int(value)
    elif isinstance(value, str):
        match = _SIZE.fullmatch(value.strip())
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _SIZE_UNITS:
            raise ValueError(f"invalid size {value!r}: use a number of bytes or e.g. "
                             "'512KiB', '64MiB', '1GB'")
        # Fraction, not float: 576460752305MB must be exact.
        number = int(Fraction(match.group(1)) * _SIZE_UNITS[unit])
    else:
        raise ValueError(f"a size must be a number of bytes or a string like '64MiB', "
                         f"not {type(value).__name__}")
    if number < 0:
        raise ValueError(f"a size cannot be negative: {value!r}")
    return number


def _as_pydantic(parser: Callable[[Any], Any], kind: str) -> Callable[[Any], Any]:
    def validate(value: Any) -> Any:
        try:
            return parser(value)
        except ValueError as exc:
            # PydanticCustomError keeps the message free of pydantic's "Value error, " prefix.
            raise PydanticCustomError(kind, "{reason}", {"reason": str(exc)}) from None
    return validate


Duration = Annotated[float, BeforeValidator(_as_pydantic(parse_duration, "duration"))]
PositiveDuration = Annotated[Duration, Gt(0)]
Size = Annotated[int, BeforeValidator(_as_pydantic(parse_size, "size"))]
PositiveSize = Annotated[Size, Gt(0)]


# ---------------------------------------------------------------------------------------
# TLS: one model, one spelling, for servers and sinks


class TlsConfig(BaseModel):
    """TLS towards one peer (``tls: true`` gives all defaults); see :class:`amid.ami.tls.TlsSettings`."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    ca_file: str | None = None
    verify: bool = True
    cert_file: str | None = None
    key_file: str | None = None
    server_hostname: str | None = None

    @model_validator(mode="after")
    def _key_needs_cert(self) -> TlsConfig:
        if self.key_file is not None and self.cert_file is None:
            # "amid_field": the config loader attributes it to the key_file key (and its line).
            raise PydanticCustomError("amid_field", "{message}",
                                      {"message": "key_file needs cert_file", "field": "key_file"})
        return self

    @property
    def settings(self) -> TlsSettings:
        """The same, as the library's (pydantic-free) value."""
        return TlsSettings(ca_file=self.ca_file, verify=self.verify, cert_file=self.cert_file,
                           key_file=self.key_file, server_hostname=self.server_hostname)


def _tls_setting(value: Any) -> Any:
    if value is None or value is False:
        return None
    if value is True:
        return {}
    if not isinstance(value, Mapping):
        raise PydanticCustomError("tls", "tls must be true, false or a mapping of TLS settings")
    return value


#: ``tls: true | false | {…}`` as a field type (None when off).
TlsSetting = Annotated[TlsConfig | None, BeforeValidator(_tls_setting)]


@runtime_checkable
class DeprecatedKeys(Protocol):
    """An options model that accepts old spellings and says which were used (``check-config``
    prints them as warnings, ``amid run`` logs them)."""

    def deprecations(self) -> list[str]:
        ...
