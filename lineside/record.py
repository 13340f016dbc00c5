"""``linegate record``: every decision and event on record, reject images archived, no silent hole.

The recorder subscribes to ``decision`` and ``event`` on one socket (deep queue: rows are
small) and to ``overlay`` and ``frame`` on another (short queue: images can be megabytes);
writes rows in batches (one transaction per ~0.25 s) to the record (lineside.store) and
images to the image store (lineside.imagestore).

Holes: the seq of each topic counts up per runtime start (``run_id``). On start, and whenever
a seq jumps, the recorder asks the runtime's control endpoint (``--control``) to replay the
missing range; what the runtime no longer holds, or cannot be asked for, becomes a gap row
(run, topic, first and last seq, when noticed, why). Rows are unique by (run_id, seq), so a
replay that overlaps what arrived live stores nothing twice.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sqlite3
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any

import msgpack

from edge.auth import CurveClient
from edge.subscriber import Subscriber

from .imagestore import ImageStore, image_path
from .store import Store, StoreUnavailable, is_postgres, open_store

log = logging.getLogger("linegate.record")

TOPICS = ("decision", "overlay", "frame", "event")
ROW_TOPICS, IMAGE_TOPICS = ("decision", "event"), ("overlay", "frame")
ROW_QUEUE, IMAGE_QUEUE = 100_000, 1000  # messages each socket may hold while the recorder is busy
EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2  # 1: systemd restarts it; 2: fix the configuration


class Recorder:
    """Subscribes to a runtime and records what it publishes. Use from one thread."""

    def __init__(self, store: Store, endpoint: str, line: str | None = None, images: ImageStore | None = None,
                 control: str | None = None, server_key: str | None = None, client_key: str | None = None,
                 flush_s: float = 0.25, flush_rows: int = 2000, replay_page: int = 1000,
                 control_timeout_s: float = 5.0) -> None:
        if (server_key is None) != (client_key is None):
            raise ValueError("CURVE needs both --server-key (the runtime's public key) and --client-key "
                             "(this recorder's .key_secret, allowed by the runtime)")
        self.store, self.endpoint, self.images = store, endpoint, images
        self.line = line or endpoint
        self.control, self.server_key, self.client_key = control, server_key, client_key
        self.curve = CurveClient.load(server_key, client_key) if server_key is not None else None
        self.flush_s, self.flush_rows, self.replay_page = flush_s, flush_rows, replay_page
        self.control_timeout_s = control_timeout_s
        self._last: dict[tuple[str, str], int] = {}  # (run_id, topic) -> highest seq seen or on record
        self._decisions: list[tuple[dict, bool]] = []
        self._events: list[dict] = []
        self._image_rows: list[dict] = []
        self._gaps: list[dict] = []
        self._runs: dict[str, str] = {}
        self._known_runs: set[str] = set()
        self._to_replay: list[tuple[str, str, int, int]] = []
        self._skipped_images: list[tuple[str, str, int]] = []
        # Runtimes before run_id/decision_seq: link overlays to decisions by what both carry.
        self._recent: OrderedDict[tuple, int] = OrderedDict()
        self._anon_runs: list[str] = []
        self._anon_topic: dict[str, int] = {}
        self._warned_no_images = False
        self.counts = dict.fromkeys(("decisions", "replayed", "events", "images", "gap_rows", "gap_seqs",
                                     "unreadable"), 0)

    # -- the loop -------------------------------------------------------------------------------

    def run(self, stop: threading.Event, ready: threading.Event | None = None) -> None:
        self.store.set_line(self.line, str(self.images.root.resolve()) if self.images else None, self.endpoint)
        if self.images is not None:
            self.images.load_usage(self.store)
        # Two sockets: rows are small, so decisions and events may queue deep while the database
        # is slow; images may be megabytes, so few of them queue (bounded memory) and what
        # overflows is replayed or written down as a gap, like any other miss.
        with Subscriber(self.endpoint, ROW_TOPICS, rcvhwm=ROW_QUEUE, curve=self.curve) as rows, \
                Subscriber(self.endpoint, IMAGE_TOPICS, rcvhwm=IMAGE_QUEUE, curve=self.curve) as images:
            log.info("recording %s (line %r) into %s%s", self.endpoint, self.line, self.store.target,
                     f", images in {self.images.root}" if self.images else ", no image store")
            self._start_check()
            if ready is not None:
                ready.set()
            next_flush, next_report = time.monotonic(), time.monotonic() + 60.0
            while not stop.is_set():
                for sub in (rows, images):
                    try:
                        msg = sub.recv(25)
                    except ValueError as exc:  # not linegate's, or a newer schema: say so, keep recording
                        log.error("message skipped: %s", exc)
                        self.counts["unreadable"] += 1
                        continue
                    if msg is not None:
                        self.on_message(msg.topic, msg.header, msg.payload)
                now = time.monotonic()
                if now >= next_flush or self._pending() >= self.flush_rows:
                    self.flush()
                    next_flush = now + self.flush_s
                if now >= next_report:  # a line a minute: the journal shows it is alive and counting
                    self.report()
                    next_report = now + 60.0
            self._drain((rows, images))
            self.flush()
        self.report()

    def _drain(self, subs: tuple[Subscriber, ...], limit_s: float = 2.0) -> None:
        """At a stop, take what the sockets already hold (briefly): less to replay next start."""
        deadline = time.monotonic() + limit_s
        busy = True
        while busy and time.monotonic() < deadline:
            busy = False
            for sub in subs:
                try:
                    msg = sub.recv(0)
                except ValueError:
                    continue
                if msg is not None:
                    busy = True
                    self.on_message(msg.topic, msg.header, msg.payload)

    def report(self) -> None:
        c = self.counts
        skipped = self.images.skipped_total if self.images else 0
        log.info("recorded %d decisions (%d by replay), %d events, %d images; %d gap row(s) covering %d seq(s); "
                 "%d image(s) not stored%s", c["decisions"], c["replayed"], c["events"], c["images"], c["gap_rows"],
                 c["gap_seqs"], skipped, f"; {c['unreadable']} unreadable message(s) skipped" if c["unreadable"] else "")

    def _pending(self) -> int:
        return len(self._decisions) + len(self._events) + len(self._image_rows)

    # -- messages -------------------------------------------------------------------------------

    def _run_of(self, topic: str, header: dict[str, Any]) -> str:
        run_id = header.get("run_id")
        if isinstance(run_id, str) and run_id:
            return run_id
        # A runtime without run_id (before the control endpoint): a seq that does not grow
        # means it restarted. Topics move to the newest run one by one.
        seq, index = header.get("seq"), self._anon_topic.get(topic)
        last = self._last.get((self._anon_runs[index], topic)) if index is not None else None
        if index is None or (isinstance(seq, int) and last is not None and seq <= last):
            if index is None and self._anon_runs:
                index = len(self._anon_runs) - 1
            elif index is not None and index < len(self._anon_runs) - 1:
                index += 1
            else:
                self._anon_runs.append("anon-" + uuid.uuid4().hex)
                index = len(self._anon_runs) - 1
                log.warning("%s publishes without run_id (an older runtime): recording as run %s; seqs missed "
                            "before this point cannot be asked for", self.endpoint, self._anon_runs[index])
            self._anon_topic[topic] = index
            self._last.setdefault((self._anon_runs[index], topic), seq - 1 if isinstance(seq, int) else -1)
        return self._anon_runs[index]

    def on_message(self, topic: str, header: dict[str, Any], payload: bytes | None, replayed: bool = False) -> None:
        if topic not in TOPICS:
            return
        seq = header.get("seq")
        if not isinstance(seq, int):
            log.warning("%s message without a seq ignored: %s", topic, header)
            return
        run_id = self._run_of(topic, header)
        header = {**header, "run_id": run_id}
        if run_id not in self._known_runs:
            self._known_runs.add(run_id)
            self._runs[run_id] = self.line
        if not replayed:
            self._track(run_id, topic, seq)
        if topic == "decision":
            self._decisions.append((header, replayed))
            self._recent[(run_id, header.get("camera_id"), header.get("frame_id"), header.get("capture_ts"))] = seq
            if len(self._recent) > 10_000:
                self._recent.popitem(last=False)
        elif topic == "event":
            self._events.append(header)
        else:
            self._image(topic, run_id, seq, header, payload)

    def _track(self, run_id: str, topic: str, seq: int) -> None:
        key = (run_id, topic)
        if key not in self._last:
            stored = self.store.max_seq(run_id, topic)
            self._last[key] = -1 if stored is None else stored
        last = self._last[key]
        if seq > last + 1:
            self._gap_seen(run_id, topic, last + 1, seq - 1)
        if seq > last:
            self._last[key] = seq

    def _image(self, topic: str, run_id: str, seq: int, header: dict[str, Any], payload: bytes | None) -> None:
        if payload is None:
            return
        if self.images is None:
            if not self._warned_no_images:
                log.warning("%s messages arrive but there is no image store (--images DIR): reject images are "
                            "not kept", topic)
                self._warned_no_images = True
            return
        decision_seq = header.get("decision_seq")
        if not isinstance(decision_seq, int):
            decision_seq = self._recent.get((run_id, header.get("camera_id"), header.get("frame_id"),
                                             header.get("capture_ts")))
        rel = image_path(header, topic, run_id, decision_seq)
        if self.images.write(rel, payload):
            self._image_rows.append({"run_id": run_id, "topic": topic, "seq": seq, "decision_seq": decision_seq,
                                     "camera_id": header.get("camera_id"), "capture_ts": header.get("capture_ts"),
                                     "path": rel, "bytes": len(payload)})
        else:
            self._skipped_images.append((run_id, topic, seq))

    # -- gaps and replay ------------------------------------------------------------------------

    def _gap_seen(self, run_id: str, topic: str, first: int, last: int) -> None:
        log.info("%s seqs %d..%d of run %s missed%s", topic, first, last, run_id[:8],
                 "; asking the runtime for a replay" if self.control and not run_id.startswith("anon-") else "")
        if self.control and not run_id.startswith("anon-"):
            self._to_replay.append((run_id, topic, first, last))
        else:
            why = ("no --control endpoint to ask for a replay" if not self.control
                   else "the runtime publishes no run_id, so it cannot be asked for a replay")
            self._gap_row(run_id, topic, first, last, why)

    def _gap_row(self, run_id: str, topic: str, first: int, last: int | None, reason: str) -> None:
        self._gaps.append({"run_id": run_id, "topic": topic, "first_seq": first, "last_seq": last,
                           "noticed_ts": time.time(), "reason": reason})
        self.counts["gap_rows"] += 1
        self.counts["gap_seqs"] += (last - first + 1) if last is not None else 0
        log.warning("GAP on record: %s seqs %d..%s of run %s are not recorded: %s", topic, first,
                    "?" if last is None else last, run_id[:8], reason)

    def _client(self) -> Any:
        from edge.control_api import ControlClient  # the control contract (the runtime side)

        return ControlClient(self.control, server_key=self.server_key, client_key=self.client_key,
                             timeout_s=self.control_timeout_s)

    def _start_check(self) -> None:
        """Ask the runtime where each topic stands; replay what the record lacks of this run."""
        if not self.control:
            return
        try:
            client = self._client()
            try:
                status = client.status()
            finally:
                client.close()
        except Exception as exc:  # noqa: BLE001 - no control reachable: live recording still works
            log.warning("cannot ask %s for its status (%s: %s); recording live only, gaps are replayed "
                        "once it answers", self.control, type(exc).__name__, exc)
            return
        run_id, seqs = status.get("run_id"), status.get("seq") or {}
        if not run_id:
            return
        previous = self.store.latest_run(self.line)
        if previous and previous != run_id:
            for topic in ("decision", "event"):
                last = self.store.max_seq(previous, topic)
                if last is not None:
                    self._gap_row(previous, topic, last + 1, None,
                                  f"unknown: the runtime restarted (now run {run_id[:8]}) while this recorder was "
                                  f"away; anything run {previous[:8]} published after seq {last} was not recorded")
        self._known_runs.add(run_id)
        self._runs[run_id] = self.line
        for topic in TOPICS:
            newest = seqs.get(topic)
            if not isinstance(newest, int) or newest < 0:
                continue
            stored = self.store.max_seq(run_id, topic)
            first = 0 if stored is None else stored + 1
            self._last[(run_id, topic)] = max(newest, -1 if stored is None else stored)
            if first <= newest:
                log.info("%s: the record has %s of run %s up to %s, the runtime is at %d: asking for a replay",
                         self.line, topic, run_id[:8], stored, newest)
                self._to_replay.append((run_id, topic, first, newest))
        self.flush()

    def _replay_all(self) -> None:
        todo, self._to_replay = self._to_replay, []
        if not todo:
            return
        try:
            client = self._client()
        except Exception as exc:  # noqa: BLE001 - e.g. a bad key: every range becomes a gap row
            for run_id, topic, first, last in todo:
                self._gap_row(run_id, topic, first, last, f"replay impossible: {exc}")
            return
        try:
            for run_id, topic, first, last in todo:
                self._replay(client, run_id, topic, first, last)
        finally:
            client.close()

    def _replay(self, client: Any, run_id: str, topic: str, first: int, last: int) -> None:
        start = first
        while start <= last:
            try:
                # Images are large: smaller pages keep each reply to a few MB.
                page = self.replay_page if topic in ("decision", "event") else max(1, self.replay_page // 100)
                reply = client.replay(topic, start, last, max=page)
            except Exception as exc:  # noqa: BLE001 - timeout, refused key, runtime gone
                self._gap_row(run_id, topic, start, last, f"replay failed: {type(exc).__name__}: {exc}")
                return
            if reply.get("run_id") != run_id:
                self._gap_row(run_id, topic, start, last, f"the runtime restarted (now run "
                              f"{str(reply.get('run_id'))[:8]}): run {run_id[:8]}'s messages are gone")
                return
            reached = start - 1
            for header, payload in reply.get("messages") or []:
                if isinstance(header, bytes):  # a runtime that hands back the header as packed
                    header = msgpack.unpackb(header, raw=False)
                seq = header.get("seq")
                if isinstance(seq, int) and start <= seq <= last:
                    self.on_message(header.get("topic", topic), header, payload, replayed=True)
                    reached = max(reached, seq)
            for lo, hi in reply.get("missing") or []:
                lo, hi = max(lo, start), min(hi, last)
                if lo <= hi:
                    self._gap_row(run_id, topic, lo, hi, f"no longer held by the runtime (oldest it holds: "
                                  f"{reply.get('oldest_seq')})")
                    reached = max(reached, hi)
            if reached < start:
                self._gap_row(run_id, topic, start, last, "the runtime's replay returned none of these seqs")
                return
            self._commit()  # page by page: a long replay holds one page in memory, not the whole range
            start = reached + 1

    # -- writing --------------------------------------------------------------------------------

    def flush(self) -> None:
        """Commit what arrived; then replay what is missing (committed page by page); then retention."""
        self._commit()
        while self._to_replay:
            self._replay_all()
            self._commit()
        if self.images is not None:
            self.images.enforce(self.store)

    def _commit(self) -> None:
        self._skipped_to_gaps()
        if not (self._pending() or self._gaps or self._runs):
            return
        decisions, events, images = self._decisions, self._events, self._image_rows
        gaps, runs = self._gaps, self._runs
        self._decisions, self._events, self._image_rows, self._gaps, self._runs = [], [], [], [], {}
        self.store.write(decisions, events, images, gaps, runs.items(), line=self.line)
        self.counts["decisions"] += len(decisions)
        self.counts["replayed"] += sum(1 for _, r in decisions if r)
        self.counts["events"] += len(events)
        self.counts["images"] += len(images)

    def _skipped_to_gaps(self) -> None:
        """Images the full store could not take, as gap rows (consecutive seqs merged)."""
        if not self._skipped_images:
            return
        skipped, self._skipped_images = sorted(self._skipped_images), []
        run_id, topic, first = skipped[0]
        last = first
        for item in skipped[1:] + [("", "", -1)]:
            if item[:2] == (run_id, topic) and item[2] == last + 1:
                last = item[2]
                continue
            self._gaps.append({"run_id": run_id, "topic": topic, "first_seq": first, "last_seq": last,
                               "noticed_ts": time.time(), "reason": "image store full: not written"})
            self.counts["gap_rows"] += 1
            self.counts["gap_seqs"] += last - first + 1
            run_id, topic, first = item
            last = first


# -- CLI ------------------------------------------------------------------------------------------

def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, not {text}")
        return value
    return parse


def _not_negative(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("endpoint", metavar="ENDPOINT", help="the runtime's publisher, e.g. tcp://edge-box:5556")
    parser.add_argument("--db", required=True, metavar="PATH|postgresql://...",
                        help="SQLite file (made if missing) or a PostgreSQL URL (schema made and migrated here)")
    parser.add_argument("--images", metavar="DIR",
                        help="image store for reject overlays and frames (default for SQLite: DB_STEM-images "
                             "beside the file; for PostgreSQL: none unless given)")
    parser.add_argument("--keep-days", type=_positive(float), metavar="N",
                        help="delete images older than N days (decision rows stay)")
    parser.add_argument("--max-gb", type=_positive(float), metavar="G",
                        help="keep the image store under G GB (10^9 bytes), deleting the oldest images first")
    parser.add_argument("--min-free-mb", type=_not_negative, default=100.0, metavar="M",
                        help="stop image writes while the image store's file system has less than M MiB free, "
                             "leaving room for the database (default 100)")
    parser.add_argument("--full-retry-s", type=_positive(float), default=5.0, metavar="S",
                        help="while the image store is full, try a write again every S seconds (default 5)")
    parser.add_argument("--control", metavar="ENDPOINT",
                        help="the runtime's control endpoint: missed seqs are replayed from it (without it, "
                             "every miss is a gap row)")
    parser.add_argument("--line", metavar="NAME", help="this line's name in the record (default: ENDPOINT)")
    parser.add_argument("--server-key", metavar="FILE|KEY", help="CURVE: the runtime's public key")
    parser.add_argument("--client-key", metavar="FILE",
                        help="CURVE: this recorder's .key_secret (allowed on the bus; for replays, on the "
                             "control endpoint too)")


def _pg_errors() -> tuple[type[BaseException], ...]:
    try:
        import psycopg
    except ModuleNotFoundError:
        return ()
    return (psycopg.OperationalError,)


def default_images(db: str) -> Path | None:
    if is_postgres(db):
        return None
    path = Path(db)
    return path.with_name(path.stem + "-images")


def main(args: argparse.Namespace) -> int:
    images_dir = Path(args.images) if args.images else default_images(args.db)
    try:
        store = open_store(args.db, create=True)
    except StoreUnavailable as exc:
        log.error("%s; exiting for a restart (what the runtime publishes meanwhile is replayed then)", exc)
        return EXIT_FAILED
    try:
        line = args.line or args.endpoint
        images = None
        if images_dir is not None:
            try:
                images = ImageStore(images_dir, line, max_bytes=int(args.max_gb * 1e9) if args.max_gb else None,
                                    keep_days=args.keep_days, min_free_bytes=int(args.min_free_mb * 2**20),
                                    retry_s=args.full_retry_s)
            except OSError as exc:
                raise ValueError(f"image store {images_dir}: {exc.strerror or exc}; give --images a folder this "
                                 "user may write") from None
        elif args.max_gb or args.keep_days:
            raise ValueError("--max-gb and --keep-days apply to the image store: give --images DIR")
        recorder = Recorder(store, args.endpoint, line=line, images=images, control=args.control,
                            server_key=args.server_key, client_key=args.client_key)
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        try:
            recorder.run(stop)
        except (OSError, sqlite3.Error, *_pg_errors()) as exc:
            # The database went away or its disk is full: rows cannot be kept. Exit for a
            # restart; on start the recorder asks the runtime for what it missed.
            log.error("the record %s cannot be written (%s: %s); exiting for a restart", args.db,
                      type(exc).__name__, exc)
            return EXIT_FAILED
    finally:
        store.close()
    return EXIT_OK
