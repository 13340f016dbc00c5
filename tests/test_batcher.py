"""FrameQueue policies and Batcher dispatch, with real threads and real clocks."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from edge.batcher import Batcher, FrameQueue
from edge.frames import Frame


def frame(camera_id: str = "cam0", frame_id: int = 0) -> Frame:
    return Frame(camera_id, frame_id, time.time(), np.zeros((4, 4, 3), np.uint8))


def drain(batcher: Batcher) -> list[Frame]:
    out: list[Frame] = []
    while (batch := batcher.next_batch(poll_s=0.05)) is not None:
        out.extend(batch)
    return out


def test_queue_policy_blocks_when_full_and_loses_nothing() -> None:
    q = FrameQueue(capacity=4)
    q.add_producer()
    done = []

    def produce() -> None:
        for i in range(50):
            q.put(frame(frame_id=i), "queue")
            done.append(i)
        q.producer_done()

    t = threading.Thread(target=produce, daemon=True)
    t.start()
    time.sleep(0.2)
    assert len(done) == 4 and len(q) == 4 and t.is_alive()  # the fifth put is blocked
    frames = drain(Batcher(q, max_batch=3, max_wait_ms=1))
    t.join(timeout=2)
    assert [f.frame_id for f in frames] == list(range(50))
    assert q.dropped == {}


def test_queue_policy_timeout_when_full() -> None:
    q = FrameQueue(capacity=1)
    assert q.put(frame(frame_id=0), "queue")
    start = time.monotonic()
    assert q.put(frame(frame_id=1), "queue", timeout=0.1) is False
    assert time.monotonic() - start >= 0.1
    assert len(q) == 1 and q.dropped == {}  # the caller still holds the frame: not a drop


def test_latest_keeps_newest_per_camera_and_counts_drops() -> None:
    q = FrameQueue(capacity=8)
    for i in range(5):
        q.put(frame("a", i), "latest")
    for i in range(3):
        q.put(frame("b", i), "latest")
    assert len(q) == 2
    assert q.dropped == {"a": 4, "b": 2}
    batch = Batcher(q, max_batch=8, max_wait_ms=0).next_batch()
    assert [(f.camera_id, f.frame_id) for f in batch] == [("a", 4), ("b", 2)]


def test_latest_when_full_drops_the_new_frame_never_blocks() -> None:
    q = FrameQueue(capacity=2)
    q.put(frame("a"), "queue")
    q.put(frame("b"), "queue")
    start = time.monotonic()
    assert q.put(frame("c"), "latest") is False
    assert time.monotonic() - start < 0.5
    assert q.dropped == {"c": 1} and len(q) == 2


def test_end_of_stream_when_all_producers_done() -> None:
    q = FrameQueue()
    b = Batcher(q, max_batch=8, max_wait_ms=0)
    q.add_producer()
    q.add_producer()
    for i in range(3):
        q.put(frame(frame_id=i))
    q.producer_done()
    assert [f.frame_id for f in b.next_batch()] == [0, 1, 2]
    assert b.next_batch(poll_s=0.05) == []  # one producer still running
    q.producer_done()
    assert b.next_batch(poll_s=5) is None


def test_close_wakes_waiters_and_ignores_later_puts() -> None:
    q = FrameQueue()
    q.add_producer()
    b = Batcher(q)
    result = []
    t = threading.Thread(target=lambda: result.append(b.next_batch(poll_s=30)), daemon=True)
    t.start()
    time.sleep(0.05)
    q.close()
    t.join(timeout=2)
    assert result == [None]
    assert q.put(frame()) is False and q.ignored == 1 and len(q) == 0


def test_batcher_dispatches_at_max_batch() -> None:
    q = FrameQueue()
    q.add_producer()
    b = Batcher(q, max_batch=4, max_wait_ms=10_000)  # only a full batch can make it return quickly
    for i in range(9):
        q.put(frame(frame_id=i))
    start = time.monotonic()
    assert [f.frame_id for f in b.next_batch()] == [0, 1, 2, 3]
    assert [f.frame_id for f in b.next_batch()] == [4, 5, 6, 7]
    assert time.monotonic() - start < 1.0
    assert len(q) == 1


def test_batcher_completes_a_batch_from_frames_arriving_while_it_waits() -> None:
    q = FrameQueue()
    q.add_producer()
    b = Batcher(q, max_batch=4, max_wait_ms=5_000)
    q.put(frame(frame_id=0))

    def later() -> None:
        time.sleep(0.05)
        for i in range(1, 4):
            q.put(frame(frame_id=i))

    threading.Thread(target=later, daemon=True).start()
    start = time.monotonic()
    batch = b.next_batch()
    assert [f.frame_id for f in batch] == [0, 1, 2, 3]
    assert time.monotonic() - start < 2.0


def test_batcher_partial_batch_after_max_wait() -> None:
    q = FrameQueue()
    q.add_producer()
    b = Batcher(q, max_batch=8, max_wait_ms=80)
    for i in range(3):
        q.put(frame(frame_id=i))
    oldest = q._items[0].enqueue_mono
    batch = b.next_batch()
    waited = time.monotonic() - oldest
    assert len(batch) == 3
    assert 0.08 <= waited < 1.0


def test_batcher_poll_returns_empty_list_without_frames() -> None:
    q = FrameQueue()
    q.add_producer()
    start = time.monotonic()
    assert Batcher(q).next_batch(poll_s=0.1) == []
    assert time.monotonic() - start >= 0.1


def test_batcher_flushes_at_end_of_stream_without_waiting() -> None:
    q = FrameQueue()
    q.add_producer()
    q.put(frame(frame_id=0))
    q.producer_done()
    b = Batcher(q, max_batch=8, max_wait_ms=5_000)
    start = time.monotonic()
    assert len(b.next_batch()) == 1
    assert time.monotonic() - start < 1.0
    assert b.next_batch() is None


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="policy"):
        FrameQueue().put(frame(), "newest")
    with pytest.raises(ValueError, match="max_batch"):
        Batcher(FrameQueue(), max_batch=0)
