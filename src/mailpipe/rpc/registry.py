"""The RPC methods by name ("service.Method"): each part of mailpipe registers its own."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from mailpipe.rpc.codec import (
    CODEC_JSON,
    CODEC_PROTO,
    CODECS,
    Call,
    CodecError,
    decode_body,
    encode_body,
)

Handler = Callable[[Any], Awaitable[Any]]


class RPCError(Exception):
    """What a method answers as an error: its text goes back with the ERROR flag (PHP's
    client throws it as a ServiceException)."""


@dataclass(frozen=True, slots=True)
class Method:
    name: str
    handler: Handler
    # A protobuf method: its argument and result message classes. It also takes JSON, as
    # RoadRunner's Go server does (the generated structs' JSON is protobuf's field names).
    request: type | None = None
    response: type | None = None

    async def invoke(self, call: Call) -> bytes:
        if self.request is None:
            return encode_body(call.codec, await self.handler(decode_body(call.codec, call.body)))
        return _to_proto_body(call.codec, await self.handler(self._message(call)))

    def _message(self, call: Call) -> Any:
        from google.protobuf import json_format
        from google.protobuf.message import DecodeError

        assert self.request is not None
        message = self.request()
        try:
            if call.codec == CODEC_PROTO:
                message.ParseFromString(call.body)
            elif call.codec == CODEC_JSON:
                json_format.Parse(call.body or b"{}", message, ignore_unknown_fields=True)
            else:
                raise CodecError(f"{self.name} takes protobuf (0x80) or JSON (0x08), not "
                                 f"{CODECS.get(call.codec, hex(call.codec))}")
        except (DecodeError, json_format.ParseError) as exc:
            raise CodecError(f"the body is not a {message.DESCRIPTOR.full_name}: {exc}") from None
        return message


def _to_proto_body(codec: int, message: Any) -> bytes:
    if codec == CODEC_PROTO:
        return message.SerializeToString()
    from google.protobuf import json_format

    return json_format.MessageToJson(message, preserving_proto_field_name=True,
                                     indent=None).encode()


class Registry:
    def __init__(self) -> None:
        self._methods: dict[str, Method] = {}
        # Exceptions that are answers, not failures: their text goes back, no traceback.
        self.expected: tuple[type[BaseException], ...] = (RPCError, CodecError)

    def expect(self, *types: type[BaseException]) -> None:
        self.expected = (*self.expected, *types)

    def register(self, name: str, handler: Handler, *, request: type | None = None,
                 response: type | None = None) -> None:
        if "." not in name:
            raise ValueError(f"RPC method names are service.Method, got {name!r}")
        if name in self._methods:
            raise ValueError(f"RPC method {name} is registered twice")
        self._methods[name] = Method(name, handler, request, response)

    def get(self, name: str) -> Method:
        """The method; RPCError worded as Go's net/rpc words it when there is none."""
        method = self._methods.get(name)
        if method is None:
            service = name.partition(".")[0]
            if not any(n.partition(".")[0] == service for n in self._methods):
                raise RPCError(f"rpc: can't find service {name}")
            raise RPCError(f"rpc: can't find method {name}")
        return method

    def names(self) -> list[str]:
        return sorted(self._methods)
