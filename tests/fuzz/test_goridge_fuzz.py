"""Fuzz: the Goridge v3 frame codec (workers/goridge.py) and the worker protocol on top of it
(the SDK's sans-I/O core, `mailpipe.sdk._Core`), fed valid frame streams that were then
mutated (bit flips, insertions, deletions, truncations, repeats), in random chunks.

tests/test_goridge.py covers round trips, header bit flips and pure garbage; here the input is
what a worker or mailpipe really sends, damaged. There is no Goridge RPC codec in mailpipe yet
(issue 14 adds RPC): the worker protocol's request/response payloads are what exists.
"""

from __future__ import annotations

import io
from datetime import UTC, datetime
from pathlib import Path

import orjson
from hypothesis import given
from hypothesis import strategies as st

from conftest import make_email
from mailpipe.event import CapturedEmail
from mailpipe.sdk import Email, _Core
from mailpipe.workers import goridge
from mailpipe.workers.goridge import (
    CONTROL,
    ERROR,
    HEADER_SIZE,
    Frame,
    FrameDecoder,
    FrameError,
    encode_control,
    encode_frame,
    encode_payload,
    read_frame_sync,
)
from test_goridge import _decode_chunks, _read_all_sync, frames

from .strategies import chunkings, fuzz_settings, mutated, work_budget

CODEC_FILE = str(Path(goridge.__file__))
UUID = "0b6f9d2e-8f43-4c4b-9a53-1f0e2d3c4b5a"
RECEIVED_AT = datetime(2026, 11, 30, 12, 0, 0, 1, tzinfo=UTC)

# What mailpipe and workers really send: requests (event JSON || raw), responses, control
# frames (pid handshake, stop) and error frames.
def email(subject: str, text: str = "Plain body") -> CapturedEmail:
    """A real event; fixed uuid and time, so that every draw of the same input is the same."""
    return make_email(subject, text=text, uuid=UUID, received_at=RECEIVED_AT)


requests = st.builds(
    email,
    st.text(max_size=30),
    st.text(max_size=80),
).map(lambda captured: encode_payload(captured.json(), captured.raw))
wire_frames = st.one_of(
    requests,
    frames.map(encode_frame),
    st.sampled_from([
        encode_control({"pid": 4242}), encode_control({"stop": True}),
        encode_payload(b"CONTINUE", b""), encode_payload(b'{"stop":true}', b""),
        goridge.encode_error("boom"),
    ]),
)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=3),
    max_leaves=6,
)


@st.composite
def reshaped_requests(draw: st.DrawFn) -> bytes:
    """A real request whose event has one member, at any depth, replaced by any JSON value:
    well-formed JSON of the wrong shape, which byte mutations almost never produce."""
    request = email(draw(st.text(max_size=20)))
    event = orjson.loads(request.json())
    node: object = event
    while isinstance(node, dict | list) and node:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        key = draw(st.sampled_from(keys))
        if draw(st.booleans()) or not isinstance(node[key], dict | list):
            node[key] = draw(json_values)
            break
        node = node[key]
    return encode_payload(orjson.dumps(event), request.raw)


@st.composite
def damaged_streams(draw: st.DrawFn) -> tuple[list[bytes], bytes, list[bytes]]:
    """(the valid frames, the stream after mutation, that stream in random chunks)."""
    originals = draw(st.lists(wire_frames | reshaped_requests(), min_size=1, max_size=4))
    damaged = draw(mutated(b"".join(originals), max_mutations=3))
    return originals, damaged, draw(chunkings(damaged))


def intact_prefix(originals: list[bytes], damaged: bytes) -> int:
    """How many of the original frames lie wholly before the first damaged byte."""
    stream = b"".join(originals)
    same = next((i for i, (a, b) in enumerate(zip(stream, damaged, strict=False)) if a != b),
                min(len(stream), len(damaged)))
    count = end = 0
    for data in originals:
        end += len(data)
        if end > same:
            break
        count += 1
    return count


@fuzz_settings(scale=2)
@given(damaged_streams())
def test_damaged_frame_streams_fail_cleanly(case: tuple[list[bytes], bytes, list[bytes]]) -> None:
    originals, damaged, chunks = case
    with work_budget(CODEC_FILE, 20_000 + 200 * len(damaged)):
        got, failed, waiting = _decode_chunks(chunks)
        whole = _decode_chunks([damaged])
        sync = _read_all_sync(damaged)
    # Chunking changes nothing; the blocking reader agrees (a frame cut short is an error there).
    assert (got, failed) == whole[:2]
    assert sync == (got, failed or waiting > 0)
    # Frames before the damage come out as they were sent, and nothing is invented: each
    # decoded frame consumed at least a header.
    keep = intact_prefix(originals, damaged)
    assert [encode_frame(f) for f in got[:keep]] == originals[:keep]
    assert len(got) <= len(damaged) // HEADER_SIZE


@fuzz_settings()
@given(st.lists(wire_frames, min_size=1, max_size=6), st.data())
def test_valid_streams_round_trip_in_any_chunking(
    originals: list[bytes], data: st.DataObject
) -> None:
    stream = b"".join(originals)
    decoder = FrameDecoder()
    got: list[Frame] = []
    for chunk in data.draw(chunkings(stream)):
        decoder.feed(chunk)
        got += list(decoder)
    assert [encode_frame(f) for f in got] == originals and decoder.buffered == 0
    assert read_frame_sync(io.BytesIO(stream)) == got[0]


@fuzz_settings(scale=2)
@given(damaged_streams())
def test_worker_core_answers_every_damaged_request(
    case: tuple[list[bytes], bytes, list[bytes]],
) -> None:
    """A worker using the SDK never dies on what it reads: each frame the codec lets through
    gives a request, an error frame back to mailpipe, a pid answer, or nothing."""
    _, damaged, _ = case
    decoder = FrameDecoder()
    decoder.feed(damaged)
    core = _Core()
    try:
        for frame in decoder:
            reply, item = core.on_frame(frame)
            core.pending = None  # the application answered
            if item is not None:
                assert isinstance(item, Email) and reply is None
            elif reply is not None:
                answer = FrameDecoder()
                answer.feed(reply)
                (sent,) = list(answer)
                assert sent.flags in (ERROR, CONTROL), sent
                if sent.flags == CONTROL:
                    assert "pid" in orjson.loads(sent.payload)
    except FrameError:
        pass  # the codec refused the stream: the SDK reports it and exits
