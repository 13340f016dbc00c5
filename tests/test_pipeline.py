"""The edge runtime end to end on a tiny real ONNX bundle: real sources, a real ONNX Runtime
session, real ZeroMQ sockets, the real `linegate run` process."""
import signal
import subprocess
import time

import cv2
import numpy as np

from conftest import free_tcp_endpoint, linegate_cmd, write_grey_images
from edge.bundle import load_bundle
from edge.decision import DecisionRule
from edge.engine import open_engine
from edge.pipeline import Pipeline, RunOptions
from edge.publisher import Publisher
from edge.sources import VideoSource
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
