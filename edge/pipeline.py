"""The runtime loop: sources -> batcher -> engine -> decision -> overlay -> publisher.

Three kinds of thread overlap the work:
- one thread per source reads, checks, crops (ROI) and preprocesses frames (OpenCV releases
  the GIL);
- the inference thread batches frames from every source into a preallocated buffer and runs
  the engine;
- the calling thread owns the ZeroMQ socket: it decides and publishes each batch's decisions
  as soon as the batch is out of the engine, draws and publishes the overlays of the frames
  that get one when no decision is waiting, and once a second the `stats` message; it also
  feeds the service monitor (sd_notify) when there is one.

Before any frame is read the engine runs once at every batch size it may be given, so its
memory is at its high-water mark from the start (see `Pipeline._warm_up`).

Everything bundle-dependent (bundle, engine, decision rule and thresholds, geometry) is one
edge.active.ActiveModel, read once per batch from ``Pipeline.model``: replacing that
reference (``swap_model``, from the control endpoint or a config reload) takes effect between
two batches, and each decision carries the model id of the model that judged it. Frames
already preprocessed for another geometry are preprocessed again for the batch's model.

Pausing (``pause``/``resume``): sources stay connected and keep reading; frames captured
while paused are counted per camera (``paused``) and not judged. Frames captured before the
pause still get their decisions.

Nothing read is lost silently: a frame that cannot be inspected, or whose batch the engine
fails on, gets an `error` decision. Too many failed batches in a row end the run with
``RunSummary.fatal`` set (the service exits non-zero, systemd restarts it).

Stopping (a finite source ending, or stop() from a signal handler): the sources stop at
once, every frame already queued is batched and published, the batch in flight finishes,
then the socket closes with a bounded linger. ``stop_timeout_s`` bounds it all: past most of
it, frames still waiting for a batch are discarded (counted, logged), and past nearly all of
it the run gives up on an engine call that does not return (``RunSummary.timed_out``).
"""
from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from threadpoolctl import threadpool_limits

from .active import ActiveModel, batch_sizes, warm_up
from .batcher import Batcher, FrameQueue
from .bundle import Bundle
from .decision import ACCEPT, ERROR, NON_FINITE_SCORE, REJECT, Decision, DecisionRule
from .engine import Engine
from .frames import Frame
from .overlay import OverlayPolicy, encode_jpeg, encode_png, render_overlay
from .publisher import Publisher
from .sources import Source, SourceThread
from .stats import StageLatencies

log = logging.getLogger(__name__)
_END = object()
# Batch sizes each engine has already run (see Pipeline._warm_up): a second pipeline on the
# same engine, as the bench runs them, does not warm it again.
_warmed: weakref.WeakKeyDictionary[Engine, set[int]] = weakref.WeakKeyDictionary()
FRAME_POLICIES = ("none", "reject")  # which frames go out whole on the `frame` topic


@dataclass
class RunOptions:
    max_batch: int = 8
    max_wait_ms: float = 5.0
    overlay_accepts_every: int = 0  # overlays for every reject; for accepts every Nth (0 = never)
    jpeg_quality: int = 85
    wait_subscribers: int = 0  # hold the sources until this many subscriptions arrived
    wait_timeout_s: float = 10.0
    linger_ms: int = 1000  # at the end, how long queued messages may take to leave
    queue_capacity: int = 64
    stats_interval_s: float = 1.0
    stop_timeout_s: float = 10.0  # from stop() to run() returning, linger included
    max_engine_failures: int = 5  # failed batches in a row that end the run (0 = never)
    publish_frames: str = "none"  # "reject": the full-resolution frame of each reject (`frame` topic)

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1 (got {self.max_batch})")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0 (got {self.max_wait_ms})")
        if not self.stop_timeout_s > 0:
            raise ValueError(f"stop_timeout_s must be > 0 (got {self.stop_timeout_s})")
        if self.publish_frames not in FRAME_POLICIES:
            raise ValueError(f"publish_frames must be one of {FRAME_POLICIES} (got {self.publish_frames!r})")


@dataclass
class RunSummary:
    frames: int = 0  # decisions published (error decisions included)
    rejects: int = 0
    errors: int = 0
    labelled: int = 0  # frames whose source knew the truth (synthetic parts)
    correct: int = 0
    seconds: float = 0.0
    batches: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # "latest" policy, per camera
    source_errors: dict[str, int] = field(default_factory=dict)
    bad_frames: dict[str, int] = field(default_factory=dict)
    discarded: int = 0  # frames still waiting for a batch when the stop timeout ran out
    unqueued: int = 0  # frames a source had read when the stop closed the queue: not inspected
    fatal: str | None = None  # why the run ended on its own (repeated engine failure)
    timed_out: bool = False  # the stop timeout ran out before the batch in flight finished

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None


class Monitor(Protocol):
    """What a service wrapper (edge.service) hooks into; called from the publishing thread."""

    def tick(self, pipeline: "Pipeline", now: float) -> None:
        """Called at least every 0.2 s while running."""

    def stats(self, message: dict[str, Any]) -> None:
        """Called with each stats message after it was published."""

    def stopping(self) -> None:
        """Called once when the pipeline starts to stop."""


@dataclass
class _Result:
    frames: list[Frame]
    scores: np.ndarray | None
    maps: np.ndarray | None
    errors: list[str | None] | None  # per frame: why it gets an `error` decision (None: judged)
    batch_id: int
    model: ActiveModel  # the model that judged this batch


@dataclass
class _Due:
    """An overlay or a full frame still to draw/encode and publish (after the decisions)."""

    kind: str  # "overlay" | "frame"
    frame: Frame
    decision: Decision
    amap: np.ndarray | None
    header: dict
    model: ActiveModel


class _Preprocessor:
    """What the source threads call: preprocess for the model in force, and remember (per
    thread) which geometry it used, so the batch can tell a tensor made for another model."""

    def __init__(self, pipeline: "Pipeline") -> None:
        self._pipeline = pipeline
        self._local = threading.local()

    def __call__(self, image: np.ndarray) -> np.ndarray:
        geometry = self._pipeline.model.geometry
        self._local.geometry = geometry
        return geometry.preprocess(image)

    @property
    def geometry(self) -> Any:
        """The geometry of this thread's last call (edge.sources reads it after the call)."""
        return getattr(self._local, "geometry", None)


class Pipeline:
    def __init__(self, bundle: Bundle, engine: Engine, rule: DecisionRule, sources: list[Source],
                 publisher: Publisher, options: RunOptions | None = None,
                 monitor: Monitor | None = None):
        if not sources:
            raise ValueError("no sources: give at least one --source")
        ids = [s.camera_id for s in sources]
        if len(set(ids)) != len(ids):
            raise ValueError(f"camera ids must be unique, got {ids}")
        self.model = ActiveModel.build(bundle, engine, rule)  # replaced whole by swap_model()
        self.sources, self.publisher = sources, publisher
        self.options = options or RunOptions()
        self.monitor = monitor
        self.overlays = OverlayPolicy(self.options.overlay_accepts_every)
        self.latency = StageLatencies()
        self.fatal: str | None = None
        self.stop_reason: str | None = None
        self.last_decision_mono: float | None = None  # a decision was handed to ZeroMQ then
        self.last_progress_mono: float | None = None  # a decision went out, or a paused frame was counted
        self.last_fps = 0.0  # over the last stats interval
        self._stop = threading.Event()
        self._queue = FrameQueue(self.options.queue_capacity)
        self._results: queue.Queue = queue.Queue(maxsize=4)  # bounded: backpressure on inference
        # overlays not drawn yet (and reject frames not encoded yet): decided frames come first
        self._overlays_due: deque[_Due] = deque()
        self._overlays_due_max = 4 * self.options.max_batch  # beyond: draw before deciding more
        self._engine_failures = 0  # batches in a row
        self.engine_failures_total = 0
        self._pauses: list[list[float]] = []  # [start, end] (end inf while paused), wall clock
        self.paused_frames = dict.fromkeys(ids, 0)  # per camera: captured while paused, not judged
        self.decisions_by_result: dict[tuple[str, str], int] = {}  # (camera, decision) -> count
        self.last_frame_ts: dict[str, float] = {}  # per camera: capture time of the last frame batched
        self.camera_fps = dict.fromkeys(ids, 0.0)  # decisions/s over the last stats interval
        self.engine_busy: Engine | None = None  # the engine of the batch in flight (see retire_engine)
        self._model_lock = threading.Lock()  # reading the model and marking its engine busy: one step
        self._batch_ids = itertools.count()
        ids = [s.camera_id for s in sources]
        self._decisions = dict.fromkeys(ids, 0)  # per camera, whole run
        self._interval = dict.fromkeys(ids, 0)  # per camera, since the last stats message

    # -- the model in force -----------------------------------------------------------------

    @property
    def bundle(self) -> Bundle:
        return self.model.bundle

    @property
    def engine(self) -> Engine:
        return self.model.engine

    @property
    def rule(self) -> DecisionRule:
        return self.model.rule

    def swap_model(self, model: ActiveModel) -> ActiveModel:
        """Put ``model`` in force from the next batch on; returns the one it replaces. The
        caller has validated and warmed it (edge.active.open_model)."""
        with self._model_lock:
            old, self.model = self.model, model
        return old

    def retire_engine(self, engine: Engine, timeout_s: float = 120.0) -> bool:
        """Close an engine swapped out (a TensorRT engine holds GPU memory until closed) once
        the batch in flight, if it used it, has returned; engines without close() are left
        to the garbage collector. Call from a thread that may wait; True if closed."""
        close = getattr(engine, "close", None)
        if close is None or engine is self.model.engine:
            return False
        deadline = time.monotonic() + timeout_s
        while self.engine_busy is engine:
            if time.monotonic() > deadline:
                log.warning("the swapped-out engine is still in a call after %.0f s; not closing it", timeout_s)
                return False
            time.sleep(0.005)
        close()
        return True

    # -- pause ------------------------------------------------------------------------------

    @property
    def paused(self) -> bool:
        return bool(self._pauses) and self._pauses[-1][1] == float("inf")

    def pause(self) -> bool:
        """Frames captured from now on are counted, not judged; False if already paused."""
        if self.paused:
            return False
        self._pauses = [*self._pauses[-7:], [time.time(), float("inf")]]
        return True

    def resume(self) -> bool:
        """Frames captured from now on are judged again; False if not paused."""
        if not self.paused:
            return False
        self._pauses[-1][1] = time.time()
        return True

    def _captured_while_paused(self, frame: Frame) -> bool:
        return any(start <= frame.capture_ts < end for start, end in self._pauses)

    # -- control ------------------------------------------------------------------------------

    def stop(self, reason: str = "stop requested") -> None:
        """Ask for a clean stop (safe from a signal handler: it only sets an event)."""
        if not self._stop.is_set():
            self.stop_reason = reason
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def first_frame_seen(self) -> bool:
        """True once any source delivered a frame (a source is open)."""
        return any(s.counters["frames"] for s in self.sources)

    # -- inference thread -----------------------------------------------------------------------

    def _infer_loop(self) -> None:
        batcher = Batcher(self._queue, self.options.max_batch, self.options.max_wait_ms)
        buffers: dict[tuple[int, ...], np.ndarray] = {}  # per batch shape, reused every batch
        try:
            while True:
                # batching is live-changeable (config reload): read it per batch
                batcher.max_batch, batcher.max_wait_s = self.options.max_batch, self.options.max_wait_ms / 1000.0
                batch = batcher.next_batch(poll_s=0.1)
                if batch is None:
                    break
                if not batch:
                    continue
                for frame in batch:
                    self.last_frame_ts[frame.camera_id] = frame.capture_ts
                if self._pauses:
                    batch = self._drop_paused(batch)
                    if not batch:
                        continue
                with self._model_lock:  # once per batch: the whole batch is judged by this model
                    model = self.model
                    self.engine_busy = model.engine
                shape = (self.options.max_batch, *model.geometry.tensor_shape)
                buffer = buffers.get(shape)
                if buffer is None:
                    buffers.clear()  # the old model's buffer is not needed any more
                    buffer = buffers[shape] = np.empty(shape, np.float32)
                now = time.time()
                self.latency.add("capture_to_batch",
                                 now - np.fromiter((f.capture_ts for f in batch), np.float64, len(batch)))
                batch_id = next(self._batch_ids)
                # Frames that cannot be inspected stay in the batch, in order, but skip the engine.
                good = batch if all(f.error is None for f in batch) else [f for f in batch if f.error is None]
                scores = maps = failure = None
                if good:
                    scores, maps, failure = self._run_engine(model, good, buffer, batch_id)
                errors = None
                if failure is not None or len(good) != len(batch):
                    errors = [f.error or failure for f in batch]
                self.engine_busy = None
                self._results.put(_Result(batch, scores, maps, errors, batch_id, model))
        finally:
            self._results.put(_END)

    def _drop_paused(self, batch: list[Frame]) -> list[Frame]:
        """The frames of the batch captured while not paused; the others are counted."""
        kept = []
        for frame in batch:
            if self._captured_while_paused(frame):
                self.paused_frames[frame.camera_id] += 1
                self.last_progress_mono = time.monotonic()  # frames flow: the watchdog stays fed
            else:
                kept.append(frame)
        return kept

    def _run_engine(self, model: ActiveModel, batch: list[Frame], buffer: np.ndarray,
                    batch_id: int) -> tuple[np.ndarray | None, np.ndarray | None, str | None]:
        """(scores, maps, None), or (None, None, reason) when the engine failed on the batch."""
        n = len(batch)
        for i, frame in enumerate(batch):
            if frame.geometry != model.geometry:  # preprocessed before a swap: again, for this model
                frame.tensor = model.preprocess(frame.image)
            buffer[i] = frame.tensor
            frame.tensor = None  # the buffer holds it now; free the frame's copy
        started = time.perf_counter()
        try:
            scores, maps = model.infer(buffer[:n])
            if len(scores) != n or len(maps) != n:
                raise RuntimeError(f"engine returned {len(scores)} scores and {len(maps)} maps "
                                   f"for {n} frames")
        except Exception as exc:  # noqa: BLE001 - the frames get an error decision
            self.latency.add("inference", time.perf_counter() - started)
            self._engine_failures += 1
            self.engine_failures_total += 1
            ids = ", ".join(f"{f.camera_id}#{f.frame_id}" for f in batch)
            log.error("engine failed on batch %d (frames %s): %s; they get an error decision",
                      batch_id, ids, exc)
            limit = self.options.max_engine_failures
            if limit and self._engine_failures >= limit and self.fatal is None:
                self.fatal = f"engine failed on {self._engine_failures} batches in a row (last: {exc})"
                log.critical("%s; stopping so that the service manager restarts linegate", self.fatal)
                self.stop(self.fatal)
            return None, None, f"engine failed: {exc}"
        self.latency.add("inference", time.perf_counter() - started)
        if self._engine_failures:
            log.info("engine works again after %d failed batch(es)", self._engine_failures)
            self._engine_failures = 0
        return scores, maps, None

    # -- publishing thread ------------------------------------------------------------------------

    def _handle(self, result: _Result, summary: RunSummary) -> None:
        frames, n, model = result.frames, len(result.frames), result.model
        started = time.perf_counter()
        judged_ids = [f.camera_id for f, e in zip(frames, result.errors or itertools.repeat(None)) if e is None]
        decisions = model.decide(judged_ids, result.scores, result.maps) if result.scores is not None else []
        maps: Any = result.maps
        errors: Any = itertools.repeat(None)
        if result.errors is not None:  # rare: merge the engine's decisions with error decisions
            nan = float("nan")
            judged, judged_maps = iter(decisions), iter(maps if maps is not None else ())
            decisions, maps, errors = [], [], result.errors
            for error in errors:
                if error is None:
                    decisions.append(next(judged))
                    maps.append(next(judged_maps))
                else:
                    decisions.append(Decision(nan, nan, model.threshold_for(frames[len(decisions)].camera_id), ERROR))
                    maps.append(None)
        decided = time.perf_counter()
        publish = self.publisher.publish
        headers, e2e, sent = [], np.empty(n, np.float64), False
        # Decisions first, for the whole batch: they are what the line waits for.
        for i, (frame, decision, error) in enumerate(zip(frames, decisions, errors)):
            header = {
                "camera_id": frame.camera_id, "frame_id": frame.frame_id, "capture_ts": frame.capture_ts,
                "score": decision.score, "score_norm": decision.score_norm, "threshold": decision.threshold,
                "decision": decision.decision, "aggregate": model.rule.aggregate,
                "source": frame.source_name, "label": frame.label, "batch": result.batch_id,
            }
            if error is None and decision.decision == ERROR:
                error = NON_FINITE_SCORE
                log.warning("%s#%s: %s; check the engine and its precision", frame.camera_id,
                            frame.frame_id, error)
            if error is not None:
                header["error"] = error
            sent |= publish("decision", header, model_id=model.model_id)
            header["decision_seq"] = self.publisher.last_seq("decision")  # for its overlay and frame
            e2e[i] = time.time() - frame.capture_ts
            headers.append(header)
            self._count(frame, decision, summary, model)
        self.latency.add("postprocess", decided - started)
        self.latency.add("publish", time.perf_counter() - decided)
        self.latency.add("end_to_end", e2e)
        summary.batches += 1
        if sent:
            self.last_decision_mono = self.last_progress_mono = time.monotonic()
        # Overlays (and reject frames) wait until the loop has nothing more urgent (see run()).
        frames_too = self.options.publish_frames == "reject"
        for frame, decision, amap, header in zip(frames, decisions, maps, headers):
            if amap is not None and self.overlays.wants(decision):
                self._overlays_due.append(_Due("overlay", frame, decision, amap, header, model))
            if frames_too and decision.decision == REJECT:
                self._overlays_due.append(_Due("frame", frame, decision, None, header, model))

    def _publish_overlay(self) -> None:
        """Draw, encode and publish the oldest overlay (or reject frame) still due."""
        due = self._overlays_due.popleft()
        frame, header, model = due.frame, due.header, due.model
        started = time.perf_counter()
        try:
            if due.kind == "frame":  # as the camera gave it: before the ROI crop and the resize
                image = frame.full_image if frame.full_image is not None else frame.image
                data = encode_png(image)
                encoding = "png"
            else:
                image = render_overlay(frame.image, due.amap, model.bundle.display_range, due.decision,
                                       upsample=model.bundle.map_upsample)
                data = encode_jpeg(image, self.options.jpeg_quality)
                encoding = "jpeg"
        except Exception as exc:  # noqa: BLE001 - the decision is out already; keep the line running
            log.warning("%s#%s: %s not encoded (%s: %s); the decision was published",
                        frame.camera_id, frame.frame_id, due.kind, type(exc).__name__, exc)
            return
        self.publisher.publish(due.kind, {**header, "encoding": encoding, "width": image.shape[1],
                                          "height": image.shape[0]}, data, model_id=model.model_id)
        if due.kind == "overlay":
            self.latency.add("overlay", time.perf_counter() - started)

    def _count(self, frame: Frame, decision: Decision, summary: RunSummary, model: ActiveModel) -> None:
        self._decisions[frame.camera_id] += 1
        self._interval[frame.camera_id] += 1
        key = (frame.camera_id, decision.decision)
        self.decisions_by_result[key] = self.decisions_by_result.get(key, 0) + 1
        summary.frames += 1
        summary.rejects += decision.decision == "reject"
        summary.errors += decision.decision == ERROR
        if frame.label is not None and decision.decision != ERROR:
            summary.labelled += 1
            normal = model.bundle.manifest["classes"]["normal"]
            summary.correct += (frame.label == normal) == (decision.decision == ACCEPT)

    def _stats_message(self, summary: RunSummary, now: float, interval_s: float) -> dict[str, Any]:
        interval_s = max(interval_s, 1e-9)
        cameras = {}
        for s in self.sources:
            cid = s.camera_id
            self.camera_fps[cid] = round(self._interval[cid] / interval_s, 2)
            cameras[cid] = {**s.status(), "fps": self.camera_fps[cid],
                            "decisions": self._decisions[cid], "dropped": self._queue.dropped.get(cid, 0),
                            "paused": self.paused_frames[cid]}
        interval_frames = sum(self._interval.values())
        self._interval = dict.fromkeys(self._interval, 0)
        self.last_fps = interval_frames / interval_s
        return {
            "state": "stopping" if self.stopping else "paused" if self.paused else "running",
            "paused": self.paused, "model_id": self.model.model_id,
            "uptime_s": round(now - self._started, 3), "interval_s": round(interval_s, 3),
            "fps": round(self.last_fps, 2), "frames": summary.frames, "rejects": summary.rejects,
            "errors": summary.errors, "batches": summary.batches,
            "cameras": cameras,
            "queue_depth": self.queue_depths(),
            "latency_ms": self.latency.take(),
            "engine_failures_in_a_row": self._engine_failures,
            "publisher": {"sent": dict(self.publisher.sent), "dropped": dict(self.publisher.dropped),
                          "subscriptions": self.publisher.subscriptions},
        }

    def queue_depths(self) -> dict[str, int]:
        """Frames waiting for a batch, batches waiting to be published, overlays/frames due."""
        return {"frames": len(self._queue), "results": self._results.qsize(), "overlays": len(self._overlays_due)}

    def _publish_stats(self, summary: RunSummary, now: float, interval_s: float) -> None:
        message = self._stats_message(summary, now, interval_s)
        self.publisher.publish("stats", message)
        if self.monitor is not None:
            self.monitor.stats(message)

    def _begin_stop(self) -> None:
        waiting = self._queue.close()  # later frames are ignored; the waiting ones still get batched
        log.info("stopping (%s): sources closed, %d queued frame(s) still get their decisions",
                 self.stop_reason or "sources ended", waiting)
        if self.monitor is not None:
            self.monitor.stopping()

    def run(self) -> RunSummary:
        # The engine owns the cores. numpy's BLAS (OpenBLAS) would split even the small
        # products of an overlay over worker threads that then spin, taking the cores from
        # ONNX Runtime: FCDD's pipeline fell to 0.56 of the model's img/s with it.
        with threadpool_limits(limits=1, user_api="blas"):
            return self._run()

    def _warm_up(self) -> None:
        """Run the engine once at every batch size it may be given, before any frame is read.

        ONNX Runtime plans and grows its memory per input shape and keeps it: without this, a
        backlog that first forms a batch of, say, 7 frames hours into a run grows the process
        then (+20 MB in a 10-minute soak after a stall) and that first call is slow. Warmed,
        resident memory is flat from the start. A failure here is only logged: real frames
        get error decisions as usual.
        """
        try:
            done = _warmed.setdefault(self.engine, set())
        except TypeError:  # an engine object without weak references: warm it every run
            done = set()
        todo = sorted(set(batch_sizes(self.options.max_batch)) - done)
        if not todo:
            return
        started = time.perf_counter()
        warmed = warm_up(self.model, todo)
        done.update(warmed)
        if warmed:
            log.info("engine warmed up at batch sizes %s in %.2f s", _ranges(warmed), time.perf_counter() - started)

    def _run(self) -> RunSummary:
        opts = self.options
        summary = RunSummary()
        self._warm_up()
        self._started = time.monotonic()
        if opts.wait_subscribers:
            seen = self.publisher.wait_for_subscribers(opts.wait_subscribers, opts.wait_timeout_s, self._stop)
            if seen < opts.wait_subscribers and not self.stopping:
                log.warning("only %d of %d subscriptions after %.0f s; starting anyway",
                            seen, opts.wait_subscribers, opts.wait_timeout_s)
        prepare = _Preprocessor(self)
        threads = [SourceThread(s, self._queue, prepare, stop=self._stop) for s in self.sources]
        inference = threading.Thread(target=self._infer_loop, name="inference", daemon=True)
        started = last_stats = time.monotonic()
        # The stop budget: linger at the end, a little for the process to exit, the rest drains.
        linger_s = min(opts.linger_ms / 1000.0, opts.stop_timeout_s / 4)
        give_up_s = max(0.1, opts.stop_timeout_s - linger_s - 0.5)
        discard_s = 0.7 * give_up_s
        stop_at: float | None = None
        discarded = False
        for t in threads:
            t.start()
        inference.start()
        log.info("running: %s -> %s", ", ".join(s.camera_id for s in self.sources), self.publisher.endpoint)
        while True:
            # Decisions are what the line waits for, so a batch's decisions never queue behind
            # earlier frames' overlays: one overlay is drawn per turn of this loop, and only
            # when no result is waiting (unless too many overlays are due: then they go first,
            # which holds inference back through the bounded result queue).
            due = len(self._overlays_due)
            try:
                if due >= self._overlays_due_max:
                    item = None
                else:
                    item = self._results.get_nowait() if due else self._results.get(timeout=0.2)
            except queue.Empty:
                item = None
            if item is _END:
                break
            if item is not None:
                self._handle(item, summary)
            elif due:
                self._publish_overlay()
            now = time.monotonic()
            if stop_at is None and (self._stop.is_set() or self._queue.ended()):
                stop_at = now
                self._begin_stop()
            if stop_at is not None and self._stop.is_set():
                if not discarded and now >= stop_at + discard_s:
                    discarded = True
                    left = self._queue.discard()
                    summary.discarded = len(left)
                    if left:
                        log.warning("stop timeout: %d frame(s) still waiting for a batch are discarded "
                                    "(%s)", len(left), ", ".join(f"{f.camera_id}#{f.frame_id}" for f in left))
                if now >= stop_at + give_up_s:
                    summary.timed_out = True
                    log.error("stop timeout: the engine did not finish the batch in flight within "
                              "%.1f s; exiting without its decisions", give_up_s)
                    break
            if now - last_stats >= opts.stats_interval_s:
                self._publish_stats(summary, now, now - last_stats)
                last_stats = now
            if self.monitor is not None:
                self.monitor.tick(self, now)
        if stop_at is None:  # the stream ended before the loop saw the stop request
            self._begin_stop()
        while self._overlays_due:  # every decided frame's overlay still goes out
            self._publish_overlay()
        end = time.monotonic()
        summary.seconds = end - started
        inference.join(timeout=0 if summary.timed_out else 5)
        joined_by = time.monotonic() + 1.0
        for t in threads:  # a source blocked in a camera read is a daemon thread: don't wait long
            t.join(timeout=max(0.0, joined_by - time.monotonic()))
        summary.dropped = dict(self._queue.dropped)
        summary.unqueued = self._queue.ignored
        summary.source_errors = {s.camera_id: s.counters.get("errors", 0) for s in self.sources}
        summary.bad_frames = {s.camera_id: s.counters.get("bad_frames", 0) for s in self.sources}
        # A source that died of an error (or a live camera that stopped without being asked)
        # is a failure too: the service must exit non-zero so that systemd restarts it, not
        # report a clean end of the stream.
        for t in threads:
            if self.fatal is None and t.error is not None:
                self.fatal = f"source {t.source.camera_id} stopped by an error: {t.error}"
            elif self.fatal is None and not t.source.finite and not self._stop.is_set():
                self.fatal = f"live source {t.source.camera_id} ended without a stop request"
        summary.fatal = self.fatal
        self._publish_stats(summary, end, end - last_stats)
        self.publisher.close(linger_ms=int(linger_s * 1000))
        return summary


def _ranges(sizes: list[int]) -> str:
    """[1, 2, 3, 4, 8] -> "1-4, 8" (for the log)."""
    parts, start = [], sizes[0]
    for prev, cur in zip(sizes, [*sizes[1:], None]):
        if cur is None or cur != prev + 1:
            parts.append(f"{start}-{prev}" if prev > start else f"{start}")
            start = cur
    return ", ".join(parts)
