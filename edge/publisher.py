"""Publishing decisions, overlays, stats, events and reject frames over ZeroMQ.

Wire format, one multipart message per event: ``[topic, header, payload?]``

* ``topic``: ASCII bytes, one of ``TOPICS`` (subscribers filter on this frame).
* ``header``: a msgpack map. The publisher always sets ``v`` (SCHEMA_VERSION), ``topic``,
  ``seq`` (per-topic counter from 0), ``publish_ts`` (time.time()), ``model_id`` and
  ``run_id`` (random hex per publisher: a subscriber that sees a new one knows the runtime
  restarted and seq began again; a decision's dedupe key is (run_id, seq)); the caller
  supplies everything else (camera_id, frame_id, score, decision, ...). Overlay and frame
  headers carry ``decision_seq``, the seq of their decision.
* ``payload``: optional raw bytes, e.g. the JPEG of an ``overlay``.

``seq`` is assigned before the send attempt, so every message the publisher gives up on
leaves a gap that subscribers can count (see edge.subscriber.Subscriber.gaps).

With ``curve`` (edge.auth.CurveServer) the socket is a CURVE server on a context of its
own, with pyzmq's ZAP authenticator admitting only the allow-listed subscriber keys.
"""
from __future__ import annotations

import threading
import time
import uuid
from typing import Any, Callable

import msgpack
import zmq

from .auth import CurveServer

SCHEMA_VERSION = 1
TOPICS = ("decision", "overlay", "stats", "event", "frame")
# Keys the publisher owns; a caller's header cannot override them.
RESERVED_KEYS = ("v", "topic", "seq", "publish_ts", "model_id", "run_id")


class EndpointInUse(RuntimeError):
    """The endpoint is taken by another process: a state of the box, which may pass (the
    instance before this one still closing), not an error in the configuration."""


def _msgpack_default(obj: Any) -> Any:
    """Let numpy scalars and arrays (np.float32 scores, ...) through without importing numpy."""
    if hasattr(obj, "tolist"):  # numpy scalars and arrays: .tolist() gives Python types
        return obj.tolist()
    raise TypeError(f"cannot put {type(obj).__name__} into a message header")


def pack_header(header: dict[str, Any]) -> bytes:
    return msgpack.packb(header, use_bin_type=True, default=_msgpack_default)


class Publisher:
    """An XPUB socket that publishes linegate messages without ever blocking the pipeline.

    Use one Publisher from ONE thread only: ZeroMQ sockets are not thread safe. Create it,
    use it and close it in the same thread (or hand it over once, e.g. before starting the
    thread that owns it from then on).

    Slow subscribers: by default ZeroMQ drops messages per subscriber whose queue is full
    (the SNDHWM is per connection), silently for the publisher (libzmq reports no per-peer
    drop count); that subscriber alone loses them and counts the loss as seq gaps
    (Subscriber.gaps, reported by ``linegate watch``), the others are unaffected. With
    ``nodrop=True`` (XPUB_NODROP) a full queue makes ZeroMQ refuse the message instead:
    publish() returns False and counts it in ``dropped``, but then the message is lost
    for *every* subscriber of that topic, so one stalled client costs the healthy ones
    messages too. In both modes publish() returns at once.
    """

    def __init__(self, endpoint: str, model_id: str = "", sndhwm: int = 1000,
                 linger_ms: int = 1000, context: zmq.Context | None = None,
                 nodrop: bool = False, curve: CurveServer | None = None, run_id: str | None = None) -> None:
        self.model_id = model_id
        self.run_id = run_id or uuid.uuid4().hex
        # Called with (topic, seq, packed header, payload) for every message given a seq, sent
        # or dropped, from the publishing thread (the control endpoint's replay buffer).
        self.on_publish: Callable[[str, int, bytes, bytes | None], None] | None = None
        # CURVE gets a context of its own: one ZAP authenticator per context, and it must not
        # judge the connections of other sockets in this process.
        self._own_context = curve is not None and context is None
        self._context = zmq.Context() if self._own_context else (context or zmq.Context.instance())
        self._auth = None
        sock = self._context.socket(zmq.XPUB)
        # Options that shape the connections must be set before bind().
        sock.setsockopt(zmq.XPUB_VERBOSER, 1)  # report every (un)subscribe, not only the first/last
        sock.setsockopt(zmq.SNDHWM, sndhwm)
        sock.setsockopt(zmq.LINGER, linger_ms)
        if nodrop:
            sock.setsockopt(zmq.XPUB_NODROP, 1)
        try:
            if curve is not None:
                self._auth = curve.start(self._context, sock)
            sock.bind(endpoint)
        except (zmq.ZMQError, ValueError) as exc:
            sock.close(linger=0)
            self._stop_auth()
            if self._own_context:
                self._context.term()
            if not isinstance(exc, zmq.ZMQError):
                raise
            if exc.errno == zmq.EADDRINUSE:
                raise EndpointInUse(f"cannot publish on {endpoint!r}: {exc.strerror}; another process "
                                    "(perhaps another linegate) uses it; stop it or pick another port") from exc
            raise ValueError(f"cannot publish on {endpoint!r}: {exc.strerror}; use e.g. tcp://*:5556, "
                             "tcp://127.0.0.1:5556 or ipc:///tmp/linegate.sock") from exc
        self._sock: zmq.Socket | None = sock
        # "tcp://127.0.0.1:*" binds a random port; LAST_ENDPOINT is the address to connect to.
        self.endpoint: str = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.sent: dict[str, int] = dict.fromkeys(TOPICS, 0)
        self.dropped: dict[str, int] = dict.fromkeys(TOPICS, 0)
        self.subscribe_events = 0  # subscribe messages seen so far (one per SUB and topic)
        self.subscriptions = 0  # subscriptions open now (subscribes minus unsubscribes)
        self.curve = curve is not None
        self._seq: dict[str, int] = dict.fromkeys(TOPICS, 0)

    def _read_subscriptions(self) -> None:
        """Consume queued (un)subscribe messages without blocking.

        They must be read: an XPUB queues every one of them until someone does.
        """
        sock = self._socket()
        while sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            event = sock.recv(zmq.NOBLOCK)
            if event[:1] == b"\x01":  # first byte 1 = subscribe, 0 = unsubscribe
                self.subscribe_events += 1
                self.subscriptions += 1
            elif event[:1] == b"\x00":  # also sent for a subscriber that went away
                self.subscriptions = max(0, self.subscriptions - 1)

    def wait_for_subscribers(self, n: int, timeout_s: float, stop: threading.Event | None = None) -> int:
        """Wait until ``n`` subscribe events were seen in total, ``timeout_s`` passed or
        ``stop`` was set.

        A SUB sends one subscribe per topic, so a subscriber to "decision" and "overlay"
        counts twice. Events drained by publish() count too. Returns the total seen.
        """
        deadline = time.monotonic() + timeout_s
        sock = self._socket()
        while True:
            self._read_subscriptions()
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if self.subscribe_events >= n or remaining_ms <= 0 or (stop is not None and stop.is_set()):
                return self.subscribe_events
            sock.poll(min(remaining_ms, 200), zmq.POLLIN)  # wake up to notice stop

    def last_seq(self, topic: str) -> int | None:
        """The seq of the last message of ``topic`` (None before the first)."""
        seq = self._seq[topic]
        return seq - 1 if seq else None

    def publish(self, topic: str, header: dict[str, Any], payload: bytes | None = None,
                model_id: str | None = None) -> bool:
        """Send one message; True if ZeroMQ took it, False if it was dropped. Never blocks.

        ``model_id``: the model that made this message (default: the publisher's), so that a
        hot swap's decisions carry the model that judged them.

        Raises ValueError for an unknown topic and TypeError for a header value msgpack
        cannot carry (numpy scalars are fine); neither uses up a seq number.
        """
        if topic not in self._seq:
            raise ValueError(f"unknown topic {topic!r}; expected one of {TOPICS}")
        sock = self._socket()
        self._read_subscriptions()
        seq = self._seq[topic]
        reserved = {"v": SCHEMA_VERSION, "topic": topic, "seq": seq,
                    "publish_ts": time.time(), "model_id": model_id or self.model_id, "run_id": self.run_id}
        # Reserved keys first (readable dumps), caller's keys next, reserved values win.
        packed = pack_header({**reserved, **header, **reserved})
        self._seq[topic] = seq + 1  # only now: a header that cannot be packed is no message
        if self.on_publish is not None:
            self.on_publish(topic, seq, packed, payload)
        frames = [topic.encode("ascii"), packed]
        if payload is not None:
            frames.append(payload)
        try:
            # Only the first frame can be refused: ZeroMQ queues multipart messages whole.
            sock.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.Again:
            self.dropped[topic] += 1
            return False
        self.sent[topic] += 1
        return True

    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            raise RuntimeError("publisher is closed")
        return self._sock

    def _stop_auth(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None

    def close(self, linger_ms: int | None = None) -> None:
        """Close the socket; queued messages get ``linger_ms`` (default: the constructor's) to go out."""
        if self._sock is not None:
            self._sock.close(linger=linger_ms)
            self._sock = None
            # The authenticator only answers handshakes; connected subscribers keep receiving
            # the lingering messages without it. term() waits for the linger to run out.
            self._stop_auth()
            if self._own_context:
                self._context.term()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
