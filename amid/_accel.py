"""The optional C accelerator (``amid/_speedups.c``), or None.

``pip install`` builds it when a C compiler and Python's headers are there. It speeds up the
read path's hot loops (framing and Events, the session's envelope, Records, record JSON); each
module that uses it keeps the same code in Python, which gives the same results (tested) and
runs when it is missing.

``AMID_PURE_PYTHON=1`` in the environment switches it off for the whole process (to rule it
out when chasing a problem); ``amid --version`` and the ``speedups`` label of
``amid_build_info`` say which path runs.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from types import ModuleType

#: Why the pure-Python path runs ("" when the accelerator is in use).
REASON = ""
speedups: ModuleType | None
if os.environ.get("AMID_PURE_PYTHON", "").strip() not in ("", "0"):
    speedups, REASON = None, "AMID_PURE_PYTHON is set"
else:
    try:
        from amid import _speedups as speedups
    except ImportError:
        speedups, REASON = None, "the C accelerator was not built (no C compiler at install time)"

#: "c" when the C accelerator is in use, else "python".
SPEEDUPS = "python" if speedups is None else "c"


def hooks() -> list[tuple[ModuleType, str]]:
    """Every ``(module, attribute)`` through which amid calls the accelerator (None there
    means the module's Python code runs)."""
    from amid import _encode, records
    from amid.ami import protocol, session
    return [(_encode, "_fields_json_c"), (_encode, "_record_json_c"), (protocol, "_frame_crlf"),
            (protocol, "_parse_fields_c"), (session, "_stamp_events"), (records, "_records_of"),
            (records, "_records_json")]


@contextlib.contextmanager
def pure_python() -> Iterator[None]:
    """The accelerator switched off in this process while the block runs (what
    ``AMID_PURE_PYTHON=1`` does for a new one): for tests and benchmarks that compare the two."""
    switched = hooks()
    saved = [getattr(module, name) for module, name in switched]
    for module, name in switched:
        setattr(module, name, None)
    try:
        yield
    finally:
        for (module, name), value in zip(switched, saved):
            setattr(module, name, value)
