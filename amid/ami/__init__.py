"""amid.ami: the AMI protocol (sans-IO) and the asyncio session built on it."""
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
                               recover_bytes,
)

__all__ = ["ActionIdGenerator", "Event", "LocalProtocolError", "Message", "Parser", "ProtocolError",
           "RemoteProtocolError", "Response", "encode_action", "recover_bytes"]
