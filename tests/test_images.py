"""Resizing frames to the model input: the "staged" mode new bundles use against OpenCV's
INTER_AREA, on a real pill image at camera-like sizes."""
import cv2
import numpy as np
import pytest

from edge.images import preprocess, read_image, resize


@pytest.mark.pillqc
def test_staged_resize_stays_close_to_area_averaging(pillqc):
    photo = read_image(sorted((pillqc / "dirt").iterdir())[0])
    for width, height in ((225, 225), (300, 260), (640, 480), (1280, 1024)):
        frame = cv2.resize(photo, (width, height), interpolation=cv2.INTER_CUBIC)
        area = resize(frame, (224, 224), "area").astype(np.float32)
        staged = resize(frame, (224, 224), "staged").astype(np.float32)
        assert area.shape == staged.shape == (224, 224, 3)
        assert np.abs(area - staged).mean() < 2.0, (width, height)  # grey levels, 0..255
        np.testing.assert_array_equal(area, cv2.resize(frame, (224, 224), interpolation=cv2.INTER_AREA))


def test_staged_resize_box_averages_whole_factors_and_passes_the_target_size_through():
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (448, 672, 3), dtype=np.uint8)
    # 2x and 3x: an exact box average (INTER_AREA's integer path), no bilinear step after it
    box = frame.reshape(224, 2, 224, 3, 3).astype(np.float64).mean(axis=(1, 3))
    staged = resize(frame, (224, 224), "staged")
    assert np.abs(staged - box).max() <= 0.5 + 1e-9  # rounding only
    same = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
    assert resize(same, (224, 224), "staged") is same
    # enlarging is bilinear in both modes
    small = rng.integers(0, 256, (100, 100, 3), dtype=np.uint8)
    np.testing.assert_array_equal(resize(small, (224, 224), "staged"), resize(small, (224, 224), "area"))
    tensor = preprocess(frame, (224, 224), "staged")
    assert tensor.shape == (3, 224, 224) and tensor.dtype == np.float32
    np.testing.assert_array_equal(tensor, staged.transpose(2, 0, 1))
    with pytest.raises(ValueError, match="unknown interpolation 'lanczos'"):
        resize(frame, (224, 224), "lanczos")


@pytest.mark.pillqc
def test_runs_record_their_resize_and_runs_from_before_it_keep_area(small_runs, tmp_path):
    import json
    import shutil

    from edge.bundle import load_bundle
    from export.onnx_export import export_onnx

    run = small_runs("padim")
    assert json.loads((run / "run.json").read_text())["interpolation"] == "staged"
    assert load_bundle(run / "bundle").interpolation == "staged"
    old = tmp_path / "old"
    shutil.copytree(run, old, ignore=shutil.ignore_patterns("bundle", "report"))
    meta = json.loads((old / "run.json").read_text())
    del meta["interpolation"]  # as run.json was written before the key existed
    (old / "run.json").write_text(json.dumps(meta))
    assert load_bundle(export_onnx(old)).interpolation == "area"
