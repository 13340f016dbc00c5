"""A small client for linegate's ZeroMQ messages (``linegate watch`` is lineside/watch.py).

See edge.publisher for the wire format. A Subscriber checks the schema version and counts
messages it missed (seq gaps), so a client can tell "nothing happened" from "I lost data".
Against a CURVE publisher, give it an edge.auth.CurveClient (``linegate watch --server-key
FILE --client-key FILE``); a key the publisher does not allow receives nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import msgpack
import zmq

from edge.auth import CurveClient
from edge.publisher import SCHEMA_VERSION



@dataclass
class Message:
    topic: str
    header: dict[str, Any]
    payload: bytes | None


class Subscriber:
    """A SUB socket connected to a linegate publisher. Use from one thread only."""

    def __init__(self, endpoint: str, topics: Iterable[str] = ("decision",), rcvhwm: int = 10000,
                 context: zmq.Context | None = None, curve: CurveClient | None = None) -> None:
        self.endpoint = endpoint
        self.topics = tuple(topics)
        sock = (context or zmq.Context.instance()).socket(zmq.SUB)
        sock.setsockopt(zmq.RCVHWM, rcvhwm)  # before connect: it applies to new connections
        sock.setsockopt(zmq.LINGER, 0)  # a SUB has nothing worth waiting for on close
        if curve is not None:
            curve.apply(sock)
        try:
            sock.connect(endpoint)
        except zmq.ZMQError as exc:
            sock.close()
            raise ValueError(f"cannot connect to {endpoint!r}: {exc.strerror}; "
                             "use the publisher's endpoint, e.g. tcp://edge-box:5556") from exc
        for topic in self.topics:
            sock.setsockopt(zmq.SUBSCRIBE, topic.encode("ascii"))
        self._sock: zmq.Socket | None = sock
        self.gaps: dict[str, int] = dict.fromkeys(self.topics, 0)
        self.restarts = 0  # times the publisher was seen to start again (not losses)
        self.run_id: str | None = None  # the publisher run's id, where its headers carry one
        self._last_seq: dict[str, int] = {}

    def recv(self, timeout_ms: int | None = None) -> Message | None:
        """The next message, or None after ``timeout_ms`` (None: wait for ever).

        Raises ValueError for a message that is not linegate's or needs a newer linegate.
        """
        sock = self._sock
        if sock is None:
            raise RuntimeError("subscriber is closed")
        if timeout_ms is not None and not sock.poll(timeout_ms, zmq.POLLIN):
            return None
        frames = sock.recv_multipart()
        if len(frames) not in (2, 3):
            raise ValueError(f"{self.endpoint}: message with {len(frames)} frames is not from linegate")
        topic = frames[0].decode("ascii", errors="replace")
        try:
            header = msgpack.unpackb(frames[1], raw=False)
        except Exception as exc:  # msgpack raises several types for corrupt data
            raise ValueError(f"{self.endpoint}: undecodable {topic} header ({exc})") from exc
        if not isinstance(header, dict) or not isinstance(header.get("v"), int):
            raise ValueError(f"{self.endpoint}: {topic} message without a schema version; not linegate")
        if header["v"] > SCHEMA_VERSION:
            raise ValueError(f"{self.endpoint} sends schema v{header['v']} but this linegate reads "
                             f"v{SCHEMA_VERSION}; upgrade linegate on this machine")
        self._count_gap(topic, header.get("seq"), header.get("run_id"))
        return Message(topic, header, frames[2] if len(frames) == 3 else None)

    def _count_gap(self, topic: str, seq: Any, run_id: Any = None) -> None:
        if not isinstance(seq, int):
            return
        # A new run_id (publishers that send one), or else a seq that does not increase,
        # means the publisher restarted: counted as a restart and a new baseline, not a loss.
        if isinstance(run_id, str):
            if self.run_id is not None and run_id != self.run_id:
                self._restarted()
            self.run_id = run_id
        last = self._last_seq.get(topic)
        # The first message of a topic is the baseline (we may have joined late).
        if last is not None and seq <= last:
            if not isinstance(run_id, str):
                self._restarted()
            last = None
        if last is not None and seq > last + 1:
            self.gaps[topic] = self.gaps.get(topic, 0) + seq - last - 1
        self._last_seq[topic] = seq

    def _restarted(self) -> None:
        self.restarts += 1
        self._last_seq.clear()  # every topic starts again from 0

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
