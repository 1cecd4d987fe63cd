"""Sans-IO frame codec, message layer and device protocols (docs/protocol.md, docs/protocols.md).

Nothing in this package touches a socket, a serial port, a clock or asyncio:
feed it bytes, get events back.
"""

from .errors import (
    CommandError,
    ErrorCode,
    FrameGatewayError,
    LocalProtocolError,
    RemoteProtocolError,
)
from .link import (
    HEADER,
    MAX_PAYLOAD,
    DecoderEvent,
    Discarded,
    DiscardReason,
    Frame,
    FrameDecoder,
    encode_frame,
    frame_struct,
    max_frame_size,
)
from .messages import (
    Ack,
    Command,
    Data,
    Error,
    Hello,
    Message,
    MessageType,
    Ping,
    Pong,
    Welcome,
    decode_message,
    valid_client_id,
    valid_protocol_name,
)
from .options import CRC_EXTENSION_IN_USE, FrameOptions
from .protocols import (
    CommandSchema,
    ConstructProtocol,
    HexProtocol,
    Protocol,
    get_protocol,
    known_protocols,
    register_protocol,
)
from .schema import Boolean, ChannelMask, Integer, Scaled

__all__ = [
    "CRC_EXTENSION_IN_USE",
    "HEADER",
    "MAX_PAYLOAD",
    "Ack",
    "Boolean",
    "ChannelMask",
    "Command",
    "CommandError",
    "CommandSchema",
    "ConstructProtocol",
    "Data",
    "DecoderEvent",
    "DiscardReason",
    "Discarded",
    "Error",
    "ErrorCode",
    "Frame",
    "FrameDecoder",
    "FrameGatewayError",
    "FrameOptions",
    "Hello",
    "HexProtocol",
    "Integer",
    "LocalProtocolError",
    "Message",
    "MessageType",
    "Ping",
    "Pong",
    "Protocol",
    "RemoteProtocolError",
    "Scaled",
    "Welcome",
    "decode_message",
    "encode_frame",
    "frame_struct",
    "get_protocol",
    "known_protocols",
    "max_frame_size",
    "register_protocol",
    "valid_client_id",
    "valid_protocol_name",
]
