"""Elongated frames not much larger than the input: `--geometry auto` gives them an input
that follows their aspect ratio (a non-square model), and the exported bundle scores them
as training did."""
import csv

import cv2
import numpy as np
import pytest

from conftest import read_json
from edge.active import ActiveModel
from edge.bundle import load_bundle
from edge.decision import DecisionRule
from edge.engine import open_engine
from edge.images import read_image
from training.data import SplitCounts

COUNTS = SplitCounts(train_normal=10, calib_normal=4, calib_per_anomaly=3, train_per_anomaly=1)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from export.onnx_export import export_onnx
    from training.train import train

    root = tmp_path_factory.mktemp("aspect")
    rng = np.random.default_rng(0)
    for cls, n in (("normal", 20), ("spot", 8)):
        (root / "data" / cls).mkdir(parents=True)
        for i in range(n):
            image = rng.integers(60, 100, (160, 64, 3), dtype=np.uint8)  # 2.5 : 1 portrait
            if cls == "spot":
                y, x = rng.integers(4, 140), rng.integers(4, 48)
                image[y:y + 12, x:x + 12] = 250
            cv2.imwrite(str(root / "data" / cls / f"{cls}{i:02d}.png"), image)
    out = root / "run"
    train(root / "data", out, "normal", "padim", seed=0, image_size=64, counts=COUNTS, dims=12, report=False)
    export_onnx(out)
    return out


def test_auto_keeps_the_aspect_ratio_and_the_bundle_scores_as_training_did(run):
    meta = read_json(run / "run.json")
    assert meta["geometry"]["mode"] == "aspect"
    assert meta["image_size"] == [96, 32] and meta["map_size"] == [24, 8]  # portrait, multiples of 32
    bundle = load_bundle(run / "bundle")
    assert bundle.input_size == (96, 32) and bundle.geometry.mode == "aspect"
    active = ActiveModel.build(bundle, open_engine(bundle), DecisionRule.from_bundle(bundle))
    with open(run / "predictions.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r["set"] == "test"]
    batch = np.stack([active.preprocess(read_image(r["path"])) for r in rows])
    scores, maps = active.infer(batch)
    assert maps.shape == (len(rows), 24, 8)
    decisions = active.decide(["cam0"] * len(rows), scores, maps)
    np.testing.assert_allclose([d.score for d in decisions], [float(r["score"]) for r in rows], rtol=1e-3)
    assert [d.decision for d in decisions] == [r["decision"] for r in rows]
    assert read_json(run / "metrics.json")["test"]["auroc"] > 0.9  # the spots are found
