"""Goridge v3 frames: the framing RoadRunner uses between its server and its workers.

Byte layout (docs/protocols.md section 1), all integers little-endian::

    byte 0      version (1) << 4 | HL, HL = header length in 32-bit words = 3 + options
    byte 1      flags (CONTROL, codec bits, ERROR)
    bytes 2-5   payload length (u32)
    bytes 6-9   CRC-32/IEEE of bytes 0-5 only (u32)
    byte 10     stream bits (STREAM, STOP, PING, PONG)
    byte 11     reserved, 0
    options     HL - 3 u32 words (at most 10)
    payload     payload-length bytes

The worker protocol (section 2 there) always sends exactly one option on requests and responses:
the context length, so that payload = context || body. Control frames (``{"pid":N}``,
``{"stop":true}``) and error frames have no options.

Three ways to read frames:

- :class:`FrameDecoder`, sans-I/O: ``feed()`` bytes in any chunking, ``next_frame()`` returns a
  frame or ``None`` when more bytes are needed;
- :func:`read_frame` over an :class:`asyncio.StreamReader`;
- :func:`read_frame_sync` over a blocking binary stream.

Malformed input raises :class:`FrameError` (a :class:`ValueError`); a header whose CRC does not
match raises its subclass :class:`CRCError`. Both messages show the first bytes received, which
is almost always text a worker printed on its stdout.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import zlib
from dataclasses import dataclass
from typing import BinaryIO

import orjson

__all__ = [
    "BYTE10_PING",
    "BYTE10_PONG",
    "BYTE10_STOP",
    "BYTE10_STREAM",
    "CODEC_GOB",
    "CODEC_JSON",
    "CODEC_MSGPACK",
    "CODEC_PROTO",
    "CODEC_RAW",
    "CONTROL",
    "ERROR",
    "HEADER_SIZE",
    "MAX_OPTIONS",
    "VERSION",
    "CRCError",
    "Frame",
    "FrameDecoder",
    "FrameError",
    "encode_control",
    "encode_error",
    "encode_frame",
    "encode_payload",
    "read_frame",
    "read_frame_sync",
]

VERSION = 1

# Flags, byte 1 (spec 1.2).
CONTROL = 0x01
CODEC_RAW = 0x04
CODEC_JSON = 0x08
CODEC_MSGPACK = 0x10
CODEC_GOB = 0x20
ERROR = 0x40
CODEC_PROTO = 0x80

# Byte 10 (spec 1.3).
BYTE10_STREAM = 0x01
BYTE10_STOP = 0x02
BYTE10_PING = 0x04
BYTE10_PONG = 0x08

HEADER_SIZE = 12
MAX_OPTIONS = 10
MAX_PAYLOAD = 2**32 - 1

_MIN_HL = 3
_HEAD6 = struct.Struct("<BBI")  # byte 0, flags, payload length
_U32 = struct.Struct("<I")
_TAIL = struct.Struct("<IBB")  # crc, byte10, byte11
_OPTIONS = [struct.Struct(f"<{n}I") for n in range(MAX_OPTIONS + 1)]
_ONE_OPTION_PREFIX = bytes([(VERSION << 4) | (_MIN_HL + 1)])

# PHP prints "Could not open input file: x.php" on stdout when the worker script does not exist.
_PHP_NO_FILE = b"Could not op"
_STDOUT_CRC_HELP = "https://docs.roadrunner.dev/error-codes/stdout-crc"
_SHOWN_BYTES = 120


class FrameError(ValueError):
    """A malformed frame: bad header, bad options, truncated stream or a payload that won't split.

    Also raised by the encoders when asked to build an impossible frame (too many options, a
    value that does not fit in 32 bits).
    """


class CRCError(FrameError):
    """The header CRC does not match: usually text a worker printed on its stdout."""


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded (or to-be-encoded) frame."""

    flags: int
    payload: bytes = b""
    options: tuple[int, ...] = ()
    byte10: int = 0

    @property
    def is_control(self) -> bool:
        return bool(self.flags & CONTROL)

    @property
    def is_error(self) -> bool:
        return bool(self.flags & ERROR)

    def split(self) -> tuple[bytes, bytes]:
        """``(context, body)`` for the worker protocol, using ``options[0]`` as context length."""
        if not self.options:
            raise FrameError("frame has no options: expected one option holding the context length")
        size = self.options[0]
        if size > len(self.payload):
            raise FrameError(
                f"bad payload: context length {size} (option 0) is larger than the "
                f"{len(self.payload)}-byte payload"
            )
        payload = self.payload
        return payload[:size], payload[size:]

    def json(self) -> object:
        """The payload parsed as JSON (control frames); FrameError if it is not JSON."""
        try:
            return orjson.loads(self.payload)
        except orjson.JSONDecodeError as exc:
            raise FrameError(f"frame payload is not JSON: {_show(self.payload)}") from exc


# --------------------------------------------------------------------------- encoding


def _header(flags: int, length: int, byte10: int, n_options: int) -> bytes:
    head = _HEAD6.pack((VERSION << 4) | (_MIN_HL + n_options), flags, length)
    return head + _TAIL.pack(zlib.crc32(head), byte10, 0)


def encode_frame(frame: Frame) -> bytes:
    """The frame as one bytes object, to be written in one write call."""
    options = frame.options
    if len(options) > MAX_OPTIONS:
        raise FrameError(f"too many options: {len(options)} (a frame holds at most {MAX_OPTIONS})")
    if not 0 <= frame.flags <= 0xFF:
        raise FrameError(f"flags out of range: {frame.flags!r} (one byte)")
    if not 0 <= frame.byte10 <= 0xFF:
        raise FrameError(f"byte10 out of range: {frame.byte10!r} (one byte)")
    payload = frame.payload
    if len(payload) > MAX_PAYLOAD:
        raise FrameError(f"payload too large: {len(payload)} bytes (at most {MAX_PAYLOAD})")
    try:
        packed = _OPTIONS[len(options)].pack(*options)
    except struct.error as exc:
        raise FrameError(f"option out of range (unsigned 32-bit): {options!r}") from exc
    return b"".join(
        (_header(frame.flags, len(payload), frame.byte10, len(options)), packed, payload)
    )


def encode_payload(context: bytes, body: bytes, *, flags: int = 0, byte10: int = 0) -> bytes:
    """A worker-protocol request or response: one option = ``len(context)``, payload = both."""
    n_context = len(context)
    length = n_context + len(body)
    if length > MAX_PAYLOAD:
        raise FrameError(f"payload too large: {length} bytes (at most {MAX_PAYLOAD})")
    head = _HEAD6.pack((VERSION << 4) | (_MIN_HL + 1), flags, length)
    return b"".join(
        (head, _TAIL.pack(zlib.crc32(head), byte10, 0), _U32.pack(n_context), context, body)
    )


def encode_control(document: dict) -> bytes:
    """A control frame (flags CONTROL|CODEC_JSON, no options) carrying compact JSON."""
    payload = orjson.dumps(document)  # compact, like json.dumps(separators=(",", ":"))
    return _header(CONTROL | CODEC_JSON, len(payload), 0, 0) + payload


def encode_error(message: str) -> bytes:
    """An error frame (flags ERROR, no options) carrying the UTF-8 text."""
    payload = message.encode("utf-8", "surrogateescape")
    return _header(ERROR, len(payload), 0, 0) + payload


# --------------------------------------------------------------------------- decoding


def _show(data: bytes | bytearray | memoryview) -> str:
    return repr(bytes(data[:_SHOWN_BYTES])) + ("..." if len(data) > _SHOWN_BYTES else "")


def _garbage(data: bytes | bytearray | memoryview, reason: str) -> FrameError:
    """The error for bytes that are not a frame, showing them like RoadRunner does."""
    data = bytes(data)
    if data.startswith(_PHP_NO_FILE):
        text = data.decode("utf-8", "replace").strip()
        return FrameError(
            f"worker printed {text!r} on stdout instead of a frame: the worker script "
            "was not found (check server.command)"
        )
    cls = CRCError if reason == "crc" else FrameError
    if reason == "crc":
        what = "header CRC mismatch"
    elif reason == "version":
        what = f"unsupported frame version {data[0] >> 4} (expected {VERSION})"
    else:
        what = (
            f"bad header length {data[0] & 0x0F} words "
            f"(expected {_MIN_HL}..{_MIN_HL + MAX_OPTIONS})"
        )
    return cls(
        f"validation failed on the message sent to STDOUT ({what}), see: {_STDOUT_CRC_HELP}; "
        f"did the worker print to stdout? invalid message: {_show(data)}"
    )


def _good_first_byte(b0: int) -> bool:
    return b0 >> 4 == VERSION and _MIN_HL <= (b0 & 0x0F) <= _MIN_HL + MAX_OPTIONS


def _first_byte_reason(b0: int) -> str:
    return "version" if b0 >> 4 != VERSION else "hl"


def _parse_header(
    header: bytes | bytearray, verify_crc: bool, max_payload: int
) -> tuple[int, int, int, int]:
    """``(n_options, flags, payload_length, byte10)``; raises on a bad header.

    ``header`` may be longer than 12 bytes (the rest is shown in error messages).
    """
    b0, flags, length = _HEAD6.unpack_from(header)
    if header.startswith(_PHP_NO_FILE):
        raise _garbage(header, "php")
    if verify_crc:
        (crc,) = _U32.unpack_from(header, 6)
        if crc != zlib.crc32(memoryview(header)[:6]):
            raise _garbage(header, "crc")
    if b0 >> 4 != VERSION:
        raise _garbage(header, "version")
    hl = b0 & 0x0F
    if not _MIN_HL <= hl <= _MIN_HL + MAX_OPTIONS:
        raise _garbage(header, "hl")
    if length > max_payload:
        raise FrameError(
            f"frame payload of {length} bytes exceeds the limit of {max_payload} bytes"
        )
    return hl - _MIN_HL, flags, length, header[10]


class FrameDecoder:
    """Sans-I/O frame parser: ``feed()`` bytes, then call ``next_frame()`` until ``None``.

    A truncated frame is not an error here: the decoder waits for more bytes. Bytes that cannot
    start a frame raise at once (FrameError / CRCError), and the decoder should then be dropped:
    there is no resynchronising on a byte stream.
    """

    __slots__ = ("_buf", "_max_payload", "_verify_crc")

    def __init__(self, *, verify_crc: bool = True, max_payload: int = MAX_PAYLOAD) -> None:
        self._buf = bytearray()
        self._verify_crc = verify_crc
        self._max_payload = max_payload

    def feed(self, data: bytes) -> None:
        self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as frames."""
        return len(self._buf)

    def next_frame(self) -> Frame | None:
        buf = self._buf
        if len(buf) < HEADER_SIZE:
            # Text on stdout never starts with a valid byte 0: fail before 12 bytes arrive.
            if buf and not _good_first_byte(buf[0]):
                raise _garbage(buf, _first_byte_reason(buf[0]))
            return None
        n_options, flags, length, byte10 = _parse_header(buf, self._verify_crc, self._max_payload)
        opt_end = HEADER_SIZE + 4 * n_options
        end = opt_end + length
        if len(buf) < end:
            return None
        options = _OPTIONS[n_options].unpack_from(buf, HEADER_SIZE) if n_options else ()
        payload = bytes(buf[opt_end:end])
        del buf[:end]
        return Frame(flags, payload, options, byte10)

    def __iter__(self):
        """Every complete frame buffered so far."""
        while (frame := self.next_frame()) is not None:
            yield frame


async def read_frame(reader: asyncio.StreamReader, *, verify_crc: bool = True) -> Frame:
    """Read one frame.

    At a clean end of stream (nothing read), :class:`asyncio.IncompleteReadError` propagates
    (it is a subclass of :class:`EOFError`, so ``except EOFError`` catches it too). A stream that
    ends inside a frame raises :class:`FrameError` ("truncated frame"), as do malformed bytes.
    Text printed on the worker's stdout is detected from its first byte, without waiting for a
    full header.
    """
    first = await reader.readexactly(1)  # IncompleteReadError with empty partial at clean EOF
    if not _good_first_byte(first[0]):
        raise _garbage(first + await _drain(reader), _first_byte_reason(first[0]))
    try:
        header = first + await reader.readexactly(HEADER_SIZE - 1)
    except asyncio.IncompleteReadError as exc:
        raise _truncated(first + exc.partial, HEADER_SIZE) from exc
    try:
        n_options, flags, length, byte10 = _parse_header(header, verify_crc, MAX_PAYLOAD)
    except FrameError:
        # Show more of the garbage, as RoadRunner does: whatever arrives shortly.
        _parse_header(header + await _drain(reader), verify_crc, MAX_PAYLOAD)
        raise
    rest = 4 * n_options + length
    try:
        data = await reader.readexactly(rest) if rest else b""
    except asyncio.IncompleteReadError as exc:
        raise _truncated(header + exc.partial, HEADER_SIZE + rest) from exc
    if n_options:
        options = _OPTIONS[n_options].unpack_from(data)
        return Frame(flags, data[4 * n_options :], options, byte10)
    return Frame(flags, data, (), byte10)


async def _drain(reader: asyncio.StreamReader) -> bytes:
    """Whatever arrives within a short delay (to show it in an error message)."""
    chunks: list[bytes] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 0.2
    with contextlib.suppress(Exception):
        while (left := deadline - loop.time()) > 0 and sum(map(len, chunks)) < _SHOWN_BYTES:
            chunk = await asyncio.wait_for(reader.read(4096), left)
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def _truncated(got: bytes, expected: int) -> FrameError:
    return FrameError(
        f"truncated frame: the stream ended after {len(got)} of {expected} bytes"
        f" (worker exited?): {_show(got)}"
    )


def _read_exactly(stream: BinaryIO, size: int) -> bytes:
    """``size`` bytes, looping on short reads; shorter only at end of stream."""
    data = stream.read(size)
    if data is None:
        raise FrameError("read_frame_sync needs a blocking stream (read() returned None)")
    if len(data) == size or not data:
        return data
    chunks = [data]
    got = len(data)
    while got < size:
        chunk = stream.read(size - got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _read_line(stream: BinaryIO, header: bytes) -> bytes:
    """The header plus the rest of its text line (to show garbage in an error message)."""
    if b"\n" in header:
        return header
    with contextlib.suppress(Exception):
        return header + stream.readline(_SHOWN_BYTES)
    return header


def read_frame_sync(stream: BinaryIO, *, verify_crc: bool = True) -> Frame | None:
    """Read one frame from a blocking binary stream.

    Returns ``None`` at a clean end of stream (before any header byte); raises
    :class:`FrameError` on a truncated frame or malformed bytes. Text printed on stdout is
    detected from its first byte.
    """
    first = _read_exactly(stream, 1)
    if not first:
        return None
    if not _good_first_byte(first[0]):
        raise _garbage(_read_line(stream, first), _first_byte_reason(first[0]))
    header = first + _read_exactly(stream, HEADER_SIZE - 1)
    if len(header) < HEADER_SIZE:
        raise _truncated(header, HEADER_SIZE)
    try:
        n_options, flags, length, byte10 = _parse_header(header, verify_crc, MAX_PAYLOAD)
    except FrameError:
        _parse_header(_read_line(stream, header), verify_crc, MAX_PAYLOAD)
        raise
    rest = 4 * n_options + length
    data = _read_exactly(stream, rest) if rest else b""
    if len(data) < rest:
        raise _truncated(header + data, HEADER_SIZE + rest)
    if n_options:
        options = _OPTIONS[n_options].unpack_from(data)
        return Frame(flags, data[4 * n_options :], options, byte10)
    return Frame(flags, data, (), byte10)
