"""`linegate watch ENDPOINT`: print the runtime's decisions (or JSON lines), save overlays, and
say what was lost (seq gaps) and when the publisher restarted. A bus client: it imports from
edge/ only the message contract (edge.subscriber, edge.auth)."""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from edge.auth import CurveClient
from edge.subscriber import Message, Subscriber

# With nothing at all received this long, watch says what usually causes it (once).
SILENCE_HINT_S = 10.0
RESTARTS = "\0restarts"  # key of the restart count among the per-topic counts reported so far

# Once --count decisions are printed, how long watch waits for their overlays
# (the pipeline may publish a frame's overlay after its decision, or after the batch).
OVERLAY_GRACE_S = 0.5


def _clock(ts: Any) -> str:
    if not isinstance(ts, (int, float)):
        return "--:--:--.---"
    return time.strftime("%H:%M:%S", time.localtime(ts)) + f".{int(ts % 1 * 1000):03d}"


def _number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"


def format_decision(header: dict[str, Any]) -> str:
    """One human line: ``12:00:01.234 cam0 #17 chip0003.jpg REJECT score=1.2345 thr=1.1000``.

    The time is the capture time (local clock); the source only appears when known.
    """
    parts = [_clock(header.get("capture_ts", header.get("publish_ts"))),
             str(header.get("camera_id", "?")), f"#{header.get('frame_id', '?')}"]
    if header.get("source"):
        parts.append(str(header["source"]))
    parts += [str(header.get("decision", "?")).upper(),
              f"score={_number(header.get('score'))}", f"thr={_number(header.get('threshold'))}"]
    if header.get("error"):  # why an `error` decision could not judge the frame
        parts.append(f"error: {header['error']}")
    return " ".join(parts)


def _overlay_name(header: dict[str, Any]) -> str:
    """CAMERA_CAPTURETIME_FRAMEID_DECISION.jpg. Frame ids start again at 0 whenever linegate
    restarts, so the capture time (UTC, ms) keeps a long-running logger from overwriting the
    evidence of earlier runs, and makes a folder listing chronological per camera."""
    ts = header.get("capture_ts")
    when = "unknown-time"
    if isinstance(ts, (int, float)) and math.isfinite(ts):
        when = time.strftime("%Y%m%dT%H%M%S", time.gmtime(ts)) + f".{int(ts * 1000) % 1000:03d}Z"
    name = f"{header.get('camera_id', 'cam')}_{when}_{header.get('frame_id', 'x')}_{header.get('decision', 'x')}.jpg"
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)  # camera ids may hold "/" or ":"


def json_line(header: dict[str, Any]) -> str:
    """A header as strict JSON: an `error` decision's NaN score becomes null (bare NaN, which
    Python's json writes by default, is rejected by most other parsers)."""
    safe = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in header.items()}
    return json.dumps(safe, default=str, allow_nan=False)


def _report_gaps(sub: Subscriber, reported: dict[str, int], msg: Message) -> None:
    if sub.restarts > reported.get(RESTARTS, 0):
        how = f"new run_id {sub.run_id}" if sub.run_id else f"{msg.topic} seq back to {msg.header.get('seq')}"
        print(f"linegate watch: publisher restarted ({how}); not a loss", file=sys.stderr, flush=True)
        reported[RESTARTS] = sub.restarts
    for topic, missed in sub.gaps.items():
        if missed > reported.get(topic, 0):
            print(f"linegate watch: missed {missed - reported.get(topic, 0)} {topic} message(s) "
                  f"before seq {msg.header.get('seq')}", file=sys.stderr, flush=True)
            reported[topic] = missed


def watch(endpoint: str, json_lines: bool = False, count: int | None = None,
          save_overlays: str | None = None, timeout_s: float | None = None,
          out: TextIO = sys.stdout, server_key: str | None = None, client_key: str | None = None) -> int:
    """Print decisions from a publisher until ``count`` were seen, ``timeout_s`` passed or Ctrl-C.

    ``server_key`` (the publisher's public .key file or Z85 text) and ``client_key`` (this
    subscriber's .key_secret) switch CURVE on; both or neither. Seq gaps are reported on
    stderr as they are found, and once more in total at the end.
    Returns the exit code: 1 if the timeout ended the watch before ``count`` decisions, else 0.
    Raises ValueError for a bad endpoint or key, or a publisher that needs a newer linegate.
    """
    if (server_key is None) != (client_key is None):
        raise ValueError("CURVE needs both --server-key (the publisher's public key) and --client-key "
                         "(this subscriber's .key_secret, allowed by the publisher)")
    curve = CurveClient.load(server_key, client_key) if server_key is not None else None
    overlay_dir = Path(save_overlays) if save_overlays else None
    if overlay_dir is not None:
        overlay_dir.mkdir(parents=True, exist_ok=True)
    # stats too (not printed): once a second they show the link works while no part passes
    topics = ("decision", "overlay", "stats") if overlay_dir is not None else ("decision", "stats")
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    with Subscriber(endpoint, topics, curve=curve) as sub:
        try:
            return _watch_loop(sub, json_lines, count, overlay_dir, deadline, out)
        except KeyboardInterrupt:
            return 0
        finally:
            if sub.restarts:
                print(f"linegate watch: the publisher restarted {sub.restarts} time(s) (counted apart from "
                      "missed messages)", file=sys.stderr, flush=True)
            missed = sum(sub.gaps.values())
            if missed:
                print(f"linegate watch: {missed} message(s) missed in total (seq gaps: "
                      f"{', '.join(f'{t} {n}' for t, n in sub.gaps.items() if n)})", file=sys.stderr, flush=True)


def _watch_loop(sub: Subscriber, json_lines: bool, count: int | None, overlay_dir: Path | None,
                deadline: float | None, out: TextIO) -> int:
    seen = 0
    started, anything, hinted = time.monotonic(), False, False
    reported_gaps: dict[str, int] = {}
    last_frame_id: dict[Any, Any] = {}  # camera_id -> frame_id of its last printed decision
    last_decided = last_saved = None  # (camera_id, frame_id)
    while True:
        done = count is not None and seen >= count
        if done and (overlay_dir is None or last_saved == last_decided):
            return 0
        # Wake up at least every 0.2 s so Ctrl-C is handled promptly everywhere.
        wait_ms = 200 if deadline is None else min(200, max(0, int((deadline - time.monotonic()) * 1000)))
        msg = sub.recv(wait_ms)
        if msg is None:
            now = time.monotonic()
            ended = deadline is not None and now >= deadline
            if not anything and not hinted and (ended or now - started >= SILENCE_HINT_S):
                # A CURVE key the publisher does not allow (or none against a CURVE publisher)
                # looks exactly like silence from this side: ZeroMQ tells the client nothing.
                hinted = True
                print(f"linegate watch: no message in {now - started:.0f} s from {sub.endpoint}: wrong key or "
                      "wrong endpoint? (or the runtime is not running; its log names refused keys)",
                      file=sys.stderr, flush=True)
            if ended:
                return 0 if done or count is None else 1
            continue
        anything = True
        _report_gaps(sub, reported_gaps, msg)
        camera, frame_id = msg.header.get("camera_id"), msg.header.get("frame_id")
        if msg.topic == "decision" and not done:
            seen += 1
            last_decided, last_frame_id[camera] = (camera, frame_id), frame_id
            print(json_line(msg.header) if json_lines else format_decision(msg.header),
                  file=out, flush=True)
            if overlay_dir is not None and count is not None and seen >= count:
                # Overlays of the frames just printed may still be on their way
                # (the pipeline can publish them after the decisions): wait a little.
                grace = time.monotonic() + OVERLAY_GRACE_S
                deadline = grace if deadline is None else min(deadline, grace)
        elif msg.topic == "overlay" and overlay_dir is not None and msg.payload is not None:
            if done and not _not_after(frame_id, last_frame_id.get(camera)):
                continue  # a frame after the last printed decision
            (overlay_dir / _overlay_name(msg.header)).write_bytes(msg.payload)
            last_saved = (camera, frame_id)


def _not_after(frame_id: Any, last: Any) -> bool:
    """frame_id <= last for integer ids (frame ids grow per camera), else equality."""
    if isinstance(frame_id, int) and isinstance(last, int):
        return frame_id <= last
    return frame_id == last


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text}")
    return value


def add_watch_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``linegate watch``; their dests are watch()'s parameter names."""
    parser.add_argument("endpoint", metavar="ENDPOINT",
                        help="publisher endpoint, e.g. tcp://edge-box:5556")
    parser.add_argument("--json", dest="json_lines", action="store_true",
                        help="print each decision header as one JSON object per line")
    parser.add_argument("--count", type=_positive_int, metavar="N",
                        help="stop after N decisions")
    parser.add_argument("--save-overlays", dest="save_overlays", metavar="DIR",
                        help="also save overlay JPEGs as DIR/<camera>_<frame>_<decision>.jpg")
    parser.add_argument("--timeout", dest="timeout_s", type=_positive_float, metavar="S",
                        help="stop after S seconds (exit code 1 if --count was not reached)")
    parser.add_argument("--server-key", dest="server_key", metavar="FILE|KEY",
                        help="CURVE: the publisher's public key (its .key file or the 40-character text)")
    parser.add_argument("--client-key", dest="client_key", metavar="FILE",
                        help="CURVE: this subscriber's .key_secret (made by `linegate keys`; its .key "
                             "must be in the publisher's allow-list)")
