"""The synthetic part generator: deterministic, varied, with visible localized defects."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from edge.images import read_image
from edge.synthetic import DEFECT_CLASSES, NORMAL_CLASS, PartGenerator, write_dataset

REPO = Path(__file__).resolve().parents[1]


def _grey(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)


def _part_mask(image: np.ndarray) -> np.ndarray:
    """The bright tablet against the dark tray (Otsu threshold)."""
    _, mask = cv2.threshold(_grey(image), 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return mask.astype(bool)


def test_same_seed_same_images():
    a, b = PartGenerator(seed=7), PartGenerator(seed=7)
    for label in (NORMAL_CLASS, *DEFECT_CLASSES, NORMAL_CLASS):
        assert np.array_equal(a.make(label), b.make(label))
    for _ in range(5):
        (ia, la), (ib, lb) = a.sample(0.5), b.sample(0.5)
        assert la == lb
        assert np.array_equal(ia, ib)


def test_different_seeds_and_successive_calls_differ():
    first = PartGenerator(seed=0).make()
    assert np.abs(first.astype(np.int16) - PartGenerator(seed=1).make()).mean() > 3
    gen = PartGenerator(seed=0)
    gen.make()
    assert np.abs(first.astype(np.int16) - gen.make()).mean() > 3


@pytest.mark.parametrize("size", [224, 96])
def test_shape_and_dtype(size):
    gen = PartGenerator(size=size, seed=3)
    for label in (NORMAL_CLASS, *DEFECT_CLASSES):
        image = gen.make(label)
        assert image.shape == (size, size, 3)
        assert image.dtype == np.uint8
    image, label = gen.sample()
    assert image.shape == (size, size, 3) and image.dtype == np.uint8
    assert label in (NORMAL_CLASS, *DEFECT_CLASSES)


def test_rejects_bad_arguments():
    gen = PartGenerator()
    with pytest.raises(ValueError, match="unknown label"):
        gen.make("crack")
    with pytest.raises(ValueError, match="defect_rate"):
        gen.sample(1.5)
    with pytest.raises(ValueError):
        PartGenerator(size=8)


def test_normal_parts_are_centred_but_vary():
    """One part near the centre, with real jitter in position and in light level."""
    gen = PartGenerator(seed=0)
    centroids, brightness, background = [], [], []
    for _ in range(12):
        image = gen.make()
        mask = _part_mask(image)
        ys, xs = np.nonzero(mask)
        centroids.append((xs.mean(), ys.mean()))
        brightness.append(_grey(image)[mask].mean())
        background.append(_grey(image)[~mask].mean())
        assert 0.2 < mask.mean() < 0.35  # one tablet (about 26 % of the frame), not a speck
    centroids = np.array(centroids)
    assert np.abs(centroids - 112).max() < 0.07 * 224
    assert centroids.std(axis=0).min() > 1.0  # position jitter
    assert np.std(brightness) > 5  # light level varies
    assert min(brightness) - max(background) > 40  # still a clear part on a plain tray


@pytest.mark.parametrize("label", DEFECT_CLASSES)
@pytest.mark.parametrize("seed", range(4))
def test_defect_is_a_visible_localized_change(label, seed):
    # make() draws the same seeds whatever the label, so the n-th images of two generators
    # with one seed are the same part under the same light and noise, whatever labels came
    # before; they differ only where the defect was drawn.
    gen_n, gen_d = PartGenerator(seed=seed), PartGenerator(seed=seed)
    gen_n.make(NORMAL_CLASS)
    gen_d.make(DEFECT_CLASSES[seed % len(DEFECT_CLASSES)])
    normal, defect = gen_n.make(NORMAL_CLASS), gen_d.make(label)
    diff = np.abs(normal.astype(np.int16) - defect).max(axis=2)
    changed = diff > 25
    assert 0.002 < changed.mean() < 0.06  # visible, yet small next to the part
    assert (diff > 3).mean() < 0.1  # everything else untouched (a chip's shadow moves a little)
    grey_n, grey_d = _grey(normal).astype(np.float32), _grey(defect).astype(np.float32)
    part = _part_mask(normal)
    assert np.abs(grey_n - grey_d)[changed].mean() > 25
    if label == "chip":
        # Where the rim was, the tray now shows: dark, like the background.
        tray = np.median(grey_n[~part])
        assert part[changed].mean() > 0.8
        assert np.abs(np.median(grey_d[changed]) - tray) < 25
        ys, xs = np.nonzero(changed)
        assert np.hypot(xs - 112, ys - 112).min() > 0.15 * 224  # at the edge, not the middle
    else:
        assert part[changed].mean() > 0.97  # drawn on the part, not on the tray
    if label == "spot":
        assert (grey_n - grey_d)[changed].mean() > 40  # dark dirt


def test_sample_respects_defect_rate():
    gen = PartGenerator(size=64, seed=5)  # small images: only the labels matter here
    labels = [gen.sample(0.3)[1] for _ in range(400)]
    n_defect = sum(label != NORMAL_CLASS for label in labels)
    assert 90 <= n_defect <= 150  # expected 120, sd about 9
    for cls in DEFECT_CLASSES:
        assert labels.count(cls) >= 20  # uniform over classes: expected 40 each
    assert all(gen.sample(0.0)[1] == NORMAL_CLASS for _ in range(30))
    assert all(gen.sample(1.0)[1] in DEFECT_CLASSES for _ in range(30))


def test_write_dataset(tmp_path):
    counts = write_dataset(tmp_path, n_normal=3, n_per_defect=2, size=64, seed=4)
    assert counts == {NORMAL_CLASS: 3, "scratch": 2, "spot": 2, "chip": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(counts)
    files = sorted((tmp_path / NORMAL_CLASS).iterdir())
    assert [p.name for p in files] == ["normal_0000.png", "normal_0001.png", "normal_0002.png"]
    # Files hold exactly what the generator made, in RGB order once read back.
    gen = PartGenerator(size=64, seed=4)
    for path in files:
        assert np.array_equal(read_image(path), gen.make(NORMAL_CLASS))
    for cls in DEFECT_CLASSES:
        paths = sorted((tmp_path / cls).glob("*.png"))
        assert [p.name for p in paths] == [f"{cls}_0000.png", f"{cls}_0001.png"]
        assert all(read_image(p).shape == (64, 64, 3) for p in paths)

    # A smaller rerun leaves no stale images behind, and leaves other files alone.
    (tmp_path / NORMAL_CLASS / "notes.txt").write_text("mine")
    assert write_dataset(tmp_path, n_normal=1, n_per_defect=0, size=64)[NORMAL_CLASS] == 1
    assert sorted(p.name for p in (tmp_path / NORMAL_CLASS).iterdir()) == ["normal_0000.png", "notes.txt"]
    assert list((tmp_path / "chip").iterdir()) == []
