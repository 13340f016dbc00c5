"""Frame sources (folders, video files, cameras and streams, synthetic parts) and their threads.

A Source iterates frames; a SourceThread drives one source, preprocesses each frame in its
own thread (so preprocessing overlaps with inference) and puts it into the FrameQueue.
"""
from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Callable, Iterator

import cv2
import numpy as np

from edge.batcher import FrameQueue
from edge.frames import Frame
from edge.images import IMAGE_SUFFIXES, ImageReadError, list_images, read_image, to_rgb

log = logging.getLogger(__name__)

URL_SCHEMES = ("rtsp://", "rtsps://", "http://", "https://", "rtmp://", "udp://", "tcp://", "srt://")
SOURCE_FORMS = ("folder:PATH", "video:PATH", "camera:INDEX", "camera:/dev/videoN",
                "camera:ANY_STRING_OPENCV_OPENS", "rtsp://... / http://... (or another stream URL)",
                "synthetic", "synthetic:count=200,fps=30,defect_rate=0.3,seed=1,size=224")


class Source(ABC):
    """One camera or feed. frames() yields stamped Frames; a SourceThread drives it."""

    finite: bool = True

    def __init__(self, camera_id: str) -> None:
        self.camera_id = camera_id
        self.counters: dict[str, int] = {"frames": 0, "errors": 0, "reconnects": 0}

    @property
    def default_policy(self) -> str:
        # Files must not lose frames; live feeds must not fall behind real time.
        return "queue" if self.finite else "latest"

    def _stamp(self, image: np.ndarray, source_name: str | None = None, label: str | None = None) -> Frame:
        """A Frame with the next contiguous frame_id and the capture time."""
        frame = Frame(self.camera_id, self.counters["frames"], time.time(), image,
                      source_name=source_name, label=label)
        self.counters["frames"] += 1
        return frame

    @abstractmethod
    def frames(self, stop: threading.Event) -> Iterator[Frame]:
        """Yield frames until the source ends or stop is set."""


class FolderSource(Source):
    """Every image file in a folder, in name order. Unreadable files are skipped, not fatal."""

    def __init__(self, path: str | Path, camera_id: str = "cam0") -> None:
        super().__init__(camera_id)
        self.path = Path(path)
        if not self.path.is_dir():
            raise ValueError(f"folder source {self.path}: not a directory")

    def frames(self, stop: threading.Event) -> Iterator[Frame]:
        files = list_images(self.path)
        if not files:
            log.warning("%s: no image files in %s (looked for %s)", self.camera_id, self.path,
                        ", ".join(IMAGE_SUFFIXES))
        for file in files:
            if stop.is_set():
                return
            try:
                image = read_image(file)
            except (ImageReadError, cv2.error) as exc:
                # One bad file on a line must not stop the inspection of the others.
                self.counters["errors"] += 1
                log.warning("%s: skipped %s: %s", self.camera_id, file.name, exc)
                continue
            yield self._stamp(image, source_name=file.name)


def _read_frames(cap: cv2.VideoCapture, stop: threading.Event) -> Iterator[np.ndarray]:
    """Decoded RGB frames from an open capture until it stops delivering or stop is set."""
    while not stop.is_set():
        ok, image = cap.read()
        if not ok or image is None:
            return
        yield to_rgb(image, "video frame")


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
        try:
            for image in _read_frames(cap, stop):
                yield self._stamp(image, source_name=self.path.name)
        finally:
            cap.release()


class CameraSource(Source):
    """A live camera or stream. Reconnects with exponential backoff; never raises out of frames()."""

    finite = False

    def __init__(self, target: int | str, camera_id: str = "cam0", backoff_s: float = 0.5,
                 backoff_max_s: float = 10.0, io_timeout_s: float = 5.0) -> None:
        super().__init__(camera_id)
        self.target = target
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.io_timeout_s = io_timeout_s  # bounds a blocked open/read on streams, so stop is honoured
        self.counters.update(lost=0)

    def _open(self) -> cv2.VideoCapture | None:
        try:
            if isinstance(self.target, str) and self.target.startswith(URL_SCHEMES):
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

    def frames(self, stop: threading.Event) -> Iterator[Frame]:
        delay = self.backoff_s
        state = "starting"  # -> connected -> lost -> down (retrying) -> connected ...
        attempts = 0
        while not stop.is_set():
            if attempts:
                self.counters["reconnects"] += 1
            attempts += 1
            cap, got = self._open(), 0
            try:
                if cap is not None:
                    for image in _read_frames(cap, stop):
                        if got == 0:  # connected means frames arrive, not merely that open() worked
                            log.info("%s: connected to %s%s", self.camera_id, self.target,
                                     f" after {attempts - 1} retries" if attempts > 1 else "")
                            state, delay, attempts = "connected", self.backoff_s, 1
                        got += 1
                        yield self._stamp(image)
            except (cv2.error, ImageReadError) as exc:
                log.debug("%s: reading %s raised %s", self.camera_id, self.target, exc)
            finally:
                if cap is not None:
                    cap.release()
            if stop.is_set():
                return
            # One log line per state change; repeated failed attempts only at DEBUG.
            if got:
                self.counters["lost"] += 1
                state = "lost"
                log.warning("%s: lost %s after %d frames; reconnecting in %.2g s",
                            self.camera_id, self.target, got, delay)
            else:
                self.counters["errors"] += 1
                if state != "down":
                    log.warning("%s: cannot open %s or it sends no frames; retrying in %.2g s "
                                "(backoff doubling up to %.2g s)", self.camera_id, self.target, delay,
                                self.backoff_max_s)
                else:
                    log.debug("%s: still no frames from %s; retrying in %.2g s", self.camera_id,
                              self.target, delay)
                state = "down"
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
        while not stop.is_set() and (self.count is None or produced < self.count):
            if self.fps:
                # Pace against a schedule, not a fixed sleep, so slow renders don't lower the rate.
                if stop.wait(max(0.0, next_t - time.monotonic())):
                    return
                next_t += 1.0 / self.fps
            image, label = self.generator.sample(self.defect_rate)
            produced += 1
            yield self._stamp(image, label=label)


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
    return options


def parse_source(spec: str, camera_id: str | None = None) -> Source:
    """A Source from its command-line form; ValueError listing the accepted forms otherwise."""
    camera_id = camera_id or "cam0"
    scheme, sep, rest = spec.partition(":")
    if spec.startswith(URL_SCHEMES):
        return CameraSource(spec, camera_id)
    if scheme == "synthetic":
        return SyntheticSource(camera_id, **_synthetic_options(rest))
    if sep and rest and scheme == "folder":
        return FolderSource(rest, camera_id)
    if sep and rest and scheme == "video":
        return VideoSource(rest, camera_id)
    if sep and rest and scheme == "camera":
        return CameraSource(int(rest) if rest.isdigit() else rest, camera_id)
    raise ValueError(f"unknown source {spec!r}; accepted forms: {'; '.join(SOURCE_FORMS)}")


class SourceThread(threading.Thread):
    """Drives one source: preprocess each frame here, put it in the queue, end the stream when done."""

    def __init__(self, source: Source, queue: FrameQueue,
                 preprocess: Callable[[np.ndarray], np.ndarray] | None,
                 policy: str | None = None, stop: threading.Event | None = None) -> None:
        super().__init__(name=f"source-{source.camera_id}", daemon=True)
        self.source, self.queue, self.preprocess = source, queue, preprocess
        self.policy = policy or source.default_policy
        self.stop = stop or threading.Event()
        self.error: BaseException | None = None
        # Registered now, not in run(): a batcher started before this thread runs must not
        # see "all producers done" and end the stream early.
        queue.add_producer()

    def run(self) -> None:
        frames = self.source.frames(self.stop)
        try:
            for frame in frames:
                if self.preprocess is not None:
                    frame.tensor = self.preprocess(frame.image)
                if not self._put(frame):
                    return
        except Exception as exc:  # noqa: BLE001 - a dead source must say why, not vanish
            self.error = exc
            log.exception("%s: source stopped by an error: %s", self.source.camera_id, exc)
        finally:
            frames.close()  # releases captures even when we leave the loop early
            self.queue.producer_done()

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
