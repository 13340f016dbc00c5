"""The view's two links to the runtime, each in a thread of its own: the bus (a Subscriber on
decision, overlay, stats and event) and, when given, the control endpoint's status, polled.

The bus thread does nothing but hand each message to LiveState (O(1) work), so it drains the
socket at the runtime's full rate; if it ever fell behind, ZeroMQ would drop messages for this
subscriber alone (the publisher never waits for it) and the seq gaps show on the page.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Callable

from edge.auth import CurveClient
from edge.subscriber import Subscriber

from .state import LiveState

log = logging.getLogger(__name__)
TOPICS = ("decision", "overlay", "stats", "event")


class BusFollower(threading.Thread):
    def __init__(self, endpoint: str, state: LiveState, curve: CurveClient | None = None,
                 topics: tuple[str, ...] = TOPICS) -> None:
        super().__init__(name="view-bus", daemon=True)
        self.endpoint, self.state, self.curve, self.topics = endpoint, state, curve, topics
        self._stop_event = threading.Event()
        # Connect here, not in run(): a bad endpoint is an error at start, not a silent thread.
        self.sub = Subscriber(endpoint, topics, rcvhwm=100000, curve=curve)

    def run(self) -> None:
        sub, state = self.sub, self.state
        try:
            while not self._stop_event.is_set():
                try:
                    msg = sub.recv(timeout_ms=200)
                except ValueError as exc:  # not linegate's, or a newer schema: say so, keep going
                    state.set_bus_error(str(exc))
                    log.warning("%s", exc)
                    continue
                if msg is None:
                    continue
                state.on_message(msg.topic, msg.header, msg.payload)
                if msg.topic == "stats":  # once a second is often enough to copy the gaps
                    state.set_missed(sub.gaps)
        finally:
            state.set_missed(sub.gaps)
            sub.close()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)


class ControlPoller(threading.Thread):
    """Asks the control endpoint for its status every `every_s` seconds (the paused flag,
    thresholds and model in force, even while no decision flows)."""

    def __init__(self, call: Callable[..., dict[str, Any]], state: LiveState, every_s: float = 1.0) -> None:
        super().__init__(name="view-control", daemon=True)
        self.call, self.state, self.every_s = call, state, every_s
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                self.state.set_control(self.call("status", {}, None), None)
            except Exception as exc:  # noqa: BLE001 - shown on the page; the poller keeps trying
                self.state.set_control(None, f"{type(exc).__name__}: {exc}")
            self._stop_event.wait(self.every_s)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=10)
