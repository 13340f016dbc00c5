"""The queue between source threads and inference, and the batcher that drains it.

Every source thread puts frames into one FrameQueue; the inference loop takes them in
batches. Files use the "queue" policy (the reader waits, nothing is lost); live cameras use
"latest" (never block a camera: an older frame of the same camera still waiting is replaced,
because judging a stale part is worse than skipping it).
"""
from __future__ import annotations

import threading
import time
from collections import deque
from typing import Callable

from edge.frames import Frame

POLICIES = ("queue", "latest")


class FrameQueue:
    """Where every source thread puts frames and the batcher takes them (thread-safe)."""

    def __init__(self, capacity: int = 64, clock: Callable[[], float] = time.monotonic) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        # Seconds, for enqueue times and every deadline here and in the Batcher (tests pass
        # their own clock; waits still sleep in real time and then look at it again).
        self.clock = clock
        self.dropped: dict[str, int] = {}  # camera_id -> frames lost to the "latest" policy
        self.ignored = 0  # frames put after close()
        # One Condition for everything: few threads, and notify_all keeps the logic obvious.
        self._cond = threading.Condition()
        self._items: deque[Frame] = deque()
        self._producers = 0  # ever registered
        self._active = 0  # registered and not done yet
        self._closed = False

    # -- producers ------------------------------------------------------------------------

    def add_producer(self) -> None:
        with self._cond:
            self._producers += 1
            self._active += 1

    def producer_done(self) -> None:
        with self._cond:
            self._active = max(0, self._active - 1)
            self._cond.notify_all()  # the batcher may be waiting for the end of the stream

    def put(self, frame: Frame, policy: str = "queue", timeout: float | None = None) -> bool:
        """Enqueue a frame. Returns True if it is now waiting in the queue.

        False means it is not: dropped by "latest" (counted in dropped), put after close()
        (counted in ignored), or "queue" timed out while full (not counted: the caller still
        holds the frame and may try again, e.g. after checking for shutdown).
        """
        if policy not in POLICIES:
            raise ValueError(f"unknown queue policy {policy!r}; expected one of {POLICIES}")
        with self._cond:
            if policy == "queue":
                deadline = None if timeout is None else self.clock() + timeout
                while len(self._items) >= self.capacity and not self._closed:
                    left = None if deadline is None else deadline - self.clock()
                    if left is not None and left <= 0:
                        return False
                    self._cond.wait(left)
            if self._closed:
                self.ignored += 1
                return False
            if policy == "latest":
                # Frame's generated __eq__ compares arrays, so find frames by index, not by value.
                stale = [i for i, f in enumerate(self._items) if f.camera_id == frame.camera_id]
                for i in reversed(stale):
                    del self._items[i]
                self._count_drop(frame.camera_id, len(stale))
                if len(self._items) >= self.capacity:  # full of other cameras' frames
                    self._count_drop(frame.camera_id, 1)
                    return False
            frame.enqueue_mono = self.clock()
            self._items.append(frame)  # appended last, so the queue stays ordered by enqueue_mono
            self._cond.notify_all()
            return True

    def _count_drop(self, camera_id: str, n: int) -> None:
        if n:
            self.dropped[camera_id] = self.dropped.get(camera_id, 0) + n

    # -- shutdown and state ---------------------------------------------------------------

    def close(self) -> int:
        """Stop: wake every waiting thread; later puts are ignored. Waiting frames can still
        be taken. Returns how many were waiting."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            return len(self._items)

    def discard(self) -> list[Frame]:
        """Take every waiting frame out at once (a shutdown that ran out of time): the caller
        reports them; they never reach a batch."""
        with self._cond:
            items = list(self._items)
            self._items.clear()
            self._cond.notify_all()
            return items

    @property
    def closed(self) -> bool:
        return self._closed

    def ended(self) -> bool:
        """True when no more frames will arrive: closed, or every registered producer is done."""
        with self._cond:
            return self._ended()

    def _ended(self) -> bool:
        # A queue nobody has registered with yet is not ended: its sources are still starting.
        return self._closed or (self._producers > 0 and self._active == 0)

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)


class Batcher:
    """Groups waiting frames into batches: full batches at once, partial ones after max_wait_ms."""

    def __init__(self, queue: FrameQueue, max_batch: int = 8, max_wait_ms: float = 5.0) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must not be negative, got {max_wait_ms}")
        self.queue = queue
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0

    def next_batch(self, poll_s: float = 0.1) -> list[Frame] | None:
        """The next batch; [] if poll_s passed with no frame; None at the end of the stream."""
        q = self.queue
        poll_deadline = q.clock() + poll_s
        with q._cond:
            while True:
                waiting = len(q._items)
                now = q.clock()
                if waiting:
                    # No more frames can come at the end of the stream: flush without waiting.
                    if waiting >= self.max_batch or q._ended():
                        break
                    # Latency bound: the oldest frame waits at most max_wait since it was enqueued.
                    left = q._items[0].enqueue_mono + self.max_wait_s - now
                    if left <= 0:
                        break
                else:
                    if q._ended():
                        return None
                    left = poll_deadline - now
                    if left <= 0:
                        return []  # let the caller check for shutdown
                q._cond.wait(left)  # woken early by every put, producer_done and close
            batch = [q._items.popleft() for _ in range(min(waiting, self.max_batch))]
            q._cond.notify_all()  # room for producers blocked on a full queue
            return batch
