"""The Asterisk 22 AMI simulator: test peer, demo source and benchmark source.

It answers like Asterisk 22.10.1 as captured in tests/fixtures (banner, logins, lists,
Command, Filter, errors) and plays real captured call event sequences. See
:class:`AMISimulator`, :func:`replay` and :func:`serve_forever`.
"""

from .calls import Call
from .model import ALL_CLASSES
from .replay import ReplayServer, replay
from .server import (
           AMISimulator,
           FaultConfig,
           SimSession,
           SimulatorStats,
           SimUser,
           StreamStats,
           serve_forever,
)

__all__ = ["ALL_CLASSES", "AMISimulator", "Call", "FaultConfig", "ReplayServer", "SimSession",
           "SimUser", "SimulatorStats", "StreamStats", "replay", "serve_forever"]
