"""The runtime with a tiled bundle, checked against numbers worked out independently: the
tiny bundle's map is the 2x2 mean of the pixels / 255 (conftest.make_tiny_bundle), so over
the whole (resized) frame the stitched map must be exactly that pooled frame, overlaps
included (each tile sees the same pixels there)."""
import json
import subprocess
import time

import cv2
import numpy as np

from conftest import free_tcp_endpoint, linegate_cmd, make_tiny_bundle
from edge.bundle import write_manifest
from edge.images import read_image, resize
from edge.subscriber import Subscriber
from edge.tiling import Geometry, plan_tiles

TILE = 32


def _tiled_tiny_bundle(path, frame_size, tile=64):
    bundle = make_tiny_bundle(path, size=TILE)
    manifest = json.loads((bundle / "manifest.json").read_text())
    work, tiles = plan_tiles(frame_size, tile, TILE, 0.25)  # tiles of `tile` frame px shown at 32
    manifest["geometry"] = Geometry("tile", (TILE, TILE), "staged", work, tuple(tiles), 0.25, tile, frame_size).to_json()
    manifest["input"]["interpolation"] = "staged"
    manifest["decision"]["aggregate"] = "max"
    write_manifest(bundle, manifest)
    return bundle, work, tiles


def _expected_max(path, work) -> float:
    """The max of the 2x2-pooled, channel-averaged work frame / 255, without edge.tiling."""
    pooled = resize(read_image(path), work, "staged").astype(np.float64).mean(axis=2) / 255
    pooled = pooled.reshape(work[0] // 2, 2, work[1] // 2, 2).mean(axis=(1, 3))
    return float(pooled.max())


def test_a_tiled_frame_is_scored_over_its_whole_stitched_map(tmp_path):
    frame_size = (200, 330)
    bundle, work, tiles = _tiled_tiny_bundle(tmp_path / "bundle", frame_size)
    assert len(tiles) > 4 and work == (96, 160)
    line = tmp_path / "line"
    line.mkdir()
    dark = np.full((*frame_size, 3), 40, np.uint8)
    corner = dark.copy()
    corner[-24:, -24:] = 250  # only the last tile sees it
    cv2.imwrite(str(line / "a_corner.png"), corner)
    cv2.imwrite(str(line / "b_dark.png"), dark)
    endpoint = free_tcp_endpoint()
    got = {}
    with Subscriber(endpoint, topics=("decision", "overlay")) as sub:
        proc = subprocess.Popen(linegate_cmd("run", "--bundle", str(bundle), "--source", f"folder:{line}",
                                             "--publish", endpoint, "--max-batch", "3", "--overlay-accepts", "1",
                                             "--wait-subscribers", "2"), stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while len(got) < 4 and time.monotonic() < deadline:
            msg = sub.recv(timeout_ms=1000)
            if msg is not None:
                got[(msg.topic, msg.header["source"])] = msg
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "frame geometry: tile:" in stderr
    a, b = got[("decision", "a_corner.png")].header, got[("decision", "b_dark.png")].header
    assert a["decision"] == "reject" and b["decision"] == "accept"
    assert abs(a["score"] - _expected_max(line / "a_corner.png", work)) < 1e-5
    assert abs(b["score"] - 40 / 255) < 1e-6
    overlay = got[("overlay", "a_corner.png")]
    assert (overlay.header["height"], overlay.header["width"]) == frame_size  # the whole frame


def test_hot_swap_between_a_stretched_and_a_tiled_bundle_loses_no_frame(tmp_path):
    from control_helpers import make_offset_bundle, start_line, wait_until
    from edge.control_api import ControlClient

    stretched = make_offset_bundle(tmp_path / "stretched", size=48)  # scores >= 10, model "tiny-offset"
    tiled, _, tiles = _tiled_tiny_bundle(tmp_path / "tiled", (64, 64), tile=32)  # scores <= 1, 4 tiles a frame
    assert len(tiles) == 4
    count = 400
    sources = [{"uri": f"synthetic:count={count},fps=150,size=64,seed={i}", "id": f"cam{i}"} for i in range(2)]
    run, col, endpoint, _ = start_line(tmp_path, stretched, sources)
    client = ControlClient(endpoint)
    try:
        wait_until(lambda: len(col.decisions()) >= 40, 30, "first decisions")
        swaps = []
        for target in (tiled, stretched, tiled):
            time.sleep(0.4)
            swaps.append(client.load(target)["model_id"])
        assert run.wait(60) == 0, run.log()
        time.sleep(0.5)
    finally:
        client.close()
        if run.proc.poll() is None:
            run.proc.terminate()
            run.wait(20)
        col.stop()
    tiled_id = json.loads((tiled / "manifest.json").read_text())["model_id"]
    assert swaps == [tiled_id, "tiny-offset", tiled_id]
    decisions = sorted((m.header for m in col.messages("decision")), key=lambda h: h["seq"])
    assert [d["seq"] for d in decisions] == list(range(2 * count))  # nothing lost across the swaps
    assert not [d for d in decisions if d["decision"] == "error"]  # frames queued across a swap re-prepared
    for d in decisions:  # the tiled bundle's scores are the max of its stitched map (<= 1)
        assert (d["score"] >= 10) == (d["model_id"] == "tiny-offset"), d
    models = [d["model_id"] for d in decisions]
    assert sum(models[i] != models[i - 1] for i in range(1, len(models))) == 3
