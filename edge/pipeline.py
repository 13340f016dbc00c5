"""The runtime loop: sources -> batcher -> engine -> decision -> overlay -> publisher.

Three kinds of thread overlap the work:
- one thread per source reads and preprocesses frames (OpenCV releases the GIL);
- the inference thread batches frames into a preallocated buffer and runs the engine;
- the calling thread owns the ZeroMQ socket: it decides, draws overlays for the frames
  that get one, and publishes.
Stopping (a finite source ending, or stop() from a signal handler) drains what is queued:
every frame that was read gets its decision published before the sockets close.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from .batcher import Batcher, FrameQueue
from .bundle import Bundle
from .decision import ACCEPT, ERROR, Decision, DecisionRule
from .engine import Engine
from .frames import Frame
from .images import preprocess
from .overlay import OverlayPolicy, encode_jpeg, render_overlay
from .publisher import Publisher
from .sources import Source, SourceThread

log = logging.getLogger(__name__)
_END = object()


@dataclass
class RunOptions:
    max_batch: int = 8
    max_wait_ms: float = 5.0
    overlay_accepts_every: int = 0  # overlays for every reject; for accepts every Nth (0 = never)
    wait_subscribers: int = 0  # hold the sources until this many subscriptions arrived
    wait_timeout_s: float = 10.0
    linger_ms: int = 1000  # at the end, how long queued messages may take to leave
    queue_capacity: int = 64
    stats_interval_s: float = 1.0

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1 (got {self.max_batch})")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0 (got {self.max_wait_ms})")


@dataclass
class RunSummary:
    frames: int = 0
    rejects: int = 0
    errors: int = 0
    labelled: int = 0  # frames whose source knew the truth (synthetic parts)
    correct: int = 0
    seconds: float = 0.0
    dropped: dict[str, int] = field(default_factory=dict)
    source_errors: dict[str, int] = field(default_factory=dict)

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None


class Pipeline:
    def __init__(self, bundle: Bundle, engine: Engine, rule: DecisionRule, sources: list[Source],
                 publisher: Publisher, options: RunOptions | None = None):
        if not sources:
            raise ValueError("no sources: give at least one --source")
        ids = [s.camera_id for s in sources]
        if len(set(ids)) != len(ids):
            raise ValueError(f"camera ids must be unique, got {ids}")
        self.bundle, self.engine, self.rule = bundle, engine, rule
        self.sources, self.publisher = sources, publisher
        self.options = options or RunOptions()
        self.overlays = OverlayPolicy(self.options.overlay_accepts_every)
        self.normal_class = bundle.manifest["classes"]["normal"]
        self._stop = threading.Event()
        self._queue = FrameQueue(self.options.queue_capacity)
        self._results: queue.Queue = queue.Queue(maxsize=4)  # bounded: backpressure on inference

    def stop(self) -> None:
        """Ask for a clean stop (safe from a signal handler): sources stop, queued frames finish."""
        self._stop.set()

    def _infer_loop(self) -> None:
        batcher = Batcher(self._queue, self.options.max_batch, self.options.max_wait_ms)
        h, w = self.bundle.input_size
        buffer = np.empty((self.options.max_batch, 3, h, w), np.float32)  # reused every batch
        try:
            while True:
                batch = batcher.next_batch(poll_s=0.1)
                if batch is None:
                    break
                if not batch:
                    continue
                n = len(batch)
                for i, frame in enumerate(batch):
                    buffer[i] = frame.tensor
                    frame.tensor = None  # the buffer holds it now; free the frame's copy
                try:
                    scores, maps = self.engine.infer(buffer[:n])
                    self._results.put((batch, scores, maps, None))
                except Exception as exc:  # noqa: BLE001 - the frames get an error decision
                    ids = [f"{f.camera_id}#{f.frame_id}" for f in batch]
                    log.error("engine failed on frames %s: %s", ", ".join(ids), exc)
                    self._results.put((batch, None, None, exc))
        finally:
            self._results.put(_END)

    def _publish(self, frame: Frame, decision: Decision, anomaly_map: np.ndarray | None) -> None:
        header = {
            "camera_id": frame.camera_id, "frame_id": frame.frame_id, "capture_ts": frame.capture_ts,
            "score": decision.score, "score_norm": decision.score_norm, "threshold": decision.threshold,
            "decision": decision.decision, "aggregate": self.rule.aggregate,
            "source": frame.source_name, "label": frame.label,
        }
        self.publisher.publish("decision", header)
        if anomaly_map is not None and self.overlays.wants(decision):
            image = render_overlay(frame.image, anomaly_map, self.bundle.display_range, decision)
            self.publisher.publish("overlay", {**header, "encoding": "jpeg", "width": image.shape[1],
                                               "height": image.shape[0]}, encode_jpeg(image))

    def _handle(self, item: tuple, summary: RunSummary) -> None:
        batch, scores, maps, error = item
        if error is not None:
            decisions = [Decision(float("nan"), float("nan"), self.rule.threshold, ERROR)] * len(batch)
            maps = [None] * len(batch)
        else:
            decisions = self.rule.decide(scores, maps)
        for frame, decision, amap in zip(batch, decisions, maps):
            self._publish(frame, decision, amap)
            summary.frames += 1
            summary.rejects += decision.decision == "reject"
            summary.errors += decision.decision == ERROR
            if frame.label is not None and decision.decision != ERROR:
                summary.labelled += 1
                summary.correct += (frame.label == self.normal_class) == (decision.decision == ACCEPT)

    def _publish_stats(self, summary: RunSummary, started: float) -> None:
        self.publisher.publish("stats", {
            "frames": summary.frames, "fps": summary.frames / max(time.monotonic() - started, 1e-9),
            "rejects": summary.rejects, "errors": summary.errors,
            "dropped": dict(self._queue.dropped), "queue_depth": len(self._queue),
            "publisher_dropped": dict(self.publisher.dropped),
        })

    def run(self) -> RunSummary:
        opts = self.options
        if opts.wait_subscribers:
            seen = self.publisher.wait_for_subscribers(opts.wait_subscribers, opts.wait_timeout_s)
            if seen < opts.wait_subscribers:
                log.warning("only %d of %d subscriptions after %.0f s; starting anyway",
                            seen, opts.wait_subscribers, opts.wait_timeout_s)
        size = self.bundle.input_size
        threads = [SourceThread(s, self._queue, lambda img: preprocess(img, size), stop=self._stop)
                   for s in self.sources]
        inference = threading.Thread(target=self._infer_loop, name="inference", daemon=True)
        summary = RunSummary()
        started = time.monotonic()
        next_stats = started + opts.stats_interval_s
        for t in threads:
            t.start()
        inference.start()
        log.info("running: %s -> %s", ", ".join(s.camera_id for s in self.sources), self.publisher.endpoint)
        while True:
            try:
                item = self._results.get(timeout=0.2)
            except queue.Empty:
                item = None
            if item is _END:
                break
            if item is not None:
                self._handle(item, summary)
            if time.monotonic() >= next_stats:
                self._publish_stats(summary, started)
                next_stats += opts.stats_interval_s
        summary.seconds = time.monotonic() - started
        inference.join()
        for t in threads:
            t.join(timeout=5)
        summary.dropped = dict(self._queue.dropped)
        summary.source_errors = {s.camera_id: s.counters.get("errors", 0) for s in self.sources}
        self._publish_stats(summary, started)
        self.publisher.close(linger_ms=opts.linger_ms)
        return summary
