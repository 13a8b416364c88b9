"""Goridge RPC, sans-I/O: the calls RoadRunner's RPC endpoint (`rpc.listen`) carries.

A call is one Goridge frame (workers/goridge.py, whose codec this reuses) with exactly two
options, ``[sequence id, length of the method name]``, and a payload of the method name
followed by the encoded argument; the flags name the body's codec. The answer is the same
layout, the same sequence id and method name, the result encoded with the request's codec, or
the ERROR flag and the error text after the method name (docs/protocols.md section 3.1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from mailpipe.workers.goridge import (
    CODEC_GOB,
    CODEC_JSON,
    CODEC_MSGPACK,
    CODEC_PROTO,
    CODEC_RAW,
    ERROR,
    Frame,
    FrameError,
    encode_frame,
)

__all__ = [
    "CODECS",
    "CODEC_JSON",
    "CODEC_MSGPACK",
    "CODEC_PROTO",
    "CODEC_RAW",
    "Call",
    "CodecError",
    "FrameError",
    "codec_of",
    "decode_body",
    "encode_body",
    "encode_call",
    "encode_error_reply",
    "encode_reply",
    "parse_call",
]

CODECS = {CODEC_RAW: "raw", CODEC_JSON: "json", CODEC_MSGPACK: "msgpack", CODEC_PROTO: "proto"}
_CODEC_BITS = CODEC_RAW | CODEC_JSON | CODEC_MSGPACK | CODEC_GOB | CODEC_PROTO
MAX_METHOD = 256  # "service.Method"; anything longer is not a method name


class CodecError(ValueError):
    """A body that cannot be decoded or encoded with the call's codec: an error answer, the
    connection carries on."""


@dataclass(frozen=True, slots=True)
class Call:
    """One request or answer: sequence id, method name, codec flag, body bytes."""

    seq: int
    method: str
    codec: int
    body: bytes = b""
    error: bool = False  # an answer with the ERROR flag: `body` is the error text

    @property
    def error_text(self) -> str:
        return self.body.decode("utf-8", "replace")


def codec_of(flags: int) -> int:
    """The single codec bit of a frame's flags; FrameError when none or several are set."""
    bits = flags & _CODEC_BITS
    if bits & (bits - 1):
        raise FrameError(f"RPC frame names several codecs (flags 0x{flags:02x})")
    if not bits:
        raise FrameError(f"RPC frame names no codec (flags 0x{flags:02x})")
    return bits


def parse_call(frame: Frame) -> Call:
    """A decoded frame as a call; FrameError when it does not have the RPC layout."""
    if len(frame.options) != 2:
        raise FrameError(f"RPC frame has {len(frame.options)} options, expected 2 "
                         "(sequence id, method name length)")
    seq, size = frame.options
    if size > len(frame.payload) or size > MAX_METHOD:
        raise FrameError(f"RPC method name length {size} does not fit the "
                         f"{len(frame.payload)}-byte payload")
    try:
        method = frame.payload[:size].decode("ascii")
    except UnicodeDecodeError:
        raise FrameError(f"RPC method name is not ASCII: {frame.payload[:size][:60]!r}") from None
    codec = codec_of(frame.flags & ~ERROR)
    return Call(seq, method, codec, frame.payload[size:], bool(frame.flags & ERROR))


def encode_call(call: Call) -> bytes:
    """The frame of a request or an answer (an error answer when `call.error`)."""
    name = call.method.encode("ascii")
    flags = call.codec | (ERROR if call.error else 0)
    return encode_frame(Frame(flags, name + call.body, (call.seq, len(name))))


def encode_reply(request: Call, body: bytes) -> bytes:
    return encode_call(Call(request.seq, request.method, request.codec, body))


def encode_error_reply(seq: int, method: str, codec: int, text: str) -> bytes:
    body = text.encode("utf-8", "replace")
    return encode_call(Call(seq, method, codec or CODEC_JSON, body, error=True))


# ---- bodies -------------------------------------------------------------------------------


def decode_body(codec: int, body: bytes) -> Any:
    """The argument of a JSON, msgpack or raw call (protobuf bodies are parsed by the
    method, which knows its message type)."""
    if codec == CODEC_RAW:
        return body
    if codec == CODEC_JSON:
        try:
            return orjson.loads(body) if body else None
        except orjson.JSONDecodeError as exc:
            raise CodecError(f"the JSON body does not parse: {exc}") from None
    if codec == CODEC_MSGPACK:
        try:
            return _msgpack().unpackb(body, raw=False) if body else None
        except CodecError:
            raise
        except Exception as exc:  # msgpack raises several kinds on bad input
            raise CodecError(f"the msgpack body does not parse: {exc}") from None
    raise CodecError(f"codec {CODECS.get(codec, hex(codec))} cannot carry this method's "
                     "argument (use JSON 0x08, msgpack 0x10 or raw 0x04)")


def encode_body(codec: int, value: Any) -> bytes:
    if codec == CODEC_RAW:
        if isinstance(value, bytes | bytearray):
            return bytes(value)
        raise CodecError("this method's result is not bytes: call it with the JSON codec")
    if codec == CODEC_JSON:
        return orjson.dumps(value)
    if codec == CODEC_MSGPACK:
        return _msgpack().packb(value, use_bin_type=True)
    raise CodecError(f"codec {CODECS.get(codec, hex(codec))} cannot carry this method's result")


def _msgpack() -> Any:
    try:
        import msgpack
    except ImportError:  # pragma: no cover - a dependency; the error names it if it is gone
        raise CodecError("the msgpack codec needs the msgpack package") from None
    return msgpack
