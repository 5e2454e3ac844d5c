"""The optional C accelerator (``amid/ami/_speedups.c``): a leaf that installs itself.

Each rule of the read path is written once, in Python, by the module that owns it (framing and
fields: :mod:`amid.ami.protocol`; the envelope: :mod:`amid.ami.session`; records and their
JSON: :mod:`amid.records`, :mod:`amid._encode`). Where ``pip install`` could build the C
extension, it offers faster versions of some of them. A module asks for one by name here,
at call time (``_accel.active.frame_crlf``), calls it, and runs its own Python whenever the
answer is None (not built, or switched off) or the C function declines the input (it returns
None or False). This module imports nothing of amid: modules ask it; it never asks them back.

``AMID_PURE_PYTHON=1`` in the environment switches it off for the whole process (to rule it
out when chasing a problem), :func:`pure_python` for a block of code (tests, benchmarks);
``amid --version`` and the ``speedups`` label of ``amid_build_info`` say which path runs.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from types import ModuleType
from typing import Any

__all__ = ["REASON", "SPEEDUPS", "Accelerated", "active", "pure_python", "speedups"]

def _load() -> tuple[ModuleType | None, str]:
    """The C extension, or None and why not."""
    if os.environ.get("AMID_PURE_PYTHON", "").strip() not in ("", "0"):
        return None, "AMID_PURE_PYTHON is set"
    try:
        import amid.ami._speedups as module
    except ImportError:
        return None, "the C accelerator was not built (no C compiler at install time)"
    return module, ""


speedups: ModuleType | None
#: Why the pure-Python path runs ("" when the accelerator is in use).
REASON: str
speedups, REASON = _load()

#: "c" when the C accelerator is in use, else "python".
SPEEDUPS = "python" if speedups is None else "c"

# What each C function takes and gives (None: it declines, the caller's reference runs). The
# objects it makes or reads (Events, Records) are typed Any here: this module imports nothing of
# amid, and the callers annotate what they receive.
FrameCrlf = Callable[[bytes, int, int], tuple[list[Any], int, int] | None]
ParseFields = Callable[[bytes], list[tuple[str, str]] | None]
RecordJson = Callable[..., bytes | None]  # (head, mid, seq, received_at, name, raw[, seq_in_id])
PartsFor = Callable[[Any, Any, Any], tuple[bytes, bytes] | None]
RecordsJson = Callable[[Sequence[Any], PartsFor, Callable[[float], bytes]], list[bytes] | None]
RecordsOf = Callable[[Sequence[Any], str], list[Any] | None]
StampEvents = Callable[[list[Any], str, int, int, float], bool]
_CFunction = FrameCrlf | ParseFields | RecordJson | RecordsJson | RecordsOf | StampEvents


class Accelerated:
    """The C functions amid calls, by name; each is None while the accelerator is off.

    What each one replaces, and when it declines, is in the header of ``_speedups.c`` and at
    its one caller.
    """

    __slots__ = ("frame_crlf", "parse_fields", "record_json", "records_json", "records_of",
                 "stamp_events")

    frame_crlf: FrameCrlf | None
    parse_fields: ParseFields | None
    record_json: RecordJson | None
    records_json: RecordsJson | None
    records_of: RecordsOf | None
    stamp_events: StampEvents | None

    def __init__(self, module: ModuleType | None) -> None:
        for name in self.__slots__:
            setattr(self, name, None if module is None else getattr(module, name))

    def snapshot(self) -> tuple[_CFunction | None, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def restore(self, saved: tuple[_CFunction | None, ...]) -> None:
        for name, value in zip(self.__slots__, saved, strict=True):
            setattr(self, name, value)


#: What runs now: read by the callers at every call, so :func:`pure_python` reaches them all.
active: Accelerated = Accelerated(speedups)


@contextlib.contextmanager
def pure_python() -> Iterator[None]:
    """The accelerator switched off in this process while the block runs (what
    ``AMID_PURE_PYTHON=1`` does for a new one): for tests and benchmarks that compare the two."""
    saved = active.snapshot()
    active.restore((None,) * len(saved))
    try:
        yield
    finally:
        active.restore(saved)
