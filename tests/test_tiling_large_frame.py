"""A 2448 x 2048 (5 MP) frame through `linegate run` from a folder: the bundle was trained
with the default geometry on frames of that size (tiled), and the overlay comes back at the
frame's full size with the heatmap over all of it, hottest where the defect is (in the last
tile's corner: the stitched map reaches it)."""
import subprocess
import time

import cv2
import numpy as np
import pytest

from conftest import free_tcp_endpoint, linegate_cmd, read_json
from edge.subscriber import Subscriber
from training.data import SplitCounts

H, W = 2048, 2448
SIZE = 64
COUNTS = SplitCounts(train_normal=6, calib_normal=3, calib_per_anomaly=3, train_per_anomaly=1)
SPOT = 260  # frame pixels


def _frame(rng: np.random.Generator, spot: tuple[int, int] | None) -> np.ndarray:
    """A smooth grey surface (low-resolution noise brought up to 5 MP), with a bright square."""
    small = rng.integers(70, 110, (H // 64, W // 64), dtype=np.uint8)
    grey = cv2.resize(small, (W, H), interpolation=cv2.INTER_CUBIC)
    if spot is not None:
        y, x = spot
        grey[y:y + SPOT, x:x + SPOT] = 250
    return cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from export.onnx_export import export_onnx
    from training.train import train

    root = tmp_path_factory.mktemp("large")
    rng = np.random.default_rng(0)
    for cls, n in (("normal", 11), ("spot", 6)):
        (root / "data" / cls).mkdir(parents=True)
        for i in range(n):
            spot = None if cls == "normal" else (int(rng.integers(0, H - SPOT)), int(rng.integers(0, W - SPOT)))
            cv2.imwrite(str(root / "data" / cls / f"{cls}{i:02d}.jpg"), _frame(rng, spot))
    run = root / "run"
    # max: one small defect in a 5 MP frame barely moves the mean of the whole map
    train(root / "data", run, "normal", "padim", seed=0, image_size=SIZE, counts=COUNTS, dims=16, aggregate="max",
          report=False)
    return export_onnx(run)


def test_a_5mp_frame_gets_an_overlay_over_the_whole_frame(bundle, tmp_path):
    geometry = read_json(bundle / "manifest.json")["geometry"]
    assert geometry["mode"] == "tile" and geometry["frame"] == [H, W] and len(geometry["tiles"]) > 4
    line = tmp_path / "line"
    line.mkdir()
    frame = _frame(np.random.default_rng(7), (H - SPOT - 40, W - SPOT - 40))  # bottom-right corner
    cv2.imwrite(str(line / "part.png"), frame)
    endpoint = free_tcp_endpoint()
    messages = {}
    with Subscriber(endpoint, topics=("decision", "overlay")) as sub:
        proc = subprocess.Popen(linegate_cmd("run", "--bundle", str(bundle), "--source", f"folder:{line}",
                                             "--publish", endpoint, "--overlay-accepts", "1",
                                             "--wait-subscribers", "2"), stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while len(messages) < 2 and time.monotonic() < deadline:
            msg = sub.recv(timeout_ms=1000)
            if msg is not None:
                messages[msg.topic] = msg
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert messages["decision"].header["decision"] == "reject", messages["decision"].header
    overlay = messages["overlay"]
    assert (overlay.header["width"], overlay.header["height"]) == (W, H)
    image = cv2.imdecode(np.frombuffer(overlay.payload, np.uint8), cv2.IMREAD_COLOR)
    assert image.shape == (H, W, 3)
    # the heatmap is blended everywhere: every 256 px block of the frame is tinted
    tint = np.abs(image.astype(np.int16) - frame.astype(np.int16)).mean(axis=2)
    blocks = tint[:H // 256 * 256, :W // 256 * 256].reshape(H // 256, 256, W // 256, 256).mean(axis=(1, 3))
    assert (blocks > 5).all(), blocks.round(1)
    # hottest (JET: red over blue) at the defect, in the last tile's corner; inside the red
    # border and below the decision banner (both drawn in red)
    top, side = 200, 40
    heat = image[top:H - side, side:W - side, 2].astype(np.float32) - image[top:H - side, side:W - side, 0]
    heat = cv2.blur(heat, (101, 101))
    y, x = np.unravel_index(np.argmax(heat), heat.shape)
    assert y + top > H - SPOT - 300 and x + side > W - SPOT - 300, (y + top, x + side)
