"""Properties of the Gmail destination's wire pieces (no server): the multipart body carries any message byte for
byte and announces its exact length, a resumed upload restarts at any offset of any chunking, a length that
changed under the upload is caught, and any Retry-After a server sends is read as a bounded wait or ignored."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from postbote import LengthChanged, checked_length
from postbote.plugins.gmail.api import MAX_RETRY_AFTER, MultipartBody, Upload, retry_after, skip
from postbote.testing.gmail_api import split_multipart

messages = st.binary(max_size=4096)
chunkings = st.lists(st.integers(min_value=1, max_value=700), min_size=1, max_size=8)
label_lists = st.lists(st.text(min_size=1, max_size=20), max_size=4)


def chunked(data: bytes, sizes: list[int]) -> list[bytes]:
    chunks, at, index = [], 0, 0
    while at < len(data):
        size = sizes[index % len(sizes)]
        chunks.append(data[at:at + size])
        at, index = at + size, index + 1
    return chunks


@given(messages, chunkings, label_lists, st.sampled_from(["postbote-0f", "postbote-" + "ab" * 16]))
def test_a_multipart_body_carries_any_message_unchanged_and_announces_its_exact_length(
        message: bytes, sizes: list[int], labels: list[str], boundary: str) -> None:
    upload = Upload(len(message), lambda: chunked(message, sizes), {"labelIds": labels}, {})
    body = MultipartBody(upload, boundary)

    data = b"".join(body.chunks())

    assert len(data) == body.length
    assert body.content_type == f'multipart/related; boundary="{boundary}"'
    metadata, carried = split_multipart(data, boundary.encode())
    assert carried == message and json.loads(metadata) == {"labelIds": labels}


@given(messages, chunkings, st.integers(min_value=0, max_value=5000))
def test_an_upload_resumed_at_any_offset_sends_exactly_the_rest(message: bytes, sizes: list[int],
                                                                 offset: int) -> None:
    assert b"".join(skip(chunked(message, sizes), offset)) == message[offset:]


@given(messages, chunkings, st.integers(min_value=-3, max_value=3).filter(bool))
def test_a_message_that_is_not_the_length_announced_stops_the_upload(message: bytes, sizes: list[int],
                                                                    difference: int) -> None:
    announced = max(0, len(message) + difference)
    if announced == len(message):
        return
    with pytest.raises(LengthChanged):
        b"".join(checked_length(chunked(message, sizes), announced))


@given(st.one_of(st.none(), st.text(max_size=60), st.integers(min_value=0, max_value=10**12).map(str)))
def test_any_retry_after_is_a_bounded_wait_or_none(value: str | None) -> None:
    wait = retry_after(value)
    assert wait is None or 0 <= wait <= MAX_RETRY_AFTER


@given(st.floats(min_value=0.01, max_value=50), st.lists(st.floats(min_value=0, max_value=3), max_size=60))
def test_the_rate_limit_never_lets_more_imports_through_than_its_rate_allows(rate: float,
                                                                             gaps: list[float]) -> None:
    """Over any stretch of time, imports started (after their waits) never exceed the burst plus rate x time."""
    from postbote.plugins.gmail import MAX_PACE, TokenBucket

    now = [0.0]
    bucket = TokenBucket(rate, clock=lambda: now[0])
    started: list[float] = []
    for gap in gaps:
        now[0] += gap
        wait = bucket.reserve(MAX_PACE)
        if wait <= MAX_PACE:
            started.append(now[0] + wait)
    burst = max(1.0, rate)
    for i, first in enumerate(started):
        for j in range(i, len(started)):
            assert j - i + 1 <= burst + (started[j] - first) * rate + 1e-6
