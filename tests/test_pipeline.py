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


def _collect(sub: Subscriber, want: int, timeout_s: float = 60.0) -> list:
    got, deadline = [], time.monotonic() + timeout_s
    while len(got) < want and time.monotonic() < deadline:
        msg = sub.recv(timeout_ms=500)
        if msg is not None:
            got.append(msg)
    return got


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
        msgs = _collect(sub, want=len(levels) + sum(v / 255 >= 0.5 for v in levels))
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "part005b.jpg" in stderr  # the corrupt file is reported by name
    decisions = [m.header for m in msgs if m.topic == "decision"]
    overlays = [m for m in msgs if m.topic == "overlay"]
    assert [d["source"] for d in decisions] == names  # every good image, once, in order
    assert [d["seq"] for d in decisions] == list(range(len(names)))
    assert [d["frame_id"] for d in decisions] == list(range(len(names)))
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
        time.sleep(0.3)
    finally:
        run.kill()
        sub.stop()
    log = run.log()
    decisions = sub.decisions()
    names = [d["source"] for d in decisions]
    assert names == ["p0_good.png", "p1_good.png", "p2_good.png", "p3_good.png", "p4_good.png",
                     "p4_wrong_size.png", "p5_good.png"]  # every frame, in order; the corrupt file is no frame
    assert [d["frame_id"] for d in decisions] == list(range(7))
    bad = decisions[5]
    assert bad["decision"] == "error" and "30x30" in bad["error"] and "46x40" in bad["error"]
    for d in decisions[:5] + decisions[6:]:
        # the ROI crop holds only the dark half: accept, with the dark half's score
        assert d["decision"] == "accept" and abs(d["score"] - 0 / 255) < 1e-5 and "error" not in d
    assert "p2_corrupt.jpg" in log and "not a decodable image" in log
    assert "cam0 frame 5: frame is 30x30" in log


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
        msgs = _collect(sub, want=10_000, timeout_s=1)
    stats = [m.header for m in msgs if m.topic == "stats"]
    assert len(stats) >= 4
    mid = stats[2]
    for cam in ("left", "right"):
        c = mid["cameras"][cam]
        assert 10 < c["fps"] < 80 and c["state"] == "running" and c["dropped"] >= 0
        assert c["decisions"] <= c["frames"]
    assert set(mid["queue_depth"]) == {"frames", "results"}
    for stage in STAGES:
        lat = mid["latency_ms"][stage]
        assert lat["n"] > 0 and 0 <= lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"], stage
    assert mid["latency_ms"]["end_to_end"]["p50"] >= mid["latency_ms"]["inference"]["p50"]
    assert stats[-1]["frames"] == summary.frames and stats[-1]["state"] == "stopping"
    assert sum(s["cameras"]["left"]["fps"] * s["interval_s"] for s in stats) == pytest.approx(
        stats[-1]["cameras"]["left"]["decisions"], abs=1)


def _live_rate(tiny_bundle, endpoint: str, stall_s: float) -> tuple[float, dict]:
    """Decisions per second seen by a healthy subscriber over a window of a live run; with
    stall_s, a second subscriber stops reading for that window."""
    from edge.sources import SyntheticSource
    from runtime_helpers import Collector

    bundle = load_bundle(tiny_bundle)
    publisher = Publisher(endpoint, model_id=bundle.model_id, sndhwm=100)
    healthy = Collector(publisher.endpoint, ("decision", "overlay"))
    stalled = Subscriber(publisher.endpoint, ("decision", "overlay"), rcvhwm=10) if stall_s else None
    healthy.start()
    # A live camera at 25 frames/s with a 224 x 224 JPEG overlay for every frame. Over ipc
    # (socket buffers of a few hundred kB, unlike loopback TCP's many MB) the stalled
    # subscriber's queues overflow within seconds.
    pipeline = Pipeline(bundle, open_engine(bundle), DecisionRule.from_bundle(bundle),
                        [SyntheticSource("cam0", size=224, fps=25, seed=3)], publisher,
                        RunOptions(max_batch=8, overlay_accepts_every=1, linger_ms=3000,
                                   wait_subscribers=4 if stall_s else 2))
    result = {}
    runner = threading.Thread(target=lambda: result.setdefault("summary", pipeline.run()), daemon=True)
    runner.start()
    facts = {}
    try:
        healthy.wait_for(lambda: len(healthy.decisions()) >= 30, 60, "a warm pipeline")
        if stalled is not None:
            assert stalled.recv(timeout_ms=5000) is not None  # it was reading...
        start = time.monotonic()
        time.sleep(stall_s or 3.0)  # ... and now it is not
        end = time.monotonic()
        rate = len(healthy.decisions(since=start, until=end)) / (end - start)
        if stalled is not None:
            resumed = _collect(stalled, want=100_000, timeout_s=1.0)
            facts["stalled_gaps"] = stalled.gaps["decision"] + stalled.gaps["overlay"]
            facts["stalled_resumed"] = len(resumed)
    finally:
        pipeline.stop()
        runner.join(timeout=20)
        time.sleep(0.5)
        healthy.stop()
        if stalled is not None:
            stalled.close()
    summary = result["summary"]
    decisions = healthy.decisions()
    facts.update(healthy_gaps=dict(healthy.sub.gaps), frames=summary.frames,
                 healthy_decisions=[d["seq"] for d in decisions],
                 healthy_overlays=len(healthy.messages("overlay")))
    return rate, facts


def test_a_stalled_subscriber_does_not_slow_the_pipeline_nor_cost_others_messages(tiny_bundle, tmp_path):
    base_rate, _ = _live_rate(tiny_bundle, f"ipc://{tmp_path}/base.sock", stall_s=0)
    stalled_rate, facts = _live_rate(tiny_bundle, f"ipc://{tmp_path}/stall.sock", stall_s=10.0)
    # A publisher that waited for the stalled subscriber would stop the pipeline once its
    # queue filled (rate ~0). The machine is shared and noisy: compare as a generous ratio.
    assert stalled_rate >= 0.7 * base_rate, (stalled_rate, base_rate)
    # the healthy subscriber lost nothing: every decision and overlay, seq without a gap
    assert facts["healthy_gaps"] == {"decision": 0, "overlay": 0}
    assert facts["healthy_decisions"] == list(range(facts["frames"]))
    assert facts["healthy_overlays"] == facts["frames"]
    # the stalled one lost messages (ZeroMQ dropped for it alone) and sees that as seq gaps
    assert facts["stalled_gaps"] > 0 and facts["stalled_resumed"] > 0


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
