"""Record.from_json: the envelope read off the front of the bytes gives what the full parse gives."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from amid.records import Record

names = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=20)


@given(server=names, event=names, value=st.text(max_size=30),
       received_at=st.floats(min_value=0, max_value=4e9, allow_nan=False))
def test_from_json_reads_the_envelope_as_the_full_parse_does(server: str, event: str, value: str,
                                                             received_at: float) -> None:
    original = Record.synthetic(id=f"{server}:run:1:7", server=server, name=event,
                                fields={"Value": value}, received_at=received_at, epoch=1, seq=7)
    back = Record.from_json(original.json)
    assert (back.id, back.name, back.server) == (original.id, original.name, original.server)
    assert abs(back.received_at - received_at) < 1e-6
    assert back.json == original.json and back.size == len(original.json)
    assert back.data == original.data
