"""Latency percentiles per pipeline stage, for the `stats` topic.

Each stage keeps the samples recorded since the last snapshot in a preallocated numpy ring
(no per-sample allocation; a whole batch is recorded with one call), and a snapshot
reports p50/p95/p99/max in milliseconds over that window, then starts a new one.

Stages (what one sample measures):
- ``capture_to_batch``: per frame, capture time -> its batch handed to the engine
  (preprocessing, the queue and the batching wait);
- ``inference``: per batch, the engine call;
- ``postprocess``: per batch, the decision rule;
- ``publish``: per batch, packing and handing its decisions to ZeroMQ;
- ``overlay``: per overlay, drawing, JPEG-encoding and handing it to ZeroMQ (after the
  decisions: it does not delay them);
- ``end_to_end``: per frame, capture time -> its decision handed to ZeroMQ (the stages
  above plus the waits between them).
"""
from __future__ import annotations

import threading
from typing import Callable

import numpy as np

STAGES = ("capture_to_batch", "inference", "postprocess", "publish", "overlay", "end_to_end")
PERCENTILES = (50, 95, 99)


class LatencyWindow:
    """Samples (seconds) of one stage since the last take(); safe to add from one thread
    and take from another."""

    def __init__(self, capacity: int = 8192) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self._buf = np.empty(capacity, np.float64)
        self._added = 0  # since the last take(); beyond capacity the oldest are overwritten
        self._lock = threading.Lock()

    def add(self, seconds: float | np.ndarray) -> None:
        values = np.atleast_1d(np.asarray(seconds, np.float64))
        cap = len(self._buf)
        if len(values) > cap:
            values = values[-cap:]
        with self._lock:
            start = self._added % cap
            end = start + len(values)
            if end <= cap:
                self._buf[start:end] = values
            else:  # wraps around the ring
                split = cap - start
                self._buf[start:] = values[:split]
                self._buf[:end - cap] = values[split:]
            self._added += len(values)

    def take(self) -> dict[str, float | int] | None:
        """{"n", "p50", "p95", "p99", "max"} in ms over the window, then a new window; None if empty."""
        with self._lock:
            n = min(self._added, len(self._buf))
            samples = self._buf[:n].copy()
            self._added = 0
        if not n:
            return None
        p50, p95, p99 = np.percentile(samples, PERCENTILES) * 1000.0
        return {"n": n, "p50": round(float(p50), 3), "p95": round(float(p95), 3),
                "p99": round(float(p99), 3), "max": round(float(samples.max() * 1000.0), 3)}


class StageLatencies:
    """One LatencyWindow per stage in STAGES."""

    def __init__(self, capacity: int = 8192) -> None:
        self.windows = {stage: LatencyWindow(capacity) for stage in STAGES}
        # also given every sample (edge.metrics' histograms), from the thread that adds it
        self.listener: Callable[[str, float | np.ndarray], None] | None = None

    def add(self, stage: str, seconds: float | np.ndarray) -> None:
        self.windows[stage].add(seconds)
        if self.listener is not None:
            self.listener(stage, seconds)

    def take(self) -> dict[str, dict | None]:
        return {stage: window.take() for stage, window in self.windows.items()}
