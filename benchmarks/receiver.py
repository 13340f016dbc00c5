"""The benchmark's subscriber: a separate process, as a real consumer of linegate is.

It stays connected to one endpoint for the whole bench (each pipeline run binds a fresh
publisher there; ZeroMQ reconnects and re-subscribes by itself) and, when asked, collects the
messages of one run, recognised by the publisher's run_id tag. Per decision it keeps the
capture, publish and receipt times and the batch it was inferred in; it counts overlays
and keeps the stats messages.
Imports only the runtime's subscriber client, so it starts fast.

    python -m benchmarks.receiver ENDPOINT FD   (FD: one end of a socketpair, see bench.py)
"""
from __future__ import annotations

import sys
import time
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

GRACE_S = 0.5  # after the last expected decision: wait this long for its overlays


def serve(endpoint: str, conn: Connection) -> None:
    """Child process body. Requests on `conn`: ("collect", tag, expected, timeout_s) -> a
    result dict; ("stop",) -> exit."""
    from edge.subscriber import Subscriber

    with Subscriber(endpoint, ("decision", "overlay", "stats"), rcvhwm=100000) as sub:
        conn.send("ready")
        while True:
            if not conn.poll(0.05):
                sub.recv(0)  # keep the socket drained between runs (nothing should come)
                continue
            request = conn.recv()
            if request[0] == "stop":
                return
            _, tag, expected, timeout_s = request
            conn.send(_collect(sub, tag, expected, timeout_s))


def _collect(sub: Any, tag: str, expected: int, timeout_s: float) -> dict:
    capture, publish, receipt, batch = [], [], [], []
    overlays = overlay_bytes = rejects = 0
    gaps0 = sum(sub.gaps.values())
    stats: list[dict] = []
    deadline = time.monotonic() + timeout_s
    done_at = None
    while True:
        now = time.monotonic()
        if now >= deadline or (done_at is not None and now >= done_at):
            break
        msg = sub.recv(50)
        if msg is None or msg.header.get("run_id") != tag:
            continue
        received = time.time()
        if msg.topic == "decision":
            capture.append(msg.header["capture_ts"])
            publish.append(msg.header["publish_ts"])
            receipt.append(received)
            batch.append(msg.header.get("batch", -1))
            rejects += msg.header.get("decision") == "reject"
            if len(receipt) >= expected and done_at is None:
                done_at = time.monotonic() + GRACE_S
        elif msg.topic == "overlay":
            overlays += 1
            overlay_bytes += len(msg.payload or b"")
        elif msg.topic == "stats":
            stats.append(msg.header)
    return {"capture_ts": np.asarray(capture), "publish_ts": np.asarray(publish),
            "receipt_ts": np.asarray(receipt), "batch": np.asarray(batch, np.int64),
            "overlays": overlays, "overlay_bytes": overlay_bytes,
            "rejects": rejects, "gaps": sum(sub.gaps.values()) - gaps0, "stats": stats,
            "timed_out": len(receipt) < expected}


if __name__ == "__main__":
    serve(sys.argv[1], Connection(int(sys.argv[2])))
