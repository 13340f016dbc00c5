"""Publisher / Subscriber / watch over real ZeroMQ sockets (random tcp ports or ipc in tmp_path)."""
from __future__ import annotations

import argparse
import io
import json
import re
import signal
import threading
import time
from pathlib import Path
from typing import Callable

import cv2
import msgpack
import numpy as np
import pytest
import zmq

from edge.publisher import SCHEMA_VERSION, EndpointInUse, Publisher
from edge.subscriber import Message, Subscriber
from lineside.watch import add_watch_arguments, format_decision, watch

LOCAL = "tcp://127.0.0.1:*"


def decision_header(frame_id: int, decision: str = "accept") -> dict:
    return {"camera_id": "cam0", "frame_id": frame_id, "capture_ts": time.time(), "score": 0.5,
            "score_norm": 0.45, "threshold": 1.1, "decision": decision,
            "source": f"chip{frame_id:04d}.jpg", "label": None, "aggregate": "max"}


def jpeg(width: int = 64, height: int = 48) -> bytes:
    image = np.zeros((height, width, 3), np.uint8)
    image[:, :, 1] = np.arange(width, dtype=np.uint8)[None, :] * 3  # a gradient, not a blank
    ok, data = cv2.imencode(".jpg", image)
    assert ok
    return data.tobytes()


def recv_all(sub: Subscriber, n: int, timeout_ms: int = 2000) -> list[Message]:
    messages = []
    while len(messages) < n and (msg := sub.recv(timeout_ms)) is not None:
        messages.append(msg)
    return messages


class Background(threading.Thread):
    """Runs fn in a thread and re-raises its exception on join_checked()."""

    def __init__(self, fn: Callable[[], object]) -> None:
        super().__init__(daemon=True)
        self.fn, self.error = fn, None

    def run(self) -> None:
        try:
            self.fn()
        except BaseException as exc:  # handed to the test thread
            self.error = exc

    def join_checked(self, timeout: float = 10) -> None:
        self.join(timeout)
        assert not self.is_alive(), "background thread did not finish"
        if self.error is not None:
            raise self.error


def publish_in_thread(pub: Publisher, subscribe_events: int, body: Callable[[Publisher], None]) -> Background:
    """Hand pub to a thread that waits for the subscriptions, runs body and closes it."""
    def run() -> None:
        try:
            assert pub.wait_for_subscribers(subscribe_events, 5) >= subscribe_events
            body(pub)
        finally:
            pub.close()
    thread = Background(run)
    thread.start()
    return thread


def test_headers_and_per_topic_seq():
    with Publisher(LOCAL, model_id="m-123") as pub, \
            Subscriber(pub.endpoint, topics=("decision", "stats")) as sub:
        assert pub.endpoint.startswith("tcp://127.0.0.1:") and not pub.endpoint.endswith("*")
        assert pub.wait_for_subscribers(2, 5) == 2
        t0 = time.time()
        for i in range(5):
            header = decision_header(i, "reject" if i == 3 else "accept")
            header["seq"] = 999  # the publisher owns seq, v, topic...: callers cannot override
            header["score"] = np.float32(0.25 * i)  # numpy scalars straight from the model
            assert pub.publish("decision", header) is True
            if i % 2 == 0:
                assert pub.publish("stats", {"fps": 10.0 + i}) is True
        t1 = time.time()
        messages = recv_all(sub, 8)
        with pytest.raises(ValueError, match="unknown topic"):
            pub.publish("decisions", {})
        assert pub.sent["decision"] == 5  # and nothing was counted for it
    decisions = [m for m in messages if m.topic == "decision"]
    stats = [m for m in messages if m.topic == "stats"]
    assert [m.header["seq"] for m in decisions] == [0, 1, 2, 3, 4]
    assert [m.header["seq"] for m in stats] == [0, 1, 2]
    assert pub.sent == {"decision": 5, "overlay": 0, "stats": 3, "event": 0, "frame": 0}
    assert pub.dropped == {"decision": 0, "overlay": 0, "stats": 0, "event": 0, "frame": 0}
    run_ids = {m.header["run_id"] for m in messages}
    assert run_ids == {pub.run_id} and len(pub.run_id) == 32  # one random hex id per publisher
    for m in messages:
        assert m.header["v"] == SCHEMA_VERSION and m.header["topic"] == m.topic
        assert m.header["model_id"] == "m-123"
        assert t0 <= m.header["publish_ts"] <= t1
        assert m.payload is None
    reject = decisions[3].header
    assert reject["frame_id"] == 3 and reject["decision"] == "reject" and reject["source"] == "chip0003.jpg"
    assert reject["label"] is None and reject["aggregate"] == "max" and reject["camera_id"] == "cam0"
    assert reject["score"] == pytest.approx(0.75) and type(reject["score"]) is float
    assert list(reject)[:5] == ["v", "topic", "seq", "publish_ts", "model_id"]
    assert sub.gaps == {"decision": 0, "stats": 0}


def test_overlay_payload_round_trip(tmp_path: Path):
    data = jpeg()
    with Publisher(f"ipc://{tmp_path}/pub.sock") as pub, Subscriber(pub.endpoint, ("overlay",)) as sub:
        assert pub.wait_for_subscribers(1, 5) == 1
        header = {**decision_header(7), "encoding": "jpeg", "width": 64, "height": 48}
        assert pub.publish("overlay", header, data)
        msg = sub.recv(2000)
    assert msg is not None and msg.topic == "overlay"
    assert msg.payload == data
    assert msg.header["encoding"] == "jpeg" and msg.header["width"] == 64
    image = cv2.imdecode(np.frombuffer(msg.payload, np.uint8), cv2.IMREAD_COLOR)
    assert image.shape == (48, 64, 3)


@pytest.mark.timeout(120)
def test_wait_for_subscribers():
    with Publisher(LOCAL) as pub:
        t0 = time.monotonic()
        assert pub.wait_for_subscribers(1, 0.2) == 0  # nobody there: waits the timeout out
        assert time.monotonic() - t0 >= 0.19
        with Subscriber(pub.endpoint):
            # returns on the subscription: waiting for the timeout would run into pytest-timeout
            assert pub.wait_for_subscribers(1, 3600) == 1


def flood(pub: Publisher, n: int) -> set[bool]:
    """publish() n times; what it returned. A publish() that blocked would hang here for
    good (the stalled subscriber never reads): pytest-timeout, not a clock, catches that."""
    payload = b"x" * 1024  # big enough to fill socket buffers quickly
    return {pub.publish("decision", {"frame_id": i}, payload) for i in range(n)}


def read_until_seq(sub: Subscriber, last_seq: int, seqs: list[int], stop: threading.Event,
                   timeout_s: float = 120.0) -> None:
    """Collect seqs until one >= last_seq arrives, `stop` is set or timeout_s passed.

    Silence is no reason to give up: in nodrop mode the healthy subscriber gets nothing at
    all while the publisher refuses the flood, for as long as the stalled one holds it up.
    """
    deadline = time.monotonic() + timeout_s
    while not stop.is_set() and time.monotonic() < deadline:
        msg = sub.recv(100)
        if msg is not None:
            seqs.append(msg.header["seq"])
            if seqs[-1] >= last_seq:
                return


@pytest.mark.timeout(300)  # a publish() that blocked would hang in flood()
def test_stalled_subscriber_default_mode(tmp_path: Path):
    """Default (lossy) XPUB: ZeroMQ drops per subscriber, silently for the publisher.

    publish() never refuses, `dropped` stays 0, and each subscriber accounts for every seq:
    received + gaps covers the whole range. The stalled one sees a big gap once it reads again.
    """
    n = 20000
    pub = Publisher(f"ipc://{tmp_path}/lossy.sock", sndhwm=10)
    stalled = Subscriber(pub.endpoint, rcvhwm=1)
    healthy = Subscriber(pub.endpoint)
    stop_reading = threading.Event()
    reader = None
    try:
        assert pub.wait_for_subscribers(2, 5) == 2
        seqs: list[int] = []
        reader = Background(lambda: read_until_seq(healthy, n, seqs, stop_reading))  # n: seq of the last message
        reader.start()
        results = flood(pub, n)
        assert results == {True} and pub.dropped["decision"] == 0 and pub.sent["decision"] == n
        # The stalled subscriber wakes up: its buffered backlog, then one new message.
        backlog = recv_all(stalled, n, timeout_ms=300)
        assert pub.publish("decision", {"frame_id": n})  # seq n
        # (whatever of the backlog a busy machine delayed past the 300 ms comes first)
        while (last := stalled.recv(30_000)) is not None and last.header["seq"] != n:
            backlog.append(last)
        assert last is not None and last.header["seq"] == n
        assert 0 < len(backlog) < n
        assert stalled.gaps["decision"] > 0
        assert len(backlog) + 1 + stalled.gaps["decision"] == n + 1
        reader.join_checked(timeout=150)
        assert seqs[0] == 0 and seqs[-1] == n and seqs == sorted(set(seqs))
        assert len(seqs) + healthy.gaps["decision"] == n + 1  # every seq received or counted missing
    finally:
        stop_reading.set()  # a failed assert must not leave the reader on a socket closed under it
        if reader is not None:
            reader.join(timeout=5)
        stalled.close()
        healthy.close()
        pub.close(0)


@pytest.mark.timeout(300)  # a publish() that blocked would hang in flood()
def test_stalled_subscriber_nodrop_mode(tmp_path: Path):
    """nodrop=True: ZeroMQ refuses instead of dropping; publish() returns False at once and
    counts it. The refused message is lost for every subscriber, so the healthy one's gaps
    equal the publisher's `dropped` exactly."""
    n = 20000
    pub = Publisher(f"ipc://{tmp_path}/nodrop.sock", sndhwm=10, nodrop=True)
    stalled = Subscriber(pub.endpoint, rcvhwm=1)
    healthy = Subscriber(pub.endpoint)
    stop_reading = threading.Event()
    reader = None
    try:
        assert pub.wait_for_subscribers(2, 5) == 2
        seqs: list[int] = []
        # flood seqs are all < n: the first seq >= n is the recovery message below
        reader = Background(lambda: read_until_seq(healthy, n, seqs, stop_reading))
        reader.start()
        results = flood(pub, n)
        assert results == {True, False}
        assert pub.dropped["decision"] > 0 and pub.sent["decision"] + pub.dropped["decision"] == n
        # Once the stalled subscriber is gone, messages get through again.
        stalled.close()
        deadline = time.monotonic() + 60
        while not pub.publish("decision", {"frame_id": -1}):
            assert time.monotonic() < deadline, "publisher never recovered after the stalled SUB left"
            time.sleep(0.01)
        reader.join_checked(timeout=150)
        last_seq = pub.sent["decision"] + pub.dropped["decision"] - 1  # the recovery message
        assert last_seq >= n and seqs[0] == 0 and seqs[-1] == last_seq
        assert len(seqs) == pub.sent["decision"]
        assert healthy.gaps["decision"] == pub.dropped["decision"]
    finally:
        stop_reading.set()  # a failed assert must not leave the reader on a socket closed under it
        if reader is not None:
            reader.join(timeout=5)
        stalled.close()
        healthy.close()
        pub.close(0)


def raw_message(topic: str, **header) -> list[bytes]:
    return [topic.encode(), msgpack.packb({"v": SCHEMA_VERSION, "topic": topic, **header})]


def test_subscriber_gaps_restarts_and_schema_check():
    """Hand-made seqs from a bare XPUB: gaps per topic, restarts are no gaps, v checked."""
    ctx = zmq.Context.instance()
    raw = ctx.socket(zmq.XPUB)
    raw.bind(LOCAL)
    try:
        with Subscriber(raw.getsockopt_string(zmq.LAST_ENDPOINT), ("decision", "stats")) as sub:
            for _ in range(2):  # both subscriptions in place before sending
                assert raw.poll(5000) and raw.recv()[0] == 1
            for topic, seq in [("decision", 10), ("decision", 11), ("stats", 0), ("decision", 14),
                               ("stats", 1), ("decision", 15), ("decision", 0), ("decision", 2)]:
                raw.send_multipart(raw_message(topic, seq=seq))
            seqs = [(m.topic, m.header["seq"]) for m in recv_all(sub, 8)]
            assert seqs[-1] == ("decision", 2)
            # 10,11 | 14 (2 missed), 15 | restart at 0 (new baseline) | 2 (1 missed)
            assert sub.gaps == {"decision": 3, "stats": 0}
            assert sub.restarts == 1  # no run_id in these headers: seq back to 0 says it
            raw.send_multipart(raw_message("decision", seq=3) + [b"payload"])
            assert sub.recv(2000).payload == b"payload"
            raw.send_multipart([b"decision", msgpack.packb({"v": SCHEMA_VERSION + 1, "seq": 4})])
            with pytest.raises(ValueError, match="upgrade linegate"):
                sub.recv(2000)
            raw.send_multipart([b"decision", msgpack.packb({"seq": 5})])
            with pytest.raises(ValueError, match="schema version"):
                sub.recv(2000)
            assert sub.recv(50) is None  # timeout
    finally:
        raw.close(0)


def test_format_decision():
    ts = 1_700_000_000.2345
    clock = time.strftime("%H:%M:%S", time.localtime(ts)) + ".234"
    header = {"capture_ts": ts, "camera_id": "cam0", "frame_id": 17, "source": "chip0003.jpg",
              "decision": "reject", "score": 1.23454, "threshold": 1.1}
    assert format_decision(header) == f"{clock} cam0 #17 chip0003.jpg REJECT score=1.2345 thr=1.1000"
    header.update(source=None, decision="error", score=None)
    assert format_decision(header) == f"{clock} cam0 #17 ERROR score=- thr=1.1000"


def test_watch_prints_count_lines():
    pub = Publisher(LOCAL)
    thread = publish_in_thread(pub, 1, lambda p: [p.publish("decision", decision_header(i)) for i in range(8)])
    out = io.StringIO()
    assert watch(pub.endpoint, count=5, timeout_s=10, out=out) == 0
    thread.join_checked()
    lines = out.getvalue().splitlines()
    assert len(lines) == 5
    assert [line.split()[2] for line in lines] == ["#0", "#1", "#2", "#3", "#4"]
    assert all(" cam0 " in line and "ACCEPT score=0.5000 thr=1.1000" in line for line in lines)


def _strict(constant: str):
    raise ValueError(f"{constant} is not JSON")


def test_watch_json_lines():
    error = {**decision_header(2, "error"), "score": float("nan"), "score_norm": float("nan")}
    headers = [decision_header(0), decision_header(1), error]
    pub = Publisher(LOCAL, model_id="m-1")
    thread = publish_in_thread(pub, 1, lambda p: [p.publish("decision", h) for h in headers])
    out = io.StringIO()
    assert watch(pub.endpoint, json_lines=True, count=3, timeout_s=10, out=out) == 0
    thread.join_checked()
    # strict JSON, as other languages' parsers read it: no bare NaN for the error decision
    rows = [json.loads(line, parse_constant=_strict) for line in out.getvalue().splitlines()]
    assert [r["frame_id"] for r in rows] == [0, 1, 2]
    assert rows[2]["score"] is None and rows[2]["score_norm"] is None and rows[0]["score"] == 0.5
    expected = {"v", "topic", "seq", "publish_ts", "model_id", "run_id", "camera_id", "frame_id", "capture_ts",
                "score", "score_norm", "threshold", "decision", "source", "label", "aggregate"}
    assert all(set(r) == expected and r["model_id"] == "m-1" for r in rows)


# (kind, camera, frame_id) in publication order; D = decision, O = overlay.
INTERLEAVED = [(k, "cam0", i) for i in range(4) for k in "DO"]
BATCHED_TWO_CAMERAS = ([("D", "cam0", 0), ("D", "cam1", 0), ("D", "cam0", 1), ("D", "cam1", 1)]
                       + [("O", "cam1", 1), ("O", "cam0", 0), ("O", "cam1", 0), ("O", "cam0", 1)])


@pytest.mark.parametrize("order", [INTERLEAVED, BATCHED_TWO_CAMERAS], ids=["interleaved", "batched"])
def test_watch_saves_overlays(tmp_path: Path, order: list[tuple[str, str, int]]):
    """count=3: overlays may follow each decision or the whole batch; only the printed
    decisions' overlays are saved once the count is reached."""
    data = jpeg()

    def body(p: Publisher) -> None:
        for kind, camera, i in order:
            header = {**decision_header(i, "reject" if i == 1 else "accept"), "camera_id": camera}
            if kind == "D":
                p.publish("decision", header)
            else:
                p.publish("overlay", {**header, "encoding": "jpeg", "width": 64, "height": 48}, data)

    pub = Publisher(LOCAL)
    thread = publish_in_thread(pub, 2, body)  # watch subscribes to decision and overlay
    out_dir, out = tmp_path / "overlays", io.StringIO()
    assert watch(pub.endpoint, count=3, save_overlays=str(out_dir), timeout_s=10, out=out) == 0
    thread.join_checked()
    printed = [tuple(line.split()[1:3]) for line in out.getvalue().splitlines()]
    expected = [(camera, f"#{i}") for kind, camera, i in order if kind == "D"][:3]
    assert printed == expected  # the 4th decision is not printed
    files = sorted(p.name for p in out_dir.iterdir())
    # CAMERA_CAPTURETIME_FRAMEID_DECISION.jpg: the time keeps a restarted run's frame ids apart
    named = sorted(re.fullmatch(r"(cam\d)_\d{8}T\d{6}\.\d{3}Z_(\d+)_(\w+)\.jpg", f).groups() for f in files)
    assert named == sorted((camera, i[1:], "reject" if i == "#1" else "accept") for camera, i in expected)
    for name in files:
        image = cv2.imread(str(out_dir / name))
        assert image is not None and image.shape == (48, 64, 3)


@pytest.mark.timeout(120)
def test_watch_ctrl_c_ends_cleanly():
    # Python's own Ctrl-C handler, whatever this process inherited: a shell starts background
    # jobs with SIGINT ignored, and then the signal below would never arrive
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with Publisher(LOCAL) as pub:
            timer = threading.Timer(0.2, signal.raise_signal, (signal.SIGINT,))  # Ctrl-C, 0.2 s in
            timer.start()
            # no count, no timeout: only Ctrl-C ends it (else it hangs until pytest-timeout)
            assert watch(pub.endpoint, out=io.StringIO()) == 0
            timer.join()
    finally:
        signal.signal(signal.SIGINT, previous)


def test_watch_timeout_and_gap_report(capsys: pytest.CaptureFixture[str]):
    with Publisher(LOCAL) as silent:  # nobody publishes: count never reached
        t0 = time.monotonic()
        assert watch(silent.endpoint, count=1, timeout_s=0.3, out=io.StringIO()) == 1
        assert time.monotonic() - t0 >= 0.25  # it waited its timeout out
    ctx = zmq.Context.instance()
    raw = ctx.socket(zmq.XPUB)
    raw.bind(LOCAL)

    def send() -> None:
        assert raw.poll(5000) and raw.recv()[0] == 1
        for seq in (0, 1, 4):
            raw.send_multipart(raw_message("decision", seq=seq, camera_id="cam0", frame_id=seq,
                                           decision="accept", score=0.1, threshold=1.0))

    thread = Background(send)
    thread.start()
    out = io.StringIO()
    try:
        assert watch(raw.getsockopt_string(zmq.LAST_ENDPOINT), count=3, timeout_s=10, out=out) == 0
        thread.join_checked()
    finally:
        raw.close(0)
    assert len(out.getvalue().splitlines()) == 3
    assert "missed 2 decision message(s) before seq 4" in capsys.readouterr().err


def test_bind_errors_name_the_endpoint():
    with Publisher(LOCAL) as first:
        # not a configuration error (ValueError) but a state of the box, which may pass
        with pytest.raises(EndpointInUse) as info:
            Publisher(first.endpoint)
        assert first.endpoint in str(info.value) and "another port" in str(info.value)
    with pytest.raises(ValueError, match="nonsense://here"):
        Publisher("nonsense://here")
    with pytest.raises(ValueError, match="nonsense://here"):
        Subscriber("nonsense://here")


def test_watch_arguments():
    parser = argparse.ArgumentParser()
    add_watch_arguments(parser)
    args = parser.parse_args(["tcp://box:5556", "--json", "--count", "4", "--save-overlays", "d",
                              "--timeout", "2.5"])
    assert vars(args) == {"endpoint": "tcp://box:5556", "json_lines": True, "count": 4,
                          "save_overlays": "d", "timeout_s": 2.5, "server_key": None, "client_key": None}
    # the dests are watch()'s parameter names: the parsed flags go straight in
    import inspect
    assert set(vars(args)) <= set(inspect.signature(watch).parameters)
    with pytest.raises(SystemExit):
        parser.parse_args(["tcp://box:5556", "--count", "0"])
