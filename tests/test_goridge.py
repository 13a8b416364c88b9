"""Goridge v3 frame codec: the spec's worked examples, round trips, and malformed input."""

from __future__ import annotations

import asyncio
import io
import itertools
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz.strategies import work_budget
from mailpipe.workers import goridge
from mailpipe.workers.goridge import (
    BYTE10_PONG,
    BYTE10_STOP,
    CODEC_JSON,
    CODEC_PROTO,
    CODEC_RAW,
    CONTROL,
    ERROR,
    HEADER_SIZE,
    MAX_OPTIONS,
    CRCError,
    Frame,
    FrameDecoder,
    FrameError,
    encode_control,
    encode_error,
    encode_frame,
    encode_payload,
    read_frame,
    read_frame_sync,
)

H = bytes.fromhex

# --------------------------------------------------------------------------- spec 1.9 vectors

CTX80 = bytes(range(80))


@pytest.mark.parametrize(
    ("encoded", "expected"),
    [
        pytest.param(
            encode_control({"pid": 1234}),
            H("13 09 0c 00 00 00 5f 0c 46 73 00 00") + b'{"pid":1234}',
            id="pid-request",
        ),
        pytest.param(
            encode_control({"stop": True}),
            H("13 09 0d 00 00 00 3a 6b fa cb 00 00") + b'{"stop":true}',
            id="stop",
        ),
        pytest.param(
            encode_frame(Frame(0, byte10=BYTE10_PONG)),
            H("13 00 00 00 00 00 96 d1 80 34 08 00"),
            id="pong",
        ),
        pytest.param(
            encode_frame(Frame(0, byte10=BYTE10_STOP)),
            H("13 00 00 00 00 00 96 d1 80 34 02 00"),
            id="stream-stop",
        ),
        pytest.param(
            encode_payload(CTX80, b"body", flags=CODEC_RAW),
            H("14 04 54 00 00 00 1b df 6a 98 00 00 50 00 00 00") + CTX80 + b"body",
            id="jobs-request",
        ),
        pytest.param(
            encode_payload(b"", b'{"type":2}'),
            H("14 00 0a 00 00 00 4a 01 38 46 00 00 00 00 00 00") + b'{"type":2}',
            id="worker-response",
        ),
        pytest.param(
            encode_error("boom"),
            H("13 40 04 00 00 00 88 1e 11 e3 00 00 62 6f 6f 6d"),
            id="error",
        ),
        pytest.param(
            encode_frame(Frame(CODEC_PROTO, b"jobs.Push", (1, 9))),
            H("15 80 09 00 00 00 93 cd 37 2e 00 00 01 00 00 00 09 00 00 00") + b"jobs.Push",
            id="rpc-request",
        ),
    ],
)
def test_spec_worked_examples(encoded: bytes, expected: bytes) -> None:
    assert encoded == expected
    decoder = FrameDecoder()
    decoder.feed(expected)
    frame = decoder.next_frame()
    assert frame is not None
    assert encode_frame(frame) == expected
    assert decoder.next_frame() is None
    assert decoder.buffered == 0


def test_decoded_fields_of_spec_examples() -> None:
    decoder = FrameDecoder()
    decoder.feed(encode_control({"pid": 1234}) + encode_payload(CTX80, b"body", flags=CODEC_RAW))
    control = decoder.next_frame()
    assert control == Frame(CONTROL | CODEC_JSON, b'{"pid":1234}')
    assert control.is_control and not control.is_error
    assert control.json() == {"pid": 1234}
    request = decoder.next_frame()
    assert request is not None
    assert request.flags == CODEC_RAW and request.options == (80,)
    assert request.split() == (CTX80, b"body")
    error = Frame(ERROR, b"boom")
    assert error.is_error and not error.is_control


def test_worker_stop_bytes() -> None:
    """Worker-initiated stop (spec 2.7): a data frame, context exactly {"stop":true}."""
    data = encode_payload(b'{"stop":true}', b"")
    assert data[:1] == b"\x14" and data[1] == 0
    assert data[12:16] == (13).to_bytes(4, "little")
    assert data[16:] == b'{"stop":true}'


def test_encode_payload_equals_encode_frame() -> None:
    ctx, body = b'{"event":"EMAIL_RECEIVED"}', b"raw message"
    assert encode_payload(ctx, body, flags=CODEC_JSON, byte10=1) == encode_frame(
        Frame(CODEC_JSON, ctx + body, (len(ctx),), 1)
    )


def test_control_json_is_compact() -> None:
    data = encode_control({"pid": 7, "x": [1, 2]})
    assert data[HEADER_SIZE:] == b'{"pid":7,"x":[1,2]}'


def test_error_text_utf8() -> None:
    data = encode_error("échec ✗")
    decoder = FrameDecoder()
    decoder.feed(data)
    frame = decoder.next_frame()
    assert frame is not None and frame.is_error and frame.options == ()
    assert frame.payload.decode() == "échec ✗"


# --------------------------------------------------------------------------- round trips

frames = st.builds(
    Frame,
    flags=st.integers(0, 255),
    payload=st.binary(max_size=2048),
    options=st.lists(st.integers(0, 2**32 - 1), max_size=MAX_OPTIONS).map(tuple),
    byte10=st.integers(0, 255),
)


@given(frame=frames)
def test_round_trip_one_frame(frame: Frame) -> None:
    data = encode_frame(frame)
    assert len(data) == HEADER_SIZE + 4 * len(frame.options) + len(frame.payload)
    assert data[0] == 0x10 | (3 + len(frame.options))
    assert int.from_bytes(data[6:10], "little") == zlib.crc32(data[:6])
    decoder = FrameDecoder()
    decoder.feed(data)
    assert decoder.next_frame() == frame
    assert decoder.buffered == 0
    assert read_frame_sync(io.BytesIO(data)) == frame


@given(
    frame_list=st.lists(frames, min_size=1, max_size=6),
    cuts=st.lists(st.integers(0, 20000), max_size=12),
)
def test_round_trip_random_chunking(frame_list: list[Frame], cuts: list[int]) -> None:
    stream = b"".join(encode_frame(f) for f in frame_list)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    decoder = FrameDecoder()
    out: list[Frame] = []
    for start, end in itertools.pairwise(points):
        decoder.feed(stream[start:end])
        while (frame := decoder.next_frame()) is not None:
            out.append(frame)
    assert out == frame_list
    assert decoder.buffered == 0
    # The sync reader on the same bytes, then clean EOF.
    buf = io.BytesIO(stream)
    assert [read_frame_sync(buf) for _ in frame_list] == frame_list
    assert read_frame_sync(buf) is None


@given(context=st.binary(max_size=300), body=st.binary(max_size=300), flags=st.integers(0, 255))
def test_round_trip_payload_split(context: bytes, body: bytes, flags: int) -> None:
    decoder = FrameDecoder()
    decoder.feed(encode_payload(context, body, flags=flags))
    frame = decoder.next_frame()
    assert frame is not None and frame.flags == flags and frame.options == (len(context),)
    assert frame.split() == (context, body)


@settings(max_examples=30, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frame_list=st.lists(frames, min_size=1, max_size=4), chunk=st.integers(1, 50))
def test_round_trip_async(frame_list: list[Frame], chunk: int) -> None:
    async def run() -> list[Frame]:
        reader = asyncio.StreamReader()
        data = b"".join(encode_frame(f) for f in frame_list)

        async def feed() -> None:
            for i in range(0, len(data), chunk):
                reader.feed_data(data[i : i + chunk])
                await asyncio.sleep(0)
            reader.feed_eof()

        task = asyncio.create_task(feed())
        out = [await read_frame(reader) for _ in frame_list]
        with pytest.raises(asyncio.IncompleteReadError):
            await read_frame(reader)
        await task
        return out

    assert asyncio.run(run()) == frame_list


# --------------------------------------------------------------------------- malformed input


def test_crc_mismatch() -> None:
    data = bytearray(encode_control({"pid": 1}))
    data[2] ^= 0x10  # payload length changed (9 -> 25), CRC not
    decoder = FrameDecoder()
    decoder.feed(bytes(data))
    with pytest.raises(CRCError, match="CRC mismatch") as info:
        decoder.next_frame()
    assert "stdout" in str(info.value)
    with pytest.raises(CRCError):
        read_frame_sync(io.BytesIO(bytes(data)))
    # Without verification the (wrong-length) header is taken as is: waits for more bytes.
    lax = FrameDecoder(verify_crc=False)
    lax.feed(bytes(data))
    assert lax.next_frame() is None


def test_crc_not_covering_byte10_options_payload() -> None:
    data = bytearray(encode_payload(b"ctx", b"body"))
    data[10] = BYTE10_PONG
    data[12] = 2  # option: context length 2
    data[-1] = ord("X")
    decoder = FrameDecoder()
    decoder.feed(bytes(data))
    frame = decoder.next_frame()
    assert frame == Frame(0, b"ctxbodX", (2,), BYTE10_PONG)


@given(
    frame=frames,
    index=st.integers(0, 9),
    bit=st.integers(0, 7),
)
def test_any_header_bit_flip_is_detected(frame: Frame, index: int, bit: int) -> None:
    data = bytearray(encode_frame(frame))
    data[index] ^= 1 << bit
    decoder = FrameDecoder()
    decoder.feed(bytes(data))
    with pytest.raises(FrameError):
        decoder.next_frame()


@given(frame=frames, data=st.data())
def test_truncation_waits_and_sync_raises(frame: Frame, data: st.DataObject) -> None:
    encoded = encode_frame(frame)
    cut = data.draw(st.integers(1, len(encoded) - 1))
    decoder = FrameDecoder()
    decoder.feed(encoded[:cut])
    assert decoder.next_frame() is None  # waits, never raises or hangs
    assert decoder.buffered == cut
    decoder.feed(encoded[cut:])
    assert decoder.next_frame() == frame
    with pytest.raises(FrameError, match="truncated"):
        read_frame_sync(io.BytesIO(encoded[:cut]))


def test_truncated_async() -> None:
    encoded = encode_payload(b"context", b"body")

    async def run(cut: int) -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(encoded[:cut])
        reader.feed_eof()
        await asyncio.wait_for(read_frame(reader), 5)

    for cut in (3, 12, 15, 20):
        with pytest.raises(FrameError, match="truncated"):
            asyncio.run(run(cut))
    with pytest.raises(asyncio.IncompleteReadError):
        asyncio.run(run(0))
    with pytest.raises(EOFError):  # IncompleteReadError is an EOFError
        asyncio.run(run(0))


def _header_with_good_crc(b0: int, flags: int, length: int, byte10: int) -> bytes:
    head = bytes([b0, flags]) + length.to_bytes(4, "little")
    return head + zlib.crc32(head).to_bytes(4, "little") + bytes([byte10, 0])


# Pure noise rarely gets past the CRC, so streams also splice real frames and headers whose CRC
# is right but whose version, header length, flags and payload length are anything.
_pieces = st.one_of(
    st.binary(max_size=64),
    frames.map(encode_frame),
    st.builds(
        _header_with_good_crc,
        b0=st.integers(0, 255),
        flags=st.integers(0, 255),
        length=st.integers(0, 300) | st.integers(0, 2**32 - 1),
        byte10=st.integers(0, 255),
    ),
)
garbage_streams = st.one_of(
    st.binary(min_size=1, max_size=200),
    st.lists(_pieces, min_size=1, max_size=6).map(b"".join).filter(bool),
)


def _decode_chunks(chunks: list[bytes]) -> tuple[list[Frame], bool, int]:
    """(frames, ended on a FrameError, bytes left waiting). Anything else it raises escapes."""
    decoder = FrameDecoder()
    out: list[Frame] = []
    total = sum(map(len, chunks))
    try:
        for chunk in chunks:
            decoder.feed(chunk)
            while (frame := decoder.next_frame()) is not None:
                out.append(frame)
                # Every frame consumes at least its header: more frames than that is a loop.
                assert len(out) <= total // HEADER_SIZE, "decoder returned the same bytes twice"
    except FrameError:
        return out, True, decoder.buffered
    return out, False, decoder.buffered


def _read_all_sync(data: bytes) -> tuple[list[Frame], bool]:
    stream = io.BytesIO(data)
    out: list[Frame] = []
    try:
        for _ in range(len(data) // HEADER_SIZE + 1):
            frame = read_frame_sync(stream)
            if frame is None:
                return out, False
            out.append(frame)
    except FrameError:
        return out, True
    raise AssertionError("read_frame_sync returned more frames than the stream can hold")


def _read_all_async(data: bytes) -> tuple[list[Frame], bool]:
    async def run() -> tuple[list[Frame], bool]:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        out: list[Frame] = []
        try:
            for _ in range(len(data) // HEADER_SIZE + 1):
                out.append(await read_frame(reader))
        except asyncio.IncompleteReadError as exc:
            assert exc.partial == b"", "IncompleteReadError is for a clean end only"
            return out, False
        except FrameError:
            return out, True
        raise AssertionError("read_frame returned more frames than the stream can hold")

    return asyncio.run(run())


@settings(max_examples=300, deadline=None)
@given(garbage=garbage_streams, cuts=st.lists(st.integers(0, 2000), max_size=8))
def test_random_garbage_never_hangs(garbage: bytes, cuts: list[int]) -> None:
    """Random bytes give frames, a wait for more, or a FrameError: never a loop, never another
    exception (an IndexError, a struct.error or a bare ValueError would fail here), and every
    reader and every chunking agrees on where the frames end and the error begins."""
    points = sorted({c % (len(garbage) + 1) for c in cuts} | {0, len(garbage)})
    chunks = [garbage[a:b] for a, b in itertools.pairwise(points)]
    # a bound on work (lines run in goridge.py), not on time: a loop fails at once
    with work_budget(goridge.__file__, 20_000 + 200 * len(garbage)):
        whole = _decode_chunks([garbage])
        chunked = _decode_chunks(chunks)
        sync = _read_all_sync(garbage)
        in_async = _read_all_async(garbage)

    frames_whole, failed, waiting = whole
    assert chunked[:2] == (frames_whole, failed)
    # The stream readers see an end of stream: bytes the decoder still waits for are an error.
    assert sync == in_async == (frames_whole, failed or waiting > 0)
    if not failed:
        assert waiting == len(garbage) - sum(len(encode_frame(f)) for f in frames_whole)


def test_too_many_options_refused() -> None:
    encode_frame(Frame(0, b"", tuple(range(MAX_OPTIONS))))
    with pytest.raises(FrameError, match="too many options"):
        encode_frame(Frame(0, b"", tuple(range(MAX_OPTIONS + 1))))
    with pytest.raises(ValueError):  # FrameError is a ValueError
        encode_frame(Frame(0, b"", tuple(range(MAX_OPTIONS + 1))))


def test_out_of_range_values_refused() -> None:
    with pytest.raises(FrameError):
        encode_frame(Frame(0, b"", (2**32,)))
    with pytest.raises(FrameError):
        encode_frame(Frame(0, b"", (-1,)))
    with pytest.raises(FrameError):
        encode_frame(Frame(256))
    with pytest.raises(FrameError):
        encode_frame(Frame(0, byte10=256))


def test_header_length_over_max_options_rejected() -> None:
    head = bytes([0x10 | 14, 0, 0, 0, 0, 0])  # HL 14 = 11 options
    data = head + zlib.crc32(head).to_bytes(4, "little") + b"\0\0" + b"\0" * 44
    decoder = FrameDecoder()
    decoder.feed(data)
    with pytest.raises(FrameError, match="header length"):
        decoder.next_frame()


def test_max_payload_limit() -> None:
    decoder = FrameDecoder(max_payload=10)
    decoder.feed(encode_payload(b"x" * 11, b""))
    with pytest.raises(FrameError, match="exceeds the limit"):
        decoder.next_frame()


def test_split_errors() -> None:
    with pytest.raises(FrameError, match="no options"):
        Frame(0, b"abc").split()
    with pytest.raises(FrameError, match="bad payload"):
        Frame(0, b"abc", (4,)).split()
    assert Frame(0, b"abc", (3,)).split() == (b"abc", b"")
    assert Frame(0, b"abc", (0, 99)).split() == (b"", b"abc")


def test_php_could_not_open_input_file() -> None:
    text = b"Could not open input file: /srv/worker.php\n"
    decoder = FrameDecoder()
    decoder.feed(text)
    with pytest.raises(FrameError, match="not found") as info:
        decoder.next_frame()
    assert "Could not open input file: /srv/worker.php" in str(info.value)

    with pytest.raises(FrameError, match="not found") as info:
        read_frame_sync(io.BytesIO(text))
    assert "/srv/worker.php" in str(info.value)

    async def run() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(text)
        reader.feed_eof()
        await read_frame(reader)

    with pytest.raises(FrameError, match=r"/srv/worker\.php"):
        asyncio.run(run())


def test_stdout_garbage_shows_the_bytes() -> None:
    text = b"Hello from a debug print()\n" + encode_payload(b"CONTINUE", b"")
    for reader in (
        lambda: _decode_all(text),
        lambda: read_frame_sync(io.BytesIO(text)),
    ):
        with pytest.raises(FrameError) as info:
            reader()
        assert "Hello from a debug print()" in str(info.value)
        assert "stdout" in str(info.value)

    async def run() -> None:
        stream = asyncio.StreamReader()
        stream.feed_data(text)
        stream.feed_eof()
        await read_frame(stream)

    with pytest.raises(FrameError, match="Hello from a debug"):
        asyncio.run(run())


def test_short_garbage_detected_before_a_full_header() -> None:
    """A worker printing 'ok' and waiting must not leave the reader waiting for 12 bytes."""
    decoder = FrameDecoder()
    decoder.feed(b"ok")
    with pytest.raises(FrameError, match="b'ok'"):
        decoder.next_frame()
    with pytest.raises(FrameError, match="b'ok"):
        read_frame_sync(io.BytesIO(b"ok"))


def test_bad_version_with_valid_crc() -> None:
    head = bytes([0x23, 0, 0, 0, 0, 0])
    data = head + zlib.crc32(head).to_bytes(4, "little") + b"\0\0"
    decoder = FrameDecoder()
    decoder.feed(data)
    with pytest.raises(FrameError, match="version 2"):
        decoder.next_frame()


def test_json_of_non_json_payload() -> None:
    with pytest.raises(FrameError, match="not JSON"):
        Frame(CONTROL, b"{nope").json()


def _decode_all(data: bytes) -> list[Frame]:
    decoder = FrameDecoder()
    decoder.feed(data)
    return list(decoder)


def test_module_exports() -> None:
    for name in goridge.__all__:
        assert hasattr(goridge, name)
    assert goridge.VERSION == 1 and goridge.HEADER_SIZE == 12 and goridge.MAX_OPTIONS == 10
