"""`linegate train --augment jpeg[:Q]`: JPEG-compressed copies of the normal training images.

A model fitted on lossless synthetic parts takes JPEG's block artefacts for an anomaly (the
demo's bundle scored a normal part 9.1 as PNG, 22.4 as JPEG q95, over a 21.3 threshold). Here,
on small synthetic parts: a good part's JPEG round trip scores far above the PNG without the
copies, close to it with them, and a real defect is still found.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import read_json
from edge.synthetic import PartGenerator, write_dataset
from training.augment import jpeg_quality, jpeg_round_trip, parse_augment
from training.data import SplitCounts
from training.train import load_run, train

SIZE = 64
COUNTS = SplitCounts(train_normal=16, calib_normal=6, calib_per_anomaly=2, train_per_anomaly=0)
QUALITY = 80


def _score(run, rgb: np.ndarray) -> float:
    model, _ = load_run(run)
    with torch.no_grad():
        return float(model(torch.from_numpy(rgb.transpose(2, 0, 1).copy()).float()[None])[0][0])


@pytest.mark.parametrize("spec, mirrors, quality", [("jpeg", (), 75), ("jpeg:80", (), 80),
                                                    ("hflip, JPEG:95", ("hflip",), 95), ("hflip", ("hflip",), None)])
def test_jpeg_augment_names(spec, mirrors, quality):
    assert parse_augment(spec) == mirrors and jpeg_quality(spec) == quality


@pytest.mark.parametrize("spec", ["jpeg:0", "jpeg:101", "jpeg:x", "jpegs", "jpeg,jpeg:80"])
def test_bad_jpeg_augment_is_refused_naming_it(spec):
    with pytest.raises(ValueError, match=rf"--augment '{spec}'"):
        parse_augment(spec)


def test_jpeg_copies_make_a_compressed_good_part_normal(tmp_path):
    data = tmp_path / "data"
    write_dataset(data, 26, 3, size=SIZE, seed=0)
    plain, robust = tmp_path / "plain", tmp_path / "robust"
    train(data, plain, model="padim", image_size=SIZE, counts=COUNTS, report=False)
    train(data, robust, model="padim", image_size=SIZE, counts=COUNTS, augment=f"jpeg:{QUALITY}", report=True)
    meta = read_json(robust / "run.json")
    assert meta["augment"] == [f"jpeg:{QUALITY}"] and meta["train_images"] == 2 * COUNTS.train_normal
    assert (f"fitted on {2 * COUNTS.train_normal} normal images including JPEG copies (jpeg:{QUALITY}, qualities "
            f"from {QUALITY} to 95)") in (robust / "report" / "report.html").read_text()
    gen = PartGenerator(size=SIZE, seed=99)  # parts no model saw
    goods = [gen.make("normal") for _ in range(6)]
    spots = [gen.make("spot") for _ in range(6)]

    def mean_score(run, images, quality=None):
        return float(np.mean([_score(run, jpeg_round_trip(i, quality) if quality else i) for i in images]))

    # without the copies the compression alone looks like a defect; with them it does not
    plain_png, plain_jpeg = mean_score(plain, goods), mean_score(plain, goods, QUALITY)
    robust_png, robust_jpeg = mean_score(robust, goods), mean_score(robust, goods, QUALITY)
    assert plain_jpeg > 1.5 * plain_png, (plain_png, plain_jpeg)
    assert robust_jpeg < 1.2 * robust_png, (robust_png, robust_jpeg)
    # and a defect, compressed like everything else, still scores above the good parts
    assert mean_score(robust, spots, QUALITY) > 1.3 * robust_jpeg
