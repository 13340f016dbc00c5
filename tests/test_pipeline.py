"""The edge runtime end to end on a tiny real ONNX bundle: real sources, a real ONNX Runtime
session, real ZeroMQ sockets, the real `linegate run` process."""
import signal
import subprocess
import threading
import time

import cv2
import numpy as np
import pytest

from conftest import free_tcp_endpoint, linegate_cmd, write_grey_images
from edge.bundle import load_bundle
from edge.decision import DecisionRule
from edge.engine import open_engine
from edge.pipeline import Pipeline, RunOptions
from edge.publisher import Publisher
from edge.sources import Source, VideoSource
from edge.subscriber import Subscriber
from runtime_helpers import GatedEngine


def _collect(sub: Subscriber, want: int, timeout_s: float = 60.0) -> list:
    got, deadline = [], time.monotonic() + timeout_s
    while len(got) < want and time.monotonic() < deadline:
        msg = sub.recv(timeout_ms=500)
        if msg is not None:
            got.append(msg)
    return got


def _collect_until(sub: Subscriber, last, timeout_s: float = 60.0) -> list:
    """Messages up to and including the first for which last(message) is true."""
    got, deadline = [], time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        msg = sub.recv(timeout_ms=500)
        if msg is not None:
            got.append(msg)
            if last(msg):
                return got
    raise AssertionError(f"the awaited message did not come within {timeout_s} s ({len(got)} others did)")


def test_linegate_run_folder_publishes_one_decision_per_image(tiny_bundle, tmp_path):
    levels = [10, 240, 30, 250, 200, 20, 90, 180, 5, 160, 60, 220]
    names = write_grey_images(tmp_path / "parts", levels)
    (tmp_path / "parts" / "part005b.jpg").write_bytes(b"garbage")  # a corrupt file in the middle
    endpoint = free_tcp_endpoint()
    with Subscriber(endpoint, topics=("decision", "overlay")) as sub:
        proc = subprocess.Popen(linegate_cmd("run", "--bundle", str(tiny_bundle), "--source",
                                             f"folder:{tmp_path / 'parts'}", "--publish", endpoint,
                                             "--max-batch", "4", "--wait-subscribers", "2"),
                                stderr=subprocess.PIPE, text=True)
        msgs = _collect(sub, want=len(levels) + 1 + sum(v / 255 >= 0.5 for v in levels))
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "part005b.jpg" in stderr  # the corrupt file is reported by name
    everything = [m.header for m in msgs if m.topic == "decision"]
    overlays = [m for m in msgs if m.topic == "overlay"]
    files = names[:6] + ["part005b.jpg"] + names[6:]  # name order: part005.png, part005b.jpg, part006.png
    assert [d["source"] for d in everything] == files  # every file, once, in order
    assert [d["seq"] for d in everything] == list(range(len(files)))
    assert [d["frame_id"] for d in everything] == list(range(len(files)))
    corrupt = everything[6]  # a file that cannot be read is not lost: it gets an error decision
    assert corrupt["decision"] == "error" and "not a decodable image" in corrupt["error"]
    decisions = everything[:6] + everything[7:]
    expected = ["reject" if v / 255 >= 0.5 else "accept" for v in levels]
    assert [d["decision"] for d in decisions] == expected
    for d, level in zip(decisions, levels):
        assert abs(d["score"] - level / 255) < 1e-5
        assert d["model_id"] == "tiny-test" and d["threshold"] == 0.5 and d["v"] == 1
        assert d["capture_ts"] <= d["publish_ts"]
    # overlays: exactly the rejects (default policy), decodable JPEGs of the frame's size
    assert sorted(o.header["source"] for o in overlays) == sorted(
        n for n, e in zip(names, expected) if e == "reject")
    img = cv2.imdecode(np.frombuffer(overlays[0].payload, np.uint8), cv2.IMREAD_COLOR)
    assert img.shape == (40, 46, 3)
    b, g, r = (int(c) for c in img[0, 20])
    assert r > 200 and b < 40 and g < 40  # the red reject border (JPEG: near, not exact)


def test_video_source_through_the_pipeline(tiny_bundle, tmp_path):
    path = str(tmp_path / "line.avi")
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    levels = [20, 230] * 10
    for v in levels:
        writer.write(np.full((48, 64, 3), v, np.uint8))
    writer.release()
    bundle = load_bundle(tiny_bundle)
    publisher = Publisher("tcp://127.0.0.1:*", model_id=bundle.model_id)
    with Subscriber(publisher.endpoint) as sub:
        pipeline = Pipeline(bundle, open_engine(bundle), DecisionRule.from_bundle(bundle),
                            [VideoSource(path, "belt")], publisher,
                            RunOptions(max_batch=3, max_wait_ms=2, wait_subscribers=1, linger_ms=2000))
        summary = pipeline.run()
        msgs = _collect(sub, want=len(levels), timeout_s=10)
    assert summary.frames == len(levels)
    assert [m.header["decision"] for m in msgs] == ["accept", "reject"] * 10
    assert [m.header["camera_id"] for m in msgs] == ["belt"] * len(levels)


def test_sigterm_stops_a_live_run_cleanly(tiny_bundle):
    endpoint = free_tcp_endpoint()
    with Subscriber(endpoint) as sub:
        proc = subprocess.Popen(linegate_cmd("run", "--bundle", str(tiny_bundle), "--source",
                                             "synthetic:fps=50", "--publish", endpoint,
                                             "--wait-subscribers", "1"),
                                stderr=subprocess.PIPE, text=True)
        first = _collect(sub, want=5, timeout_s=60)
        assert len(first) == 5
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=20)
        rest = _collect(sub, want=10_000, timeout_s=1)
    assert proc.returncode == 0, stderr
    seqs = [m.header["seq"] for m in first + rest]
    assert seqs == list(range(len(seqs)))  # nothing lost up to the stop
    assert sub.gaps["decision"] == 0
    assert "done:" in stderr


def test_bad_bundle_gives_a_clear_error(tiny_bundle):
    with open(tiny_bundle / "model.onnx", "ab") as fh:
        fh.write(b"x")
    out = subprocess.run(linegate_cmd("run", "--bundle", str(tiny_bundle), "--source", "synthetic"),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "model.onnx: sha256 does not match the manifest" in out.stderr
    assert "Traceback" not in out.stderr


# -- issue 5: bad input, ROI, stats, a stalled subscriber --------------------------------------------

def test_bad_frames_get_error_decisions_and_good_frames_lose_nothing(tiny_bundle, tmp_path):
    """A corrupt JPEG, a frame of the wrong size, an ROI crop, through `linegate run --config`."""
    from runtime_helpers import Collector, RunProcess, write_config

    parts = tmp_path / "parts"
    parts.mkdir()
    half = np.zeros((40, 46, 3), np.uint8)
    half[:, :23] = 250  # bright left half, dark right half: the ROI below sees only the right
    for i in range(6):
        cv2.imwrite(str(parts / f"p{i}_good.png"), half)
    (parts / "p2_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    cv2.imwrite(str(parts / "p4_wrong_size.png"), np.zeros((30, 30, 3), np.uint8))
    endpoint = free_tcp_endpoint()
    config = write_config(tmp_path / "linegate.toml", {
        "engine": {"bundle": str(tiny_bundle)},
        "publisher": {"endpoint": endpoint, "wait_subscribers": 1},
        "source": [{"uri": f"folder:{parts}", "size": [46, 40], "roi": [23, 0, 23, 40]}],
    })
    sub = Collector(endpoint, ("decision",))
    sub.start()
    run = RunProcess(config, tmp_path / "run.log")
    try:
        assert run.wait(timeout=60) == 0, run.log()
        # sent before the exit, maybe not arrived yet: six good frames, the corrupt and the wrong-sized one
        sub.wait_for(lambda: len(sub.decisions()) >= 8, 30, "eight decisions")
    finally:
        run.kill()
        sub.stop()
    log = run.log()
    decisions = sub.decisions()
    names = [d["source"] for d in decisions]
    assert names == ["p0_good.png", "p1_good.png", "p2_corrupt.jpg", "p2_good.png", "p3_good.png", "p4_good.png",
                     "p4_wrong_size.png", "p5_good.png"]  # every file, in order, the bad ones included
    assert [d["frame_id"] for d in decisions] == list(range(8))
    corrupt, bad = decisions[2], decisions[6]
    assert corrupt["decision"] == "error" and "not a decodable image" in corrupt["error"]
    assert bad["decision"] == "error" and "30x30" in bad["error"] and "46x40" in bad["error"]
    for d in decisions[:2] + decisions[3:6] + decisions[7:]:
        # the ROI crop holds only the dark half: accept, with the dark half's score
        assert d["decision"] == "accept" and abs(d["score"] - 0 / 255) < 1e-5 and "error" not in d
    assert "p2_corrupt.jpg" in log and "not a decodable image" in log
    assert "cam0 frame 6: frame is 30x30" in log


class ArraySource(Source):
    """Frames as a capture backend might hand them over raw (e.g. a GStreamer appsink in a
    2-channel YUYV or 4-channel BGRx format, or a grey camera without conversion). No real
    capture here delivers such frames, so the test feeds the arrays through this Source;
    everything after it (checks, queue, engine, publisher) is the real runtime."""

    def __init__(self, images):
        super().__init__("raw")
        self.images = images

    def frames(self, stop):
        for image in self.images:
            yield self._stamp(image)


def test_frames_with_the_wrong_channel_count_get_error_decisions(tiny_bundle):
    good = np.full((24, 24, 3), 10, np.uint8)
    images = [good, np.zeros((24, 24, 2), np.uint8), good, np.zeros((24, 24), np.uint8),
              np.zeros((24, 24, 4), np.uint8), good, np.zeros((24, 24, 3), np.float32), good]
    bundle = load_bundle(tiny_bundle)
    publisher = Publisher("tcp://127.0.0.1:*", model_id=bundle.model_id)
    with Subscriber(publisher.endpoint) as sub:
        summary = Pipeline(bundle, open_engine(bundle), DecisionRule.from_bundle(bundle),
                           [ArraySource(images)], publisher,
                           RunOptions(max_batch=4, wait_subscribers=1)).run()
        msgs = _collect(sub, want=len(images), timeout_s=10)
    got = [m.header for m in msgs]
    assert [d["frame_id"] for d in got] == list(range(len(images)))
    assert [d["decision"] for d in got] == ["accept", "error", "accept", "error", "error", "accept", "error", "accept"]
    assert "2 channel" in got[1]["error"] and "1 channel" in got[3]["error"] and "4 channel" in got[4]["error"]
    assert "float32" in got[6]["error"]
    assert summary.frames == 8 and summary.errors == 4 and summary.bad_frames == {"raw": 4}


class DyingCamera(ArraySource):
    """A live source whose backend raises after a few frames (no real capture here can be
    made to raise an unexpected error on cue); or, with raises=None, one that just ends."""
    finite = False

    def __init__(self, images, raises: BaseException | None):
        super().__init__(images)
        self.raises = raises
        self.policy = "queue"  # not a live camera's "latest": every frame here must get a decision

    def frames(self, stop):
        yield from super().frames(stop)
        if self.raises is not None:
            raise self.raises


@pytest.mark.parametrize("raises", [OSError("device unplugged"), None], ids=["raises", "ends"])
def test_a_live_source_that_dies_ends_the_run_as_a_failure(tiny_bundle, raises):
    """Frames it delivered are still decided; then the run reports `fatal`, so the service
    exits non-zero and systemd restarts it, instead of ending as a clean stop (status 0)."""
    bundle = load_bundle(tiny_bundle)
    publisher = Publisher("tcp://127.0.0.1:*", model_id=bundle.model_id)
    images = [np.full((24, 24, 3), 10, np.uint8)] * 3
    with Subscriber(publisher.endpoint) as sub:
        summary = Pipeline(bundle, open_engine(bundle), DecisionRule.from_bundle(bundle),
                           [DyingCamera(images, raises)], publisher,
                           RunOptions(max_batch=2, wait_subscribers=1)).run()
        msgs = _collect(sub, want=3, timeout_s=10)
    assert [m.header["decision"] for m in msgs] == ["accept"] * 3 and summary.frames == 3
    expected = "source raw stopped by an error: device unplugged" if raises else \
        "live source raw ended without a stop request"
    assert summary.fatal == expected


def test_stats_topic_reports_cameras_queues_and_stage_latencies(tiny_bundle):
    from edge.sources import SyntheticSource
    from edge.stats import STAGES

    bundle = load_bundle(tiny_bundle)
    publisher = Publisher("tcp://127.0.0.1:*", model_id=bundle.model_id)
    sources = [SyntheticSource("left", fps=40, size=64, seed=1), SyntheticSource("right", fps=40, size=64, seed=2)]
    with Subscriber(publisher.endpoint, ("stats", "decision")) as sub:
        pipeline = Pipeline(bundle, open_engine(bundle), DecisionRule.from_bundle(bundle), sources, publisher,
                            RunOptions(max_batch=4, wait_subscribers=2, stats_interval_s=0.25, linger_ms=2000,
                                       overlay_accepts_every=1))
        timer = threading.Timer(1.6, pipeline.stop)
        timer.start()
        summary = pipeline.run()
        # up to the last stats message, sent after the last decision (the socket has closed)
        msgs = _collect_until(sub, lambda m: m.topic == "stats" and m.header["state"] == "stopping"
                              and m.header["frames"] == summary.frames)
    stats = [m.header for m in msgs if m.topic == "stats"]
    decisions = [m.header for m in msgs if m.topic == "decision"]
    assert len(stats) >= 4 and len(decisions) == summary.frames
    mid = stats[2]
    assert mid["state"] == "running"
    for cam in ("left", "right"):
        c = mid["cameras"][cam]
        assert c["state"] == "running" and 0 < c["decisions"] and c["decisions"] + c["dropped"] <= c["frames"]
    # per camera, the decisions counted in each message add up to the run's totals
    for s in stats:
        assert sum(c["decisions"] for c in s["cameras"].values()) == s["frames"]
    final = stats[-1]["cameras"]
    for cam in ("left", "right"):
        assert final[cam]["decisions"] == sum(d["camera_id"] == cam for d in decisions) > 0
        assert final[cam]["dropped"] == summary.dropped.get(cam, 0)
        assert final[cam]["decisions"] + final[cam]["dropped"] <= final[cam]["frames"]
        # fps is the interval's decisions over its length: the counts between messages
        counts = np.diff([0] + [s["cameras"][cam]["decisions"] for s in stats])
        rates = [s["cameras"][cam]["fps"] * s["interval_s"] for s in stats]
        assert rates == pytest.approx(counts, abs=0.1)
    assert set(mid["queue_depth"]) == {"frames", "results", "overlays"}
    for stage in STAGES:
        lat = mid["latency_ms"][stage]
        assert lat["n"] > 0 and 0 <= lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"], stage
    assert mid["latency_ms"]["end_to_end"]["p50"] >= mid["latency_ms"]["inference"]["p50"]
    assert stats[-1]["frames"] == summary.frames and stats[-1]["state"] == "stopping"


@pytest.mark.timeout(300)  # a publisher that waited for the stalled subscriber would hang run()
def test_a_stalled_subscriber_does_not_hold_up_the_pipeline_nor_cost_others_messages(tiny_bundle, tmp_path):
    """A subscriber that never reads while a finite, unpaced source runs as fast as it can,
    with a 224 x 224 JPEG overlay for every frame. Over ipc (socket buffers of a few hundred
    kB, unlike loopback TCP's many MB) its queues overflow within the first frames: a
    publisher that waited for it would never finish run(). It must finish, the healthy
    subscriber must get every message, and the stalled one loses messages (ZeroMQ drops for
    it alone)."""
    from edge.sources import SyntheticSource
    from runtime_helpers import Collector

    n = 300  # 600 messages: within the healthy subscriber's queues even if it read none during the run
    bundle = load_bundle(tiny_bundle)
    publisher = Publisher(f"ipc://{tmp_path}/stall.sock", model_id=bundle.model_id, sndhwm=100)
    healthy = Collector(publisher.endpoint, ("decision", "overlay"))
    stalled = Subscriber(publisher.endpoint, ("decision", "overlay"), rcvhwm=10)
    healthy.start()
    try:
        pipeline = Pipeline(bundle, open_engine(bundle), DecisionRule.from_bundle(bundle),
                            [SyntheticSource("cam0", count=n, size=224, seed=3)], publisher,
                            RunOptions(max_batch=8, overlay_accepts_every=1, linger_ms=3000, wait_subscribers=4))
        summary = pipeline.run()  # the stalled subscriber has not read a thing
        healthy.wait_for(lambda: len(healthy.decisions()) >= n and len(healthy.messages("overlay")) >= n, 60,
                         "every decision and overlay at the healthy subscriber")
        stalled_got = []  # what it holds, now that it reads (its queue is local: no waiting for it)
        while (msg := stalled.recv(timeout_ms=1000)) is not None:
            stalled_got.append(msg)
    finally:
        healthy.stop()
        stalled.close()
    assert summary.frames == n and summary.errors == 0 and summary.fatal is None
    assert publisher.dropped == {"decision": 0, "overlay": 0, "stats": 0, "event": 0, "frame": 0}  # ZeroMQ never refused: it drops per peer
    # the healthy subscriber lost nothing: every decision and overlay, seq without a gap
    assert healthy.sub.gaps == {"decision": 0, "overlay": 0}
    assert [d["seq"] for d in healthy.decisions()] == list(range(n))
    assert [m.header["seq"] for m in healthy.messages("overlay")] == list(range(n))
    # the stalled one got a start of the stream and lost the rest
    assert 0 < len(stalled_got) < 2 * n
    held = [m.header["seq"] for m in stalled_got if m.topic == "decision"]
    assert held == list(range(len(held))) and len(held) < n


def test_numpy_blas_is_single_threaded_while_the_pipeline_runs(tiny_bundle):
    """The engine owns the cores: during run() numpy's BLAS is limited to one thread (its
    spinning workers took the cores from ONNX Runtime), and the limit is lifted afterwards."""
    from threadpoolctl import threadpool_info

    from edge.sources import SyntheticSource

    def blas_threads() -> list[int]:
        return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]

    if not blas_threads():
        pytest.skip("numpy here has no BLAS library threadpoolctl can see")
    before = blas_threads()
    seen: list[list[int]] = []

    class Probe:  # a Monitor: called from the publishing thread while the pipeline runs
        def tick(self, pipeline, now):
            seen.append(blas_threads())

        def stats(self, message):
            pass

        def stopping(self):
            pass

    bundle = load_bundle(tiny_bundle)
    publisher = Publisher("tcp://127.0.0.1:*", model_id=bundle.model_id)
    Pipeline(bundle, open_engine(bundle), DecisionRule.from_bundle(bundle),
             [SyntheticSource("cam0", count=40, size=32, seed=0)], publisher,
             RunOptions(max_batch=4), monitor=Probe()).run()
    assert seen and all(threads == [1] * len(before) for threads in seen)
    assert blas_threads() == before


def test_engine_is_warmed_at_every_batch_size_once_before_frames_are_read(tiny_bundle, caplog):
    """ONNX Runtime sizes its memory per batch shape: the pipeline runs each size once before
    the first frame, so memory does not step up later when a backlog first forms a new size.
    A second pipeline on the same engine does not warm it again. (The engine is the real ONNX
    Runtime one; the wrapper only records the batch sizes it is given.)"""
    import logging

    from edge.sources import SyntheticSource

    bundle = load_bundle(tiny_bundle)
    engine = open_engine(bundle)
    sizes: list[int] = []
    real_infer = engine.infer

    def recording_infer(batch):
        sizes.append(len(batch))
        return real_infer(batch)

    engine.infer = recording_infer

    def run_once() -> None:
        publisher = Publisher("tcp://127.0.0.1:*", model_id=bundle.model_id)
        Pipeline(bundle, engine, DecisionRule.from_bundle(bundle),
                 [SyntheticSource("cam0", count=3, size=32, seed=0)], publisher,
                 RunOptions(max_batch=6, max_wait_ms=0)).run()

    with caplog.at_level(logging.INFO, logger="edge.pipeline"):
        run_once()
    assert sizes[:6] == [1, 2, 3, 4, 5, 6]  # warm-up first, every size once
    assert sum(sizes[6:]) == 3  # then the three frames
    assert "engine warmed up at batch sizes 1-6" in caplog.text
    sizes.clear()
    run_once()
    assert sum(sizes) == 3  # already warm: frames only


class HeldCamera(ArraySource):
    """A live camera that delivers its frames, then stays open until the run stops; "queue"
    policy so that every frame waits for a batch. `all_queued` is set once the last frame is
    in the queue (the generator resumes only after the frame was put)."""
    finite = False

    def __init__(self, images):
        super().__init__(images)
        self.policy = "queue"
        self.all_queued = threading.Event()

    def frames(self, stop):
        yield from super().frames(stop)
        self.all_queued.set()
        stop.wait()


@pytest.mark.timeout(120)  # a stop timeout that did not give up would hang here
def test_stop_timeout_discards_waiting_frames_and_gives_up_on_a_hung_engine(tiny_bundle, caplog):
    """stop() with the engine stuck in a batch: after ~0.7 of the budget the frames still
    waiting for a batch are discarded (counted, logged), then run() gives up on the engine
    call and returns with `timed_out` set; the frames decided before the hang still went out."""
    import logging

    bundle = load_bundle(tiny_bundle)
    engine = GatedEngine(open_engine(bundle))
    publisher = Publisher("tcp://127.0.0.1:*", model_id=bundle.model_id)
    n = 30  # fewer than the queue's capacity: all of them wait in the queue
    source = HeldCamera([np.full((24, 24, 3), 10 + i, np.uint8) for i in range(n)])
    pipeline = Pipeline(bundle, engine, DecisionRule.from_bundle(bundle), [source], publisher,
                        RunOptions(max_batch=2, max_wait_ms=0, wait_subscribers=1, stop_timeout_s=2.0,
                                   queue_capacity=64))
    result: dict = {}
    runner = threading.Thread(target=lambda: result.setdefault("summary", pipeline.run()), daemon=True)
    try:
        with Subscriber(publisher.endpoint) as sub, caplog.at_level(logging.WARNING, logger="edge.pipeline"):
            runner.start()
            assert engine.entered.wait(60), "the second batch never reached the engine"
            assert source.all_queued.wait(60), "the source never queued its frames"
            pipeline.stop()
            runner.join()  # returns although the engine call never does (pytest-timeout otherwise)
            first, hung = engine.batch_sizes
            msgs = _collect(sub, want=first, timeout_s=30)
    finally:
        engine.gate.set()  # let the stuck inference thread end
    summary = result["summary"]
    assert summary.timed_out is True
    # decided: the first batch; lost with the engine: the hung batch; discarded: the rest
    assert summary.frames == first and summary.discarded == n - first - hung > 0
    assert [m.header["frame_id"] for m in msgs] == list(range(first))
    assert f"stop timeout: {summary.discarded} frame(s) still waiting for a batch are discarded" in caplog.text
    assert "the engine did not finish the batch in flight" in caplog.text
