"""FrameQueue policies and Batcher dispatch, with real threads. Where the batcher's deadlines
matter, a ManualClock stands in for time.monotonic: it moves only when the test moves it, so
"which batch comes out, and when" is decided by the test, not by the machine's load."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from edge.batcher import Batcher, FrameQueue
from edge.frames import Frame


def frame(camera_id: str = "cam0", frame_id: int = 0) -> Frame:
    return Frame(camera_id, frame_id, time.time(), np.zeros((4, 4, 3), np.uint8))


class ManualClock:
    """A clock (seconds) that stands still until the test sets it. It counts its reads: the
    batcher reads it while holding the queue's lock just before it waits, so once the count
    has grown, the next call that takes the lock (put, close) finds the batcher waiting."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now
        self.reads = 0
        self._cond = threading.Condition()

    def __call__(self) -> float:
        with self._cond:
            self.reads += 1
            self._cond.notify_all()
            return self.now

    def wait_reads(self, n: int, timeout: float = 30.0) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: self.reads >= n, timeout), f"clock read {self.reads} times, not {n}"


def in_thread(fn) -> tuple[threading.Thread, list]:
    result: list = []
    t = threading.Thread(target=lambda: result.append(fn()), daemon=True)
    t.start()
    return t, result


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
    deadline = time.monotonic() + 30
    while len(done) < 4:
        assert time.monotonic() < deadline, f"only {len(done)} puts went through"
        time.sleep(0.01)
    # nobody takes frames yet: the fifth put waits for room, for as long as it takes
    assert len(done) == 4 and len(q) == 4 and t.is_alive()
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


@pytest.mark.timeout(60)
def test_latest_when_full_drops_the_new_frame_never_blocks() -> None:
    q = FrameQueue(capacity=2)
    q.put(frame("a"), "queue")
    q.put(frame("b"), "queue")
    # nobody will ever take a frame: a put that waited for room would hang (pytest-timeout)
    assert q.put(frame("c"), "latest") is False
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


@pytest.mark.timeout(60)
def test_close_wakes_waiters_and_ignores_later_puts() -> None:
    clock = ManualClock()
    q = FrameQueue(clock=clock)
    q.add_producer()
    b = Batcher(q)
    t, result = in_thread(lambda: b.next_batch(poll_s=30))  # the clock stands still: only close() ends it
    clock.wait_reads(2)  # its poll deadline, then "now": it is waiting
    q.close()
    t.join()
    assert result == [None]
    assert q.put(frame()) is False and q.ignored == 1 and len(q) == 0


@pytest.mark.timeout(60)
def test_batcher_dispatches_at_max_batch() -> None:
    q = FrameQueue(clock=ManualClock())  # time stands still: max_wait never runs out
    q.add_producer()
    b = Batcher(q, max_batch=4, max_wait_ms=10)  # only a full batch can make it return
    for i in range(9):
        q.put(frame(frame_id=i))
    assert [f.frame_id for f in b.next_batch()] == [0, 1, 2, 3]
    assert [f.frame_id for f in b.next_batch()] == [4, 5, 6, 7]
    assert len(q) == 1


@pytest.mark.timeout(60)
def test_batcher_completes_a_batch_from_frames_arriving_while_it_waits() -> None:
    clock = ManualClock()  # time stands still: only a full batch can end the wait
    q = FrameQueue(clock=clock)
    q.add_producer()
    b = Batcher(q, max_batch=4, max_wait_ms=10)
    q.put(frame(frame_id=0))  # one read: its enqueue time
    t, result = in_thread(b.next_batch)
    clock.wait_reads(3)  # the batcher's poll deadline and "now": it waits with one frame
    for i in range(1, 4):
        q.put(frame(frame_id=i))  # each wakes it; the fourth completes the batch
    t.join()
    assert [[f.frame_id for f in batch] for batch in result] == [[0, 1, 2, 3]]


@pytest.mark.timeout(60)
def test_batcher_partial_batch_exactly_when_the_oldest_frame_waited_max_wait() -> None:
    clock = ManualClock(now=100.0)
    q = FrameQueue(clock=clock)
    q.add_producer()
    b = Batcher(q, max_batch=8, max_wait_ms=80)
    for i in range(3):
        q.put(frame(frame_id=i))  # enqueued at 100.0
    t, result = in_thread(b.next_batch)
    clock.wait_reads(3 + 4)  # it woke after a real 80 ms at least once and looked again
    assert result == [] and t.is_alive()  # 3 of 8 frames, and no time has passed
    clock.now = 100.0 + 0.079
    reads = clock.reads
    clock.wait_reads(reads + 2)  # it saw 79 ms and went back to waiting
    assert result == [] and t.is_alive()
    clock.now = 100.0 + 0.08  # the oldest frame has waited max_wait: out it goes
    t.join()
    assert [[f.frame_id for f in batch] for batch in result] == [[0, 1, 2]]


def test_batcher_partial_batch_waits_max_wait_on_the_real_clock() -> None:
    q = FrameQueue()
    q.add_producer()
    b = Batcher(q, max_batch=8, max_wait_ms=80)
    for i in range(3):
        q.put(frame(frame_id=i))
    oldest = q._items[0].enqueue_mono
    batch = b.next_batch()
    assert len(batch) == 3
    assert time.monotonic() - oldest >= 0.08  # at least max_wait (how much longer: the machine's load)


def test_batcher_poll_returns_empty_list_without_frames() -> None:
    q = FrameQueue()
    q.add_producer()
    start = time.monotonic()
    assert Batcher(q).next_batch(poll_s=0.1) == []
    assert time.monotonic() - start >= 0.1


@pytest.mark.timeout(60)
def test_batcher_flushes_at_end_of_stream_without_waiting() -> None:
    q = FrameQueue(clock=ManualClock())  # time stands still: waiting for max_wait would never end
    q.add_producer()
    q.put(frame(frame_id=0))
    q.producer_done()
    b = Batcher(q, max_batch=8, max_wait_ms=10)
    assert [f.frame_id for f in b.next_batch()] == [0]
    assert b.next_batch() is None


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="policy"):
        FrameQueue().put(frame(), "newest")
    with pytest.raises(ValueError, match="max_batch"):
        Batcher(FrameQueue(), max_batch=0)
