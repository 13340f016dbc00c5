"""What the live page shows, kept up to date from bus messages by one thread.

Every message costs O(1) here (a few counters, a per-second bucket, the newest overlay kept by
reference): the bus thread keeps up with the runtime's full rate however many browsers watch,
and the browsers get a snapshot a few times a second (thinned to what a screen can show).
"""
from __future__ import annotations

import math
import threading
import time
from collections import deque
from typing import Any, Callable

HOUR_S = 3600
CHART_POINTS = 60
# Header keys of a decision the page shows (a whole header would be sent at every snapshot).
DECISION_KEYS = ("camera_id", "frame_id", "seq", "decision", "score", "score_norm", "threshold",
                 "model_id", "capture_ts", "publish_ts", "source", "error", "run_id")


def finite_or_none(value: Any) -> Any:
    """NaN/inf (an `error` decision's score) as None: JSON has no NaN."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _pick(header: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: finite_or_none(header.get(k)) for k in keys}


class LiveState:
    """Counts and the newest picture per camera, from the messages of one bus.

    Counts are of the decisions this view received since it started (what a `watch`
    started with it prints); the runtime's own totals since its start come with `stats`.
    """

    def __init__(self, quiet_after_s: float = 5.0, clock: Callable[[], float] = time.time) -> None:
        self.quiet_after_s = quiet_after_s
        self._clock = clock
        self._lock = threading.Lock()
        self.started = clock()
        self.parts = self.rejects = self.errors = 0
        # (whole second, parts, rejects) for the last hour, oldest first; one entry per busy second
        self._seconds: deque[list[int]] = deque()
        self.cameras: dict[str, dict[str, Any]] = {}
        self.overlays: dict[str, tuple[int, bytes, dict[str, Any]]] = {}  # camera -> (version, jpeg, header)
        self._overlay_version = 0
        self.stats: dict[str, Any] | None = None
        self.stats_at: float | None = None
        self.events: deque[dict[str, Any]] = deque(maxlen=50)
        self.last_message_at: float | None = None
        self.model_id: str | None = None
        self.threshold: float | None = None
        self.run_id: str | None = None
        self.restarts = 0  # run_id changes seen: the runtime restarted (seq began again)
        self.paused: bool | None = None  # from events (and the control status when there is one)
        self.missed: dict[str, int] = {}
        self.bus_error: str | None = None
        self.control: dict[str, Any] | None = None  # the control endpoint's last status
        self.control_error: str | None = None

    # --- called by the bus thread -------------------------------------------------------
    def on_message(self, topic: str, header: dict[str, Any], payload: bytes | None) -> None:
        now = self._clock()
        with self._lock:
            self.last_message_at = now
            run_id = header.get("run_id")
            if run_id is not None and run_id != self.run_id:
                self.restarts += self.run_id is not None
                self.run_id = run_id
            if topic == "decision":
                self._decision(header, now)
            elif topic == "overlay" and payload is not None:
                self._overlay_version += 1
                cam = str(header.get("camera_id"))
                self.overlays[cam] = (self._overlay_version, payload, _pick(header, DECISION_KEYS))
            elif topic == "stats":
                self.stats, self.stats_at = header, now
                if isinstance(header.get("paused"), bool):
                    self.paused = header["paused"]
            elif topic == "event":
                self._event(header)

    def _decision(self, header: dict[str, Any], now: float) -> None:
        reject = header.get("decision") == "reject"
        self.parts += 1
        self.rejects += reject
        self.errors += header.get("decision") == "error"
        second = int(now)
        if self._seconds and self._seconds[-1][0] == second:
            bucket = self._seconds[-1]
            bucket[1] += 1
            bucket[2] += reject
        else:
            self._seconds.append([second, 1, int(reject)])
            while self._seconds[0][0] <= second - HOUR_S:
                self._seconds.popleft()
        cam = str(header.get("camera_id"))
        entry = self.cameras.setdefault(cam, {"parts": 0, "rejects": 0})
        entry["parts"] += 1
        entry["rejects"] += reject
        entry["last"] = header
        entry["last_at"] = now
        if header.get("model_id"):
            self.model_id = header["model_id"]
        if isinstance(header.get("threshold"), (int, float)):
            self.threshold = header["threshold"]

    def _event(self, header: dict[str, Any]) -> None:
        self.events.appendleft({k: header.get(k) for k in
                                ("seq", "publish_ts", "who", "what", "before", "after", "camera_id",
                                 "settings_version")})
        if header.get("what") in ("pause", "resume"):
            self.paused = header["what"] == "pause"

    def set_missed(self, gaps: dict[str, int]) -> None:
        with self._lock:
            self.missed = {k: v for k, v in gaps.items() if v}

    def set_bus_error(self, error: str | None) -> None:
        with self._lock:
            self.bus_error = error

    def set_control(self, status: dict[str, Any] | None, error: str | None) -> None:
        with self._lock:
            self.control, self.control_error = status, error
            if status is not None and isinstance(status.get("paused"), bool):
                self.paused = status["paused"]

    # --- called by the web side ---------------------------------------------------------
    def overlay(self, camera: str) -> tuple[int, bytes, dict[str, Any]] | None:
        with self._lock:
            return self.overlays.get(camera)

    def snapshot(self) -> dict[str, Any]:
        """Everything the live page shows, as JSON-able values."""
        now = self._clock()
        with self._lock:
            hour = [b for b in self._seconds if b[0] > now - HOUR_S]
            hour_parts = sum(b[1] for b in hour)
            hour_rejects = sum(b[2] for b in hour)
            cameras = {}
            for cam, entry in self.cameras.items():
                over = self.overlays.get(cam)
                cameras[cam] = {"parts": entry["parts"], "rejects": entry["rejects"],
                                "last": _pick(entry["last"], DECISION_KEYS),
                                "last_age_s": round(now - entry["last_at"], 2),
                                "overlay": None if over is None else {"version": over[0], **over[2]}}
            for cam, over in self.overlays.items():  # an overlay before any decision of it
                cameras.setdefault(cam, {"parts": 0, "rejects": 0, "last": None, "last_age_s": None,
                                         "overlay": {"version": over[0], **over[2]}})
            stats = self.stats or {}
            health = {}
            for cam, s in (stats.get("cameras") or {}).items():
                health[cam] = {k: finite_or_none(s.get(k)) for k in
                               ("state", "fps", "frame_age_s", "dropped", "reconnects", "errors", "outage_s")}
            latency = (stats.get("latency_ms") or {}).get("end_to_end") or {}
            control = self.control or {}
            quiet_s = None if self.last_message_at is None else now - self.last_message_at
            return {
                "now": now, "since": self.started,
                "parts": self.parts, "rejects": self.rejects, "errors": self.errors,
                "reject_rate": self.rejects / self.parts if self.parts else None,
                "hour": {"parts": hour_parts, "rejects": hour_rejects,
                         "reject_rate": hour_rejects / hour_parts if hour_parts else None},
                "chart": self._chart(now),
                "cameras": cameras, "health": health,
                "latency_ms": {"p50": latency.get("p50"), "p99": latency.get("p99"), "n": latency.get("n")},
                "runtime": {k: stats.get(k) for k in ("state", "fps", "frames", "rejects", "uptime_s")}
                if stats else None,
                "model_id": control.get("model_id") or self.model_id,
                "threshold": control.get("threshold", self.threshold),
                "paused": self.paused,
                "quiet": quiet_s is None or quiet_s > self.quiet_after_s,
                "quiet_s": None if quiet_s is None else round(quiet_s, 1),
                "missed": dict(self.missed), "restarts": self.restarts, "run_id": self.run_id,
                "bus_error": self.bus_error,
                "control": {"status": self.control is not None, "error": self.control_error},
                "events": list(self.events)[:10],
            }

    def _chart(self, now: float) -> dict[str, Any]:
        """Reject rate over the last hour (or since the view started, if sooner), in CHART_POINTS
        buckets: [[bucket start, parts, rejects], ...]."""
        start = max(now - HOUR_S, self.started)
        width = max(1.0, (now - start) / CHART_POINTS)
        n = max(1, min(CHART_POINTS, math.ceil((now - start) / width)))
        buckets = [[start + i * width, 0, 0] for i in range(n)]
        for second, parts, rejects in self._seconds:
            i = int((second - start) // width)
            if 0 <= i < n:
                buckets[i][1] += parts
                buckets[i][2] += rejects
            elif i >= n:  # the current second, partly past the last bucket's start
                buckets[-1][1] += parts
                buckets[-1][2] += rejects
        return {"width_s": width, "buckets": buckets}
