"""The contract every sink proves: one test class each sink's tests subclass.

Modelled on keyring's ``BackendBasicTests``. The class has no ``Test`` prefix, so pytest collects
its tests only through subclasses. A subclass implements three hooks::

    from sink_contract import SinkContract

    class TestMySink(SinkContract):
        @pytest.fixture(autouse=True)
        async def peer(self, tmp_path):          # optional: set up the live peer/target
            self.server = await start_receiver()
            yield
            await self.server.stop()

        async def make_sink(self) -> Sink:        # a new, not yet started sink aimed at the peer
            return mysink.create("contract", mysink.Options(url=self.server.url))

        async def received(self, n: int) -> list[dict]:   # what the peer got, decoded record JSON
            return await self.server.wait_for(n)           # wait with a bound until >= n arrived

        async def break_peer(self) -> None:       # make the peer unavailable: send must now fail
            await self.server.stop()

Every sink made with :meth:`SinkContract.new_sink` is closed after the test, so a failing test
never leaks a file descriptor or a connection. ``self.tmp_path`` is a fresh directory per test.

Knobs a subclass may override (class attributes):

* ``wait_timeout``: bound in seconds on every await in the contract tests.
* ``sends_to_notice_break``: how many sends after :meth:`break_peer` may still succeed before one
  must raise (e.g. a TCP write may land in the kernel buffer before the peer's RST arrives).
  Every failure must be a :class:`~amid.sinks.base.SinkError`, never another exception type.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

import pytest

from amid.records import Record
from amid.sinks.base import Sink, SinkError

__all__ = ["SinkContract", "make_records"]


def make_records(count: int, *, prefix: str = "rec", start: int = 0,
                 fields: dict[str, Any] | None = None) -> list[Record]:
    """``count`` distinct records with ids ``{prefix}-{n}`` in the documented record shape.

    The JSON is built here (compact, UTF-8, not ASCII-escaped) and the record rebuilt from it, so
    the contract tests the sinks, not the record encoder: a sink must forward ``record.json``.
    """
    records = []
    for n in range(start, start + count):
        shape = Record.synthetic(
            id=f"{prefix}-{n}", server="pbx1", name="Newchannel", seq=n,
            received_at=1_780_000_000.0 + n,
            fields={"Channel": f"PJSIP/100-{n:08x}", "Uniqueid": f"1780000000.{n}",
                    **(fields or {})})
        raw = json.dumps(shape.data, ensure_ascii=False, separators=(",", ":")).encode()
        records.append(Record.from_json(raw))
    return records


class SinkContract:
    """Guarantees every sink gives: order, idempotent close, SinkError only, lossless fields."""

    wait_timeout: float = 10.0
    sends_to_notice_break: int = 1

    # -- hooks a subclass implements ------------------------------------------------------------

    async def make_sink(self) -> Sink:
        """Return a new (not started) sink aimed at a live peer."""
        raise NotImplementedError

    async def received(self, n: int) -> list[dict]:
        """Return every record the peer got, decoded, once at least ``n`` arrived (bounded wait)."""
        raise NotImplementedError

    async def break_peer(self) -> None:
        """Make the peer unavailable so that the sink's next send(s) must fail."""
        raise NotImplementedError

    # -- plumbing -------------------------------------------------------------------------------

    @pytest.fixture(autouse=True)
    async def _sink_contract_setup(self, tmp_path):
        self.tmp_path = tmp_path
        self._sinks_to_close: list[Sink] = []
        yield
        for sink in self._sinks_to_close:
            async with asyncio.timeout(self.wait_timeout):
                await sink.close()

    async def new_sink(self) -> Sink:
        """:meth:`make_sink`, remembered so the fixture closes it after the test."""
        sink = await self.make_sink()
        self._sinks_to_close.append(sink)
        return sink

    async def _received(self, n: int) -> list[dict]:
        async with asyncio.timeout(self.wait_timeout):
            return await self.received(n)

    async def _send(self, sink: Sink, batch: Sequence[Record]) -> None:
        async with asyncio.timeout(self.wait_timeout):
            await sink.send(batch)

    async def _start(self, sink: Sink) -> None:
        async with asyncio.timeout(self.wait_timeout):
            await sink.start()

    async def _close(self, sink: Sink) -> None:
        async with asyncio.timeout(self.wait_timeout):
            await sink.close()

    # -- the contract ---------------------------------------------------------------------------

    async def test_contract_is_a_sink(self):
        sink = await self.new_sink()
        assert isinstance(sink, Sink)
        assert isinstance(sink.name, str) and sink.name

    async def test_contract_delivers_every_record_in_order(self):
        sink = await self.new_sink()
        await self._start(sink)
        batches = [make_records(1, start=0), make_records(7, start=1), make_records(3, start=8)]
        for batch in batches:
            await self._send(sink, batch)
        sent = [record for batch in batches for record in batch]

        got = await self._received(len(sent))
        await self._close(sink)

        assert [r["id"] for r in got] == [r.id for r in sent]
        assert got == [r.data for r in sent]

    async def test_contract_empty_batch_is_a_no_op(self):
        sink = await self.new_sink()
        await self._start(sink)
        await self._send(sink, [])
        await self._send(sink, make_records(1))
        assert [r["id"] for r in await self._received(1)] == ["rec-0"]

    async def test_contract_non_ascii_and_repeated_keys_survive(self):
        fields = {
            "CallerIDName": "Zoë Ærø 日本語 🎉",
            "Variable": ["SIPCALLID=abc@10.0.0.1", "ÜBER=ja", "EMPTY="],
            "ChanVariable": ["A=1", "A=1"],          # repeated identical values stay two values
            "AccountCode": "  spaces kept  ",
            "Quote": 'say "hi"\\ {json}',
        }
        sink = await self.new_sink()
        await self._start(sink)
        sent = make_records(2, prefix="utf8", fields=fields)
        await self._send(sink, sent)

        got = await self._received(2)
        assert got == [r.data for r in sent]
        assert got[0]["fields"]["Variable"] == fields["Variable"]

    async def test_contract_close_is_idempotent(self):
        sink = await self.new_sink()
        await self._start(sink)
        await self._send(sink, make_records(2))
        await self._close(sink)
        await self._close(sink)

    async def test_contract_close_without_start_is_safe(self):
        sink = await self.new_sink()
        await self._close(sink)
        await self._close(sink)

    async def test_contract_send_after_break_peer_raises_sink_error(self):
        sink = await self.new_sink()
        await self._start(sink)
        await self._send(sink, make_records(1))
        await self._received(1)

        await self.break_peer()
        error: BaseException | None = None
        for attempt in range(self.sends_to_notice_break):
            try:
                await self._send(sink, make_records(1, start=100 + attempt))
            except Exception as exc:  # the contract: whatever goes wrong surfaces as SinkError
                error = exc
                break
        assert error is not None, (
            f"{self.sends_to_notice_break} send(s) after break_peer() did not fail")
        assert isinstance(error, SinkError), (
            f"send raised {type(error).__name__}, not SinkError: {error!r}")
        assert str(error), "a SinkError must say what went wrong"

        await self._close(sink)   # closing a sink whose peer is gone must not raise either
