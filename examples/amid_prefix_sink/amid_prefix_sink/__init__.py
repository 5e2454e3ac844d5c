"""An example amid sink plugin: appends ``<prefix> <record JSON>`` lines to a file.

Install it next to amid (``pip install ./examples/amid_prefix_sink``) and use it as::

    sinks:
      - name: tagged
        type: prefix            # the entry-point name in the "amid.sinks" group
        path: /tmp/tagged.log   # this plugin's own keys, validated by Options
        prefix: "pbx>"

amid's runner gives it a bounded queue, batching, retries, the spool and metrics; the sink only
has to deliver a batch or raise SinkError.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pydantic

from amid.records import Record
from amid.sinks.base import SinkError


class Options(pydantic.BaseModel, extra="forbid"):
    path: str
    prefix: str = ">"


class PrefixSink:
    """Opens the file for each batch: simple, and a rotated file is picked up at once."""

    def __init__(self, name: str, options: Options) -> None:
        self.name = name
        self.options = options
        self._started = False

    async def start(self) -> None:
        self._started = True

    async def send(self, batch: Sequence[Record]) -> None:
        if not self._started:
            raise SinkError("sink is not started")
        data = b"".join(self.options.prefix.encode() + b" " + r.json + b"\n" for r in batch)
        try:
            await asyncio.to_thread(self._append, data)  # file I/O never blocks the event loop
        except OSError as exc:
            raise SinkError(f"cannot write {self.options.path}: {exc.strerror}") from exc

    def _append(self, data: bytes) -> None:
        with open(self.options.path, "ab") as file:
            file.write(data)

    async def close(self) -> None:
        self._started = False


def create(name: str, options: Options | dict) -> PrefixSink:
    """The factory amid calls with the sink's name and its validated options."""
    if not isinstance(options, Options):
        options = Options.model_validate(options)
    return PrefixSink(name, options)


create.Options = Options  # type: ignore[attr-defined]  # amid validates the sink's keys with it
