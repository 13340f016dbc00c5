"""Frame sources (folders, video files, cameras and streams, synthetic parts) and their threads.

A Source iterates frames; a SourceThread drives one source, checks and crops each frame (the
optional region of interest), preprocesses it in its own thread (so preprocessing overlaps
with inference) and puts it into the FrameQueue. A frame that cannot be inspected (wrong
size or channel count, ROI outside it) is not dropped: it goes on, in order, marked with
``Frame.error``, and gets an `error` decision.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Callable, Iterator

import cv2
import numpy as np

from edge.batcher import POLICIES, FrameQueue
from edge.frames import Frame
from edge.images import IMAGE_SUFFIXES, ImageReadError, list_images, read_image, to_rgb

log = logging.getLogger(__name__)

URL_SCHEMES = ("rtsp://", "rtsps://", "http://", "https://", "rtmp://", "udp://", "tcp://", "srt://")
SOURCE_FORMS = ("folder:PATH", "video:PATH", "camera:INDEX", "camera:/dev/videoN",
                "camera:ANY_STRING_OPENCV_OPENS", "rtsp://... / http://... (or another stream URL)",
                "gst:GSTREAMER_PIPELINE (ending in appsink; needs OpenCV built with GStreamer)",
                "synthetic", "synthetic:count=200,fps=30,defect_rate=0.3,seed=1,size=224")
CAMERA_OPTIONS = ("backoff_s", "backoff_max_s", "io_timeout_s", "reopen_after_s")
MAX_BLOCKED_READS = 2  # readers given up on (reopen_after_s) that may still hold a thread each


class Source(ABC):
    """One camera or feed. frames() yields stamped Frames; a SourceThread drives it.

    Settings a SourceThread applies (the config sets them; None = none / the default):
    ``policy`` ("latest" or "queue"), ``roi`` ((x, y, w, h) crop in pixels) and
    ``expect_size`` ((w, h): frames of another size get an error decision).
    """

    finite: bool = True

    def __init__(self, camera_id: str) -> None:
        self.camera_id = camera_id
        self.counters: dict[str, int] = {"frames": 0, "errors": 0, "reconnects": 0, "bad_frames": 0}
        self.policy: str | None = None
        self.roi: tuple[int, int, int, int] | None = None
        self.expect_size: tuple[int, int] | None = None
        # starting -> running -> ended for files; cameras: connected / lost / down (retrying)
        self.state = "starting"

    @property
    def default_policy(self) -> str:
        # Files must not lose frames; live feeds must not fall behind real time.
        return "queue" if self.finite else "latest"

    def status(self) -> dict:
        """Counters and state for the stats topic (read from another thread: plain values)."""
        return {"state": self.state, **self.counters}

    def _stamp(self, image: np.ndarray, source_name: str | None = None, label: str | None = None) -> Frame:
        """A Frame with the next contiguous frame_id and the capture time."""
        frame = Frame(self.camera_id, self.counters["frames"], time.time(), image,
                      source_name=source_name, label=label)
        self.counters["frames"] += 1
        return frame

    def _stamp_raw(self, raw: np.ndarray, what: str, source_name: str | None = None) -> Frame:
        """A Frame from a decoded capture (BGR, grey, BGRA...); one that cannot be made RGB
        is still stamped, marked with the reason, so it gets an error decision."""
        try:
            return self._stamp(to_rgb(raw, what), source_name=source_name)
        except ImageReadError as exc:
            frame = self._stamp(raw, source_name=source_name)
            frame.error = str(exc)
            return frame

    @abstractmethod
    def frames(self, stop: threading.Event) -> Iterator[Frame]:
        """Yield frames until the source ends or stop is set."""


class FolderSource(Source):
    """Every image file in a folder, in name order. An unreadable file is not fatal and not
    skipped: it is a frame of its own that gets an `error` decision naming the file."""

    def __init__(self, path: str | Path, camera_id: str = "cam0") -> None:
        super().__init__(camera_id)
        self.path = Path(path)
        if not self.path.is_dir():
            raise ValueError(f"folder source {self.path}: not a directory")

    def frames(self, stop: threading.Event) -> Iterator[Frame]:
        files = list_images(self.path)
        self.state = "running"
        if not files:
            log.warning("%s: no image files in %s (looked for %s)", self.camera_id, self.path,
                        ", ".join(IMAGE_SUFFIXES))
        for file in files:
            if stop.is_set():
                return
            try:
                image = read_image(file)
            except (ImageReadError, cv2.error) as exc:
                # One bad file on a line must not stop the inspection of the others, nor vanish:
                # it is a frame (its own frame_id, in order) that gets an `error` decision.
                self.counters["errors"] += 1
                # logged where every marked frame is (SourceThread: once per run of bad frames)
                log.debug("%s: %s cannot be inspected: %s", self.camera_id, file.name, exc)
                frame = self._stamp(np.zeros((1, 1, 3), np.uint8), source_name=file.name)  # no pixels to show
                frame.error = str(exc)
                yield frame
                continue
            yield self._stamp(image, source_name=file.name)
        self.state = "ended"


def _read_frames(cap: cv2.VideoCapture, stop: threading.Event) -> Iterator[np.ndarray]:
    """Decoded frames (as OpenCV delivers them) from an open capture until it stops
    delivering or stop is set."""
    while not stop.is_set():
        ok, image = cap.read()
        if not ok or image is None:
            return
        yield image


class _Reader(threading.Thread):
    """Opens and reads one capture in a thread of its own, so that the camera's source can give
    up on an open or a read that blocks: it stops waiting, reconnects, and leaves this thread
    behind. The thread releases its capture when its read returns (or never, if it never
    does: a capture cannot be released safely while another thread is inside read())."""

    def __init__(self, open_capture: Callable[[], cv2.VideoCapture | None], name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.open_capture = open_capture
        self.frames: queue.Queue[np.ndarray | None] = queue.Queue(maxsize=2)  # None: the stream ended
        self.abandoned = threading.Event()  # set by the source: stop reading, drop what comes
        self.timed_out = False  # read() gave up waiting for a frame

    def run(self) -> None:
        cap = None
        try:
            cap = self.open_capture()
            if cap is not None:
                for image in _read_frames(cap, self.abandoned):
                    if not self._offer(image):
                        break
        except cv2.error as exc:
            log.debug("%s: read raised %s", self.name, exc)
        finally:
            if cap is not None:
                cap.release()
            self._offer(None)

    def _offer(self, item: np.ndarray | None) -> bool:
        """Hand over one item, waiting in short steps; False once abandoned."""
        while not self.abandoned.is_set():
            try:
                self.frames.put(item, timeout=0.2)
                return True
            except queue.Full:
                pass
        return False

    def read(self, stop: threading.Event, timeout_s: float) -> Iterator[np.ndarray]:
        """Frames until the stream ends, stop is set, or none came for timeout_s (timed_out:
        the caller reconnects). Waits in short steps, so that stop is honoured within 0.2 s."""
        while not stop.is_set():
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    image = self.frames.get(timeout=max(0.0, min(0.2, deadline - time.monotonic())))
                    break
                except queue.Empty:
                    if stop.is_set():
                        return
                    if time.monotonic() >= deadline:
                        self.timed_out = True
                        return
            if image is None:
                return
            yield image


class VideoSource(Source):
    """Every frame of a video file, in order."""

    def __init__(self, path: str | Path, camera_id: str = "cam0") -> None:
        super().__init__(camera_id)
        self.path = Path(path)
        self._open().release()  # fail now, with the path in the message, not inside a thread

    def _open(self) -> cv2.VideoCapture:
        cap = cv2.VideoCapture(str(self.path), cv2.CAP_FFMPEG) if self.path.is_file() else None
        if cap is None or not cap.isOpened():
            raise ValueError(f"video source {self.path}: cannot open "
                             f"({'no such file' if cap is None else 'not a video OpenCV can decode'})")
        return cap

    def frames(self, stop: threading.Event) -> Iterator[Frame]:
        cap = self._open()
        self.state = "running"
        declared = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)  # the container's count; 0: unknown
        try:
            for raw in _read_frames(cap, stop):
                yield self._stamp_raw(raw, f"{self.path.name} frame {self.counters['frames']}",
                                      source_name=self.path.name)
            read = self.counters["frames"]
            if not stop.is_set() and 0 < read < declared:  # a cut-off or damaged file ends early, quietly
                self.counters["errors"] += 1
                log.warning("%s: %s ended after %d of the %d frames its header declares (truncated or "
                            "damaged at frame %d?); the rest were not inspected", self.camera_id,
                            self.path.name, read, declared, read)
        finally:
            cap.release()
            self.state = "ended"


class CameraSource(Source):
    """A live camera or stream. Reconnects with capped exponential backoff; never raises out
    of frames().

    ``target``: a device index, a device path, a stream URL, or (with ``gstreamer=True``) a
    GStreamer pipeline ending in appsink. ``state`` is "connected" while frames arrive, "lost"
    just after they stopped, "down" while reopening fails; ``outage_s`` adds up the time
    spent not connected since the first connection (the start-up is not an outage).

    A read that blocks is reported, not only a read that fails: OpenCV bounds reads of URL
    streams (io_timeout_s, then "lost" and a reconnect), but a GStreamer pipeline or a device
    can block in read() with nothing to time it out. status() then says "stalled" (and the
    frame's age) once no frame came for ``stall_s`` (default io_timeout_s), and logs it once.
    With ``reopen_after_s``, opens and reads run in a thread of their own (_Reader): no frame
    for that long (the first one counted from the open) and the feed counts as lost: the
    camera is reopened and the blocked thread left to end when its open or read does; while
    MAX_BLOCKED_READS of them have not, no new one is started (the backoff applies). Off by
    default: a triggered camera on a stopped line sends nothing for as long as the line
    stands, and a device still held by a blocked read can refuse to reopen ("busy").
    """

    finite = False

    def __init__(self, target: int | str, camera_id: str = "cam0", backoff_s: float = 0.5,
                 backoff_max_s: float | None = None, io_timeout_s: float = 5.0, gstreamer: bool = False,
                 stall_s: float | None = None, reopen_after_s: float | None = None) -> None:
        super().__init__(camera_id)
        if backoff_max_s is None:
            backoff_max_s = max(10.0, backoff_s)
        if not backoff_s > 0 or backoff_max_s < backoff_s or not io_timeout_s > 0:
            raise ValueError(f"{camera_id}: need 0 < backoff_s <= backoff_max_s and io_timeout_s > 0 "
                             f"(got {backoff_s}, {backoff_max_s}, {io_timeout_s})")
        if reopen_after_s is not None and not reopen_after_s > 0:
            raise ValueError(f"{camera_id}: reopen_after_s must be > 0 seconds, or left out (got {reopen_after_s})")
        self.reopen_after_s = reopen_after_s
        self._blocked: list[_Reader] = []  # readers given up on whose open or read has not returned
        self.target = target
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.io_timeout_s = io_timeout_s  # bounds a blocked open/read on streams, so stop is honoured
        self.gstreamer = gstreamer
        self.stall_s = io_timeout_s if stall_s is None else stall_s
        self.counters.update(lost=0)
        self._outage_s = 0.0
        self._down_since: float | None = None  # monotonic; set when a connected feed is lost
        self._last_frame: float | None = None  # monotonic; the last frame handed over
        self._stall_logged = False

    @property
    def outage_s(self) -> float:
        since = self._down_since
        return self._outage_s + (time.monotonic() - since if since is not None else 0.0)

    def status(self) -> dict:
        out = {**super().status(), "outage_s": round(self.outage_s, 3)}
        last = self._last_frame
        age = None if last is None else time.monotonic() - last
        if out["state"] == "connected" and age is not None and age > self.stall_s:
            out["state"] = "stalled"  # the reader is blocked in read(): it cannot say so itself
            if not self._stall_logged:
                self._stall_logged = True
                log.warning("%s: no frame from %s for %.1f s, the read is blocked (the camera or its "
                            "pipeline hangs; a URL stream would time out after io_timeout_s)",
                            self.camera_id, self.target, age)
        out["frame_age_s"] = None if age is None else round(age, 3)
        return out

    def _open(self) -> cv2.VideoCapture | None:
        try:
            if self.gstreamer:
                cap = cv2.VideoCapture(str(self.target), cv2.CAP_GSTREAMER)
            elif isinstance(self.target, str) and self.target.startswith(URL_SCHEMES):
                ms = int(self.io_timeout_s * 1000)
                cap = cv2.VideoCapture(self.target, cv2.CAP_FFMPEG,
                                       [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, ms])
            else:  # device index, /dev/videoN, or anything else a backend may open
                cap = cv2.VideoCapture(self.target)
        except cv2.error as exc:
            log.debug("%s: opening %s raised %s", self.camera_id, self.target, exc)
            return None
        if cap.isOpened():
            return cap
        cap.release()
        return None

    def _start_reader(self) -> _Reader | None:
        """A reader thread for a fresh open, or None while MAX_BLOCKED_READS earlier ones are
        still blocked (each holds a thread and maybe a device: they must not pile up)."""
        self._blocked = [r for r in self._blocked if r.is_alive()]
        if len(self._blocked) >= MAX_BLOCKED_READS:
            log.log(logging.WARNING if self.state != "down" else logging.DEBUG,
                    "%s: %d earlier opens or reads of %s are still blocked; not reopening it until one "
                    "returns", self.camera_id, len(self._blocked), self.target)
            return None
        reader = _Reader(self._open, f"read-{self.camera_id}")
        try:
            reader.start()
        except RuntimeError as exc:  # no thread to be had: a failed attempt, retried after the backoff
            log.warning("%s: cannot start a reader thread for %s (%s)", self.camera_id, self.target, exc)
            return None
        return reader

    def _connected(self, attempts: int) -> None:
        log.info("%s: connected to %s%s", self.camera_id, self.target,
                 f" after {attempts - 1} retries" if attempts > 1 else "")
        if self._down_since is not None:
            self._outage_s += time.monotonic() - self._down_since
            self._down_since = None
        self.state = "connected"

    def frames(self, stop: threading.Event) -> Iterator[Frame]:
        delay = self.backoff_s
        attempts = 0
        what = f"{self.camera_id} frame"
        while not stop.is_set():
            if attempts:
                self.counters["reconnects"] += 1
            attempts += 1
            cap, got, reader = None, 0, None
            if self.reopen_after_s is None:
                cap = self._open()
            else:
                reader = self._start_reader()
            try:
                if cap is not None or reader is not None:
                    raws = reader.read(stop, self.reopen_after_s) if reader else _read_frames(cap, stop)
                    for raw in raws:
                        if got == 0:  # connected means frames arrive, not merely that open() worked
                            self._connected(attempts)
                            delay, attempts = self.backoff_s, 1
                        got += 1
                        self._last_frame = time.monotonic()
                        if self._stall_logged:
                            self._stall_logged = False
                            log.info("%s: frames arrive again from %s", self.camera_id, self.target)
                        yield self._stamp_raw(raw, what)
            except cv2.error as exc:
                log.debug("%s: reading %s raised %s", self.camera_id, self.target, exc)
            finally:
                if cap is not None:
                    cap.release()
                if reader is not None:  # its thread ends when (if) its open or read returns
                    reader.abandoned.set()
                    if reader.timed_out:
                        self._blocked.append(reader)
            if stop.is_set():
                return
            if reader is not None and reader.timed_out:
                log.log(logging.WARNING if got else logging.DEBUG,
                        "%s: no frame from %s for %.3g s (reopen_after_s): reopening it; the blocked "
                        "open or read is left to end on its own", self.camera_id, self.target,
                        self.reopen_after_s)
            # One log line per state change; repeated failed attempts only at DEBUG.
            if got:
                self.state = "lost"  # before the counter: a reader of both sees them agree
                self.counters["lost"] += 1
                self._down_since = time.monotonic()
                log.warning("%s: lost %s after %d frames; reconnecting in %.2g s",
                            self.camera_id, self.target, got, delay)
            else:
                self.counters["errors"] += 1
                if self.state != "down":
                    log.warning("%s: cannot open %s or it sends no frames; retrying in %.2g s "
                                "(backoff doubling up to %.2g s)", self.camera_id, self.target, delay,
                                self.backoff_max_s)
                else:
                    log.debug("%s: still no frames from %s; retrying in %.2g s", self.camera_id,
                              self.target, delay)
                self.state = "down"
            stop.wait(delay)  # returns at once when stop is set
            if not got:
                delay = min(delay * 2, self.backoff_max_s)


class SyntheticSource(Source):
    """Synthetic parts with ground-truth labels; finite with a count, live (infinite) without."""

    def __init__(self, camera_id: str = "cam0", count: int | None = None, fps: float | None = None,
                 defect_rate: float = 0.3, seed: int = 0, size: int = 224) -> None:
        super().__init__(camera_id)
        from edge.synthetic import PartGenerator  # lazy: only synthetic feeds need it

        self.generator = PartGenerator(size=size, seed=seed)
        self.count, self.fps, self.defect_rate = count, fps, defect_rate
        self.finite = count is not None

    def frames(self, stop: threading.Event) -> Iterator[Frame]:
        produced = 0
        next_t = time.monotonic()
        self.state = "running"
        while not stop.is_set() and (self.count is None or produced < self.count):
            if self.fps:
                # Pace against a schedule, not a fixed sleep, so slow renders don't lower the rate.
                if stop.wait(max(0.0, next_t - time.monotonic())):
                    return
                next_t += 1.0 / self.fps
            image, label = self.generator.sample(self.defect_rate)
            produced += 1
            yield self._stamp(image, label=label)
        if self.count is not None and produced >= self.count:
            self.state = "ended"


_SYNTHETIC_KEYS = {"count": int, "fps": float, "defect_rate": float, "seed": int, "size": int}


def _synthetic_options(text: str) -> dict:
    options: dict = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in _SYNTHETIC_KEYS:
            raise ValueError(f"synthetic source option {item!r}: expected key=value with key in "
                             f"{', '.join(_SYNTHETIC_KEYS)}")
        value = value.strip()
        try:
            options[key] = None if value.lower() in ("none", "") and key in ("count", "fps") \
                else _SYNTHETIC_KEYS[key](value)
        except ValueError:
            raise ValueError(f"synthetic source option {key}={value!r}: not a valid "
                             f"{_SYNTHETIC_KEYS[key].__name__}") from None
    # (test, what it says): a bad rate or count must not quietly run unpaced or produce nothing
    checks = {"count": (lambda v: v >= 1, "at least 1"), "fps": (lambda v: v > 0, "above 0"),
              "defect_rate": (lambda v: 0 <= v <= 1, "between 0 and 1"), "size": (lambda v: v >= 16, "at least 16")}
    for key, (ok, what) in checks.items():
        if options.get(key) is not None and not ok(options[key]):  # nan fails every test
            raise ValueError(f"synthetic source option {key}={options[key]!r}: must be {what}")
    return options


def has_gstreamer() -> bool:
    """Whether this OpenCV build can open GStreamer pipelines."""
    try:
        return bool(cv2.videoio_registry.hasBackend(cv2.CAP_GSTREAMER))
    except (AttributeError, cv2.error):
        return False


def parse_source(spec: str, camera_id: str | None = None, **camera_options: float) -> Source:
    """A Source from its command-line form; ValueError listing the accepted forms otherwise.

    ``camera_options`` (CAMERA_OPTIONS) apply to cameras and streams
    only; giving them for another kind of source is an error, not silently ignored.
    """
    camera_id = camera_id or "cam0"
    unknown = set(camera_options) - set(CAMERA_OPTIONS)
    if unknown:
        raise ValueError(f"unknown camera option(s) {sorted(unknown)}; known: {', '.join(CAMERA_OPTIONS)}")
    scheme, sep, rest = spec.partition(":")
    if spec.startswith(URL_SCHEMES):
        return CameraSource(spec, camera_id, **camera_options)
    if sep and rest and scheme == "camera":
        return CameraSource(int(rest) if rest.isdigit() else rest, camera_id, **camera_options)
    if sep and rest and scheme == "gst":
        if not has_gstreamer():
            raise ValueError(f"source {spec!r}: this OpenCV has no GStreamer backend (see "
                             "cv2.getBuildInformation()); install an OpenCV built with GStreamer, "
                             "or use the stream's rtsp:// or http:// URL (FFmpeg backend)")
        return CameraSource(rest, camera_id, gstreamer=True, **camera_options)
    if camera_options and scheme in ("synthetic", "folder", "video"):
        raise ValueError(f"source {spec!r}: {', '.join(sorted(camera_options))} apply to cameras and "
                         "streams only")
    if scheme == "synthetic":
        return SyntheticSource(camera_id, **_synthetic_options(rest))
    if sep and rest and scheme == "folder":
        return FolderSource(rest, camera_id)
    if sep and rest and scheme == "video":
        return VideoSource(rest, camera_id)
    raise ValueError(f"unknown source {spec!r}; accepted forms: {'; '.join(SOURCE_FORMS)}")


def frame_problem(image: np.ndarray, expect_size: tuple[int, int] | None = None,
                  roi: tuple[int, int, int, int] | None = None) -> str | None:
    """Why a frame cannot be inspected, or None. Cheap: it looks at the shape only."""
    shape, dtype = getattr(image, "shape", None), getattr(image, "dtype", None)
    if shape is None or len(shape) not in (2, 3):
        return f"frame is not an image (shape {shape}); expected height x width x 3 RGB"
    channels = 1 if len(shape) == 2 else shape[2]
    if channels != 3 or dtype != np.uint8:
        return (f"frame has {channels} channel(s) of {dtype} (shape {shape}); expected 3 channels "
                "of uint8 (RGB): check the camera's pixel format")
    h, w = shape[:2]
    if not h or not w:
        return f"frame is empty ({w}x{h})"
    if expect_size is not None and (w, h) != tuple(expect_size):
        return (f"frame is {w}x{h} but the source is configured for {expect_size[0]}x{expect_size[1]} "
                "(size); check the camera mode or the config")
    if roi is not None:
        x, y, rw, rh = roi
        if x + rw > w or y + rh > h:
            return f"roi {list(roi)} (x, y, width, height) does not fit in the {w}x{h} frame; fix the roi"
    return None


class SourceThread(threading.Thread):
    """Drives one source: check, crop and preprocess each frame here, put it in the queue,
    end the stream when done.

    A frame that fails the check (see frame_problem) or whose preprocessing raises is marked
    with ``Frame.error`` and queued all the same: it gets an `error` decision in its place in
    the stream. One warning per run of bad frames, not one per frame.
    """

    def __init__(self, source: Source, queue: FrameQueue,
                 preprocess: Callable[[np.ndarray], np.ndarray] | None,
                 policy: str | None = None, stop: threading.Event | None = None) -> None:
        super().__init__(name=f"source-{source.camera_id}", daemon=True)
        self.source, self.queue, self.preprocess = source, queue, preprocess
        self.policy = policy or source.policy or source.default_policy
        if self.policy not in POLICIES:
            raise ValueError(f"{source.camera_id}: policy {self.policy!r}; expected one of {POLICIES}")
        self.stop = stop or threading.Event()
        self.error: BaseException | None = None
        self._bad_run = 0  # consecutive bad frames (for one log line per run)
        # Registered now, not in run(): a batcher started before this thread runs must not
        # see "all producers done" and end the stream early.
        queue.add_producer()

    def run(self) -> None:
        frames = self.source.frames(self.stop)
        try:
            for frame in frames:
                self._prepare(frame)
                if not self._put(frame):
                    return
        except Exception as exc:  # noqa: BLE001 - a dead source must say why, not vanish
            self.error = exc
            self.source.state = "failed"
            log.exception("%s: source stopped by an error: %s", self.source.camera_id, exc)
        finally:
            frames.close()  # releases captures even when we leave the loop early
            self.queue.producer_done()

    def _prepare(self, frame: Frame) -> None:
        src = self.source
        if frame.error is None:
            frame.error = frame_problem(frame.image, src.expect_size, src.roi)
        if frame.error is None:
            if src.roi is not None:
                x, y, w, h = src.roi
                frame.full_image = frame.image  # kept for the `frame` topic (rejects, whole)
                frame.image = frame.image[y:y + h, x:x + w]  # a view: no copy
            if self.preprocess is not None:
                try:
                    frame.tensor = self.preprocess(frame.image)
                    # which model geometry made it (edge.pipeline: a swap may come before its batch)
                    frame.geometry = getattr(self.preprocess, "geometry", None)
                except Exception as exc:  # noqa: BLE001 - this frame gets an error decision
                    frame.error = f"preprocessing failed: {exc}"
        if frame.error is None:
            if self._bad_run:
                log.info("%s: frames good again after %d bad one(s)", src.camera_id, self._bad_run)
                self._bad_run = 0
            return
        src.counters["bad_frames"] += 1
        self._bad_run += 1
        if self._bad_run == 1:
            log.warning("%s frame %d: %s; it gets an error decision (further bad frames are "
                        "counted in bad_frames, logged at debug level)", src.camera_id, frame.frame_id,
                        frame.error)
        else:
            log.debug("%s frame %d: %s", src.camera_id, frame.frame_id, frame.error)

    def _put(self, frame: Frame) -> bool:
        """Put one frame; False when the thread should stop (stop set or queue closed)."""
        if self.policy == "latest":
            self.queue.put(frame, "latest")
            return not self.queue.closed
        # Bounded waits so a stop request is noticed even while the queue stays full.
        while not self.queue.put(frame, "queue", timeout=0.2):
            if self.stop.is_set() or self.queue.closed:
                return False
        return not self.stop.is_set()
