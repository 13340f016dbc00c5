import logging

import cv2
import numpy as np
import pytest

from training.data import SplitCounts, SplitFractions, load_images, make_split


def _write(path, image):
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), image)


def _folders(root, counts):
    for cls, n in counts.items():
        for i in range(n):
            _write(root / cls / f"{cls}{i:04d}.png", np.full((20, 20, 3), i % 256, np.uint8))


def test_folder_split_follows_the_protocol_counts(tmp_path):
    _folders(tmp_path, {"normal": 30, "chip": 12, "dirt": 20})
    counts = SplitCounts(train_normal=14, calib_normal=6, calib_per_anomaly=5, train_per_anomaly=2)
    split = make_split(tmp_path, "normal", seed=3, counts=counts)
    by = lambda items, cls: sum(c == cls for _, c in items)  # noqa: E731
    assert len(split.train) == 14 and by(split.train, "normal") == 14
    assert by(split.train_anomalous, "chip") == 2 and by(split.train_anomalous, "dirt") == 2
    assert (by(split.calibration, "normal"), by(split.calibration, "chip"), by(split.calibration, "dirt")) == (6, 5, 5)
    assert (by(split.test, "normal"), by(split.test, "chip"), by(split.test, "dirt")) == (10, 5, 13)
    every = [p for s in (split.train, split.train_anomalous, split.calibration, split.test) for p, _ in s]
    assert len(every) == len(set(every)) == 62  # no image in two sets, none lost
    again = make_split(tmp_path, "normal", seed=3, counts=counts)
    other = make_split(tmp_path, "normal", seed=4, counts=counts)
    assert again.to_json() == split.to_json()
    assert other.train != split.train


@pytest.mark.parametrize("normal, chip", [(1000, 40), (150, 12), (20, 4)])
def test_default_split_scales_with_the_data_set(tmp_path, normal, chip):
    _folders(tmp_path, {"normal": normal, "chip": chip})
    split = make_split(tmp_path, "normal", seed=1)  # the default: SplitFractions
    by = lambda items, cls: sum(c == cls for _, c in items)  # noqa: E731
    train, calib, test = len(split.train), by(split.calibration, "normal"), by(split.test, "normal")
    assert train + calib + test == normal
    assert train >= normal // 2  # most of the good images fit the model, whatever the size
    assert calib >= min(10, normal // 4) and test >= min(10, normal // 4)
    if normal >= 100:
        assert train == round(0.6 * normal) and calib == round(0.2 * normal)
    oe = by(split.train_anomalous, "chip")
    assert oe == (2 if chip >= 10 else 0)
    assert by(split.calibration, "chip") >= 1 and by(split.test, "chip") >= 1
    assert oe + by(split.calibration, "chip") + by(split.test, "chip") == chip
    every = [p for s in (split.train, split.train_anomalous, split.calibration, split.test) for p, _ in s]
    assert len(every) == len(set(every)) == normal + chip
    assert split.policy.startswith("auto") and split.to_json()["policy"] == split.policy
    assert make_split(tmp_path, "normal", seed=1).to_json() == split.to_json()
    assert make_split(tmp_path, "normal", seed=2).train != split.train
    fixed = make_split(tmp_path, "normal", seed=1, counts=SplitCounts(5, 3, 1, 0))
    assert len(fixed.train) == 5 and fixed.policy.startswith("fixed: 5 good fit")


def test_mvtec_layout_stratified_halves(tmp_path):
    for i in range(10):
        _write(tmp_path / "train" / "good" / f"{i:03d}.png", np.zeros((16, 16), np.uint8))
    for cls, n in {"good": 8, "crack": 6, "hole": 5}.items():
        for i in range(n):
            _write(tmp_path / "test" / cls / f"{i:03d}.png", np.zeros((16, 16), np.uint8))
    split = make_split(tmp_path, "normal", seed=0)
    assert split.layout == "mvtec" and len(split.train) == 10
    cal = {c: sum(x == c for _, x in split.calibration) for c in ("normal", "crack", "hole")}
    test = {c: sum(x == c for _, x in split.test) for c in ("normal", "crack", "hole")}
    assert cal == {"normal": 4, "crack": 3, "hole": 2} and test == {"normal": 4, "crack": 3, "hole": 3}


def test_missing_normal_class_is_a_clear_error(tmp_path):
    _folders(tmp_path, {"good": 5, "chip": 5})
    with pytest.raises(ValueError, match="no folder 'normal'.*--normal-class"):
        make_split(tmp_path, "normal")


def test_odd_inputs_load_and_a_corrupt_file_is_skipped(tmp_path, caplog):
    grey = tmp_path / "grey.png"
    cv2.imwrite(str(grey), np.full((31, 45), 200, np.uint8))
    rgba = tmp_path / "rgba.png"
    cv2.imwrite(str(rgba), np.dstack([np.full((50, 37, 3), (10, 20, 30), np.uint8), np.full((50, 37), 128, np.uint8)]))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    with caplog.at_level(logging.WARNING):
        loaded = load_images([(str(grey), "normal"), (str(bad), "normal"), (str(rgba), "chip")], (24, 24))
    assert loaded.tensors.shape == (2, 3, 24, 24)
    assert loaded.paths == [str(grey), str(rgba)] and loaded.skipped == [str(bad)]
    assert np.allclose(loaded.tensors[0], 200)
    assert np.allclose(loaded.tensors[1][:, 5, 5], [30, 20, 10])  # BGR on disk -> RGB
    assert str(bad) in caplog.text


def test_a_dataset_without_defect_classes_is_refused_by_the_split(tmp_path):
    """Calibration needs anomalous images: say so before any fitting, and say what to add."""
    _folders(tmp_path / "only", {"normal": 30})
    with pytest.raises(ValueError, match=r"only the normal class .*normal\) has images; .*add one folder of "
                                         r"images per defect class next to"):
        make_split(tmp_path / "only", "normal")
    _folders(tmp_path / "few", {"normal": 30, "chip": 1})  # too few for one in calibration and one in the test
    with pytest.raises(ValueError, match=r"defect classes \['chip'\] have too few images .*add images"):
        make_split(tmp_path / "few", "normal")
    for i in range(8):  # an MVTec test/ folder with good images only
        _write(tmp_path / "mv" / "train" / "good" / f"{i}.png", np.zeros((16, 16), np.uint8))
        _write(tmp_path / "mv" / "test" / "good" / f"{i}.png", np.zeros((16, 16), np.uint8))
    with pytest.raises(ValueError, match=r"only the normal class .*test/good\) has images"):
        make_split(tmp_path / "mv", "normal")
