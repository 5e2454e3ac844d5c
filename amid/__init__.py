"""amid: the Asterisk Manager Interface event daemon, and the asyncio AMI library under it.

Library use::

    from amid import AMIClient

    async with AMIClient("pbx.example.com", username="amid", secret="s3cret") as ami:
        ami.add_event_handler("Hangup", lambda event: print(event["Channel"]))
        response = await ami.send_action("CoreStatus")
"""

__version__ = "0.1.0"

from amid.ami.protocol import (
                               ActionIdGenerator,
                               Event,
                               LocalProtocolError,
                               Message,
                               Parser,
                               ProtocolError,
                               RemoteProtocolError,
                               Response,
                               encode_action,
)
from amid.ami.session import (
                               DEFAULT_PORT,
                               ActionTimeout,
                               AMIClient,
                               AMIConnectionError,
                               AMIError,
                               ConnectionState,
                               LoginError,
                               StateChange,
                               is_error,
                               is_success,
                               make_ssl_context,
)
from amid.records import Record

__all__ = [
                               "DEFAULT_PORT",
                               "AMIClient",
                               "AMIConnectionError",
                               "AMIError",
                               "ActionIdGenerator",
                               "ActionTimeout",
                               "ConnectionState",
                               "Event",
                               "LocalProtocolError",
                               "LoginError",
                               "Message",
                               "Parser",
                               "ProtocolError",
                               "Record",
                               "RemoteProtocolError",
                               "Response",
                               "StateChange",
                               "__version__",
                               "encode_action",
                               "is_error",
                               "is_success",
                               "make_ssl_context",
]
