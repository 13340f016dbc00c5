"""Tiling on real frames (KolektorSDD, 500 x ~1250): a PaDiM trained with the default
geometry (tiled here) gives the same maps and decisions in the edge runtime as in offline
evaluation. A small subset at 64 px so that it trains in seconds; the geometry is chosen by
`--geometry auto` from the frames' sizes as a user's run would."""
import csv
import os
import subprocess
import time

import numpy as np
import pytest

from conftest import free_tcp_endpoint, linegate_cmd, read_json
from edge.active import ActiveModel
from edge.bundle import load_bundle
from edge.decision import DecisionRule, aggregate_maps
from edge.engine import open_engine
from edge.frames import Frame
from edge.images import read_image
from edge.pipeline import Pipeline
from edge.subscriber import Subscriber
from training.data import SplitCounts

pytestmark = pytest.mark.kolektorsdd
SIZE = 64
COUNTS = SplitCounts(train_normal=10, calib_normal=4, calib_per_anomaly=3, train_per_anomaly=1)


@pytest.fixture(scope="module")
def run(kolektorsdd, tmp_path_factory):
    from export.onnx_export import export_onnx
    from training.train import train

    root = tmp_path_factory.mktemp("kolektorsdd")
    data = root / "data"
    for cls, n in (("good", 20), ("defect", 8)):  # linked, never copied
        (data / cls).mkdir(parents=True)
        for f in sorted((kolektorsdd / cls).iterdir())[:n]:
            os.symlink(f, data / cls / f.name)
    out = root / "run"
    train(data, out, "good", "padim", seed=0, image_size=SIZE, counts=COUNTS, dims=16, report=False)
    export_onnx(out)
    return out


def _test_rows(run):
    with open(run / "predictions.csv") as fh:
        return [r for r in csv.DictReader(fh) if r["set"] == "test"]


def test_the_default_geometry_tiles_these_frames(run):
    meta = read_json(run / "run.json")
    geometry = load_bundle(run / "bundle").manifest["geometry"]
    assert geometry == meta["geometry"]
    assert geometry["mode"] == "tile" and geometry["input"] == [SIZE, SIZE] and len(geometry["tiles"]) > 1
    h, w = geometry["frame"]
    assert 1230 <= h <= 1290 and w == 500
    assert geometry["work"][0] > geometry["work"][1]  # portrait kept


def test_runtime_maps_equal_offline_maps(run):
    from training.geometry import frame_maps, geometry_of_run, load_prepared
    from training.train import load_run, predict

    rows = _test_rows(run)
    model, meta = load_run(run)
    geometry = geometry_of_run(meta)
    images = load_prepared([(r["path"], r["class"]) for r in rows], geometry)
    offline_scores, offline_maps = frame_maps(predict, model, images, geometry, 8, "offline")

    bundle = load_bundle(run / "bundle")
    active = ActiveModel.build(bundle, open_engine(bundle), DecisionRule.from_bundle(bundle))
    assert active.geometry == geometry  # the bundle's geometry is the run's
    frames = []
    for i, r in enumerate(rows):
        frame = Frame("cam0", i, time.time(), read_image(r["path"]))
        frame.tensor = active.preprocess(frame.image)
        frames.append(frame)
    buffer = np.empty((5, *active.geometry.tensor_shape), np.float32)  # 5: tiles of frames share calls
    scores, maps = Pipeline._infer_tiles(active, frames, buffer)
    assert scores is None and maps.shape == offline_maps.shape
    np.testing.assert_allclose(maps, offline_maps, rtol=1e-3, atol=1e-3 * float(offline_maps.max()))
    decisions = active.decide(["cam0"] * len(rows), None, maps)
    assert [d.decision for d in decisions] == [r["decision"] for r in rows]
    np.testing.assert_allclose([d.score for d in decisions], [float(r["score"]) for r in rows], rtol=1e-3)
    # offline evaluation's own image scores: the calibrated aggregate of its stitched maps
    offline_image_scores = aggregate_maps(offline_maps, bundle.decision["aggregate"])
    np.testing.assert_allclose(offline_image_scores, [float(r["score"]) for r in rows], rtol=1e-5)
    np.testing.assert_allclose(offline_scores, aggregate_maps(offline_maps, "mean"), rtol=1e-6)


def test_linegate_run_decisions_equal_offline_evaluation(run, tmp_path):
    rows = _test_rows(run)
    assert {r["class"] for r in rows} == {"good", "defect"}
    folder = tmp_path / "line"
    folder.mkdir()
    for r in rows:
        os.symlink(r["path"], folder / os.path.basename(r["path"]))
    endpoint = free_tcp_endpoint()
    got = []
    with Subscriber(endpoint) as sub:
        proc = subprocess.Popen(linegate_cmd("run", "--bundle", str(run / "bundle"), "--source", f"folder:{folder}",
                                             "--publish", endpoint, "--max-batch", "4", "--wait-subscribers", "1"),
                                stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while len(got) < len(rows) and time.monotonic() < deadline:
            msg = sub.recv(timeout_ms=1000)
            if msg is not None:
                got.append(msg.header)
        extra = sub.recv(timeout_ms=1500)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert extra is None and len(got) == len(rows)
    offline = {os.path.basename(r["path"]): r for r in rows}
    assert sorted(h["source"] for h in got) == sorted(offline)
    for h in got:
        expected = offline[h["source"]]
        assert "error" not in h, h
        assert h["decision"] == expected["decision"], h["source"]
        assert h["score"] == pytest.approx(float(expected["score"]), rel=1e-3)
