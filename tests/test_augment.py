"""`linegate train --augment`: mirrored copies of the normal training images (PaDiM, PatchCore).

The mirrors are checked on a hand-made tensor, the option before any work, and what a user
gets from it on a tiny synthetic line whose good parts all carry a mark on the left: without
mirrors a part with the mark on the right is an anomaly, with `hflip` it is not.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from conftest import read_json
from export.onnx_export import export_onnx
from training.augment import parse_augment, with_mirrors
from training.data import SplitCounts
from training.padim import DEFAULT_DIMS
from training.train import load_run, train

SIZE = 64
COUNTS = SplitCounts(train_normal=10, calib_normal=4, calib_per_anomaly=3, train_per_anomaly=1)


def test_mirrors_of_a_hand_made_image():
    image = torch.arange(6.0).reshape(1, 1, 2, 3)  # rows [0 1 2], [3 4 5]
    h = with_mirrors(image, ("hflip",))
    assert h.shape == (2, 1, 2, 3)
    assert h[1, 0].tolist() == [[2, 1, 0], [5, 4, 3]]
    both = with_mirrors(image, ("hflip", "vflip"))
    assert [x[0].tolist() for x in both] == [[[0, 1, 2], [3, 4, 5]], [[2, 1, 0], [5, 4, 3]],
                                             [[3, 4, 5], [0, 1, 2]], [[5, 4, 3], [2, 1, 0]]]  # last: a half turn
    assert with_mirrors(image, ()).shape == image.shape


@pytest.mark.parametrize("spec, expected", [(None, ()), ("none", ()), ("", ()), ("hflip", ("hflip",)),
                                            ("VFLIP", ("vflip",)), ("vflip, hflip", ("hflip", "vflip"))])
def test_augment_names(spec, expected):
    assert parse_augment(spec) == expected


@pytest.mark.parametrize("spec", ["rot90", "hflip,hflip", "hflip,x", " , ", "hflip,"])
def test_unknown_augment_is_refused_naming_it(spec):
    with pytest.raises(ValueError, match=rf"--augment '{spec}': give hflip, vflip or hflip,vflip"):
        parse_augment(spec)


def _marked(root: Path) -> Path:
    """Good parts: noise with a bright bar near the left edge. Defects: a dark square."""
    rng = np.random.default_rng(0)
    for cls, n in (("normal", 18), ("hole", 7)):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            image = rng.integers(90, 130, (SIZE, SIZE, 3), dtype=np.uint8)
            image[8:56, 6:14] = 240
            if cls == "hole":
                y, x = rng.integers(20, 40, 2)
                image[y:y + 14, x:x + 14] = 10
            cv2.imwrite(str(root / cls / f"{cls}{i:02d}.png"), image)
    return root


def _score(run: Path, image: np.ndarray) -> float:
    model, _ = load_run(run)
    pixels = torch.from_numpy(image[:, :, ::-1].transpose(2, 0, 1).copy()).float()[None]  # BGR file -> RGB
    with torch.no_grad():  # the map's max: the bar is a local difference, which the mean dilutes
        return float(model(pixels)[1].amax())


@pytest.mark.parametrize("model", ["padim", "patchcore"])
def test_hflip_makes_a_mirrored_good_part_normal(tmp_path, model):
    data = _marked(tmp_path / "data")
    plain, mirrored = tmp_path / "plain", tmp_path / "mirrored"
    # stretch: the 225 px images would be tiled at 64 px (--geometry auto), which is not what this tests
    train(data, plain, model=model, image_size=SIZE, counts=COUNTS, report=False, geometry="stretch")
    train(data, mirrored, model=model, image_size=SIZE, counts=COUNTS, augment="hflip", report=model == "padim",
          geometry="stretch")
    meta = read_json(mirrored / "run.json")
    assert meta["augment"] == ["hflip"] and meta["train_images"] == 2 * COUNTS.train_normal
    assert read_json(plain / "run.json")["augment"] == []
    if model == "padim":
        assert meta["dims"] == read_json(plain / "run.json")["dims"] == DEFAULT_DIMS  # mirrors or not
        # the report and the bundle say what it learned from: a mirrored part passes this model
        assert ("fitted on 20 normal images including mirrors (hflip): a mirrored part counts as normal"
                in (mirrored / "report" / "report.html").read_text())
        export_onnx(mirrored)
        training = read_json(mirrored / "bundle" / "manifest.json")["training"]
        assert training == {"seed": 0, "augment": ["hflip"], "train_images": 2 * COUNTS.train_normal}
    good = cv2.imread(str(data / "normal" / "normal00.png"))
    flipped = np.ascontiguousarray(good[:, ::-1])
    # without mirrors the bar on the wrong side is far from normal (the map's max: PaDiM 5.8x the good
    # part's; PatchCore, whose patches do not know where they are, only by the bar's side of the
    # frame's border: 1.37x with two-stage patches, 1.22x with today's three); with them it is
    # normal (0.94x, 1.09x)
    assert _score(plain, flipped) > 1.15 * _score(plain, good)
    assert _score(mirrored, flipped) < 1.1 * _score(mirrored, good)
    # and a real defect is still found (3.2x, 2.25x)
    hole = cv2.imread(str(data / "hole" / "hole00.png"))
    assert _score(mirrored, hole) > 1.5 * _score(mirrored, flipped)


def test_fcdd_refuses_augment_before_any_work(tmp_path):
    data = _marked(tmp_path / "data")
    with pytest.raises(ValueError, match=r"--augment applies to padim, patchcore only: fcdd already trains "
                                         r"with random flips"):
        train(data, tmp_path / "run", model="fcdd", image_size=SIZE, counts=COUNTS, augment="hflip")
    assert not (tmp_path / "run").exists()
