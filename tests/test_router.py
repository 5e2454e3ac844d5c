"""Router: every event to every sink whose filter accepts it, records shared, order kept."""

from __future__ import annotations

from amid.ami.protocol import Event
from amid.records import Record
from amid.router import EventFilter, Router
from amid.sinks.delivery import SinkStats


class Recorder:
    def __init__(self) -> None:
        self.records: list[Record] = []
        self.calls = 0
        self.stats = SinkStats()  # the router counts what a filter discards here

    def offer(self, record: Record) -> None:
        self.records.append(record)

    def offer_many(self, records: list[Record]) -> None:
        self.calls += 1
        self.records.extend(records)


def events(*names: str) -> list[Event]:
    out = []
    for seq, name in enumerate(names, 1):
        event = Event(f"Event: {name}\r\nChannel: PJSIP/{seq}".encode())
        event.server, event.epoch, event.seq, event.received_at = "pbx", 1, seq, 1.0
        out.append(event)
    return out


def test_each_sink_gets_what_its_filter_accepts_in_order_and_records_are_shared() -> None:
    everything, calls_only, matched = Recorder(), Recorder(), Recorder()
    router = Router("run")
    router.set_routes([(EventFilter(), everything),
                       (EventFilter(include=["Newchannel", "Hangup"]), calls_only),
                       (EventFilter(match={"Channel": "PJSIP/2"}), matched)])
    router.on_events(events("Newchannel", "VarSet", "Hangup", "newchannel"))
    assert [r.seq for r in everything.records] == [1, 2, 3, 4]
    assert [r.seq for r in calls_only.records] == [1, 3, 4]  # names match case-insensitively
    assert [r.seq for r in matched.records] == [2]
    assert (everything.stats.discarded_total, calls_only.stats.discarded_total,
            matched.stats.discarded_total) == (0, 1, 3)
    assert calls_only.records[0] is everything.records[0]  # one record, shared by the sinks
    assert everything.calls == 1  # one hand-over per read, not per event
    assert everything.records[0].id == "pbx:run:1:1"


def test_only_the_default_filter_skips_the_per_event_check() -> None:
    assert EventFilter().accepts_all
    assert EventFilter(include=("*",)).accepts_all
    assert not EventFilter(include=["*"], exclude=["VarSet"]).accepts_all
    assert not EventFilter(include=["New*"]).accepts_all
    assert not EventFilter(match={"Channel": "*"}).accepts_all


def test_on_event_routes_a_single_event() -> None:
    sink = Recorder()
    router = Router("run")
    router.set_routes([(EventFilter(exclude=["VarSet"]), sink)])
    for event in events("Newchannel", "VarSet"):
        router.on_event(event)
    assert [r.name for r in sink.records] == ["Newchannel"]
    assert sink.stats.discarded_total == 1


def test_records_amid_makes_are_routed_and_discarded_by_the_same_filters() -> None:
    gaps, calls = Recorder(), Recorder()
    router = Router("run")
    router.set_routes([(EventFilter(), gaps), (EventFilter(include=["Hangup"]), calls)])
    router.emit(Record.synthetic(id="pbx:run:2:gap", server="pbx", name="AmidGap", received_at=1.0,
                                 epoch=2, fields={"Server": "pbx"}))
    assert [r.name for r in gaps.records] == ["AmidGap"] and calls.records == []
    assert (gaps.stats.discarded_total, calls.stats.discarded_total) == (0, 1)
