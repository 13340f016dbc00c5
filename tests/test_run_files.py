"""A run directory's files as they arrive in practice: copied without the dataset, cut short,
hand-edited, written by another PyTorch; and the training options checked before any work.

One small PaDiM run is trained per module on a synthetic dataset written to a temporary folder
(64 px, seconds); tests that change a run work on a copy.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from conftest import linegate_cmd, read_json
from export.onnx_export import export_onnx
from training.backbone import load_backbone
from training.data import SplitCounts
from training.detectors import DETECTORS
from training.padim import COV_EPS, PaDiMModel, select_channels
from training.train import evaluate, load_run, train

SIZE = 64
COUNTS = SplitCounts(train_normal=8, calib_normal=4, calib_per_anomaly=3, train_per_anomaly=1)


def _dataset(root: Path) -> Path:
    """Textured normal images; "spot" images carry a bright square the detector can find."""
    rng = np.random.default_rng(0)
    for cls, n in (("normal", 16), ("spot", 7)):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            image = rng.integers(60, 100, (48, 48, 3), dtype=np.uint8)
            if cls == "spot":
                y, x = rng.integers(4, 30, 2)
                image[y:y + 14, x:x + 14] = 250
            cv2.imwrite(str(root / cls / f"{cls}{i:02d}.png"), image)
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runfiles")
    out = root / "run"
    train(_dataset(root / "data"), out, "normal", "padim", seed=0, image_size=SIZE, counts=COUNTS,
          dims=12, report=False)
    return out


@pytest.fixture
def copy(run, tmp_path) -> Path:
    dest = tmp_path / "run"
    shutil.copytree(run, dest)
    return dest


def _edit(path: Path, change) -> None:
    data = read_json(path)
    change(data)
    path.write_text(json.dumps(data))


def _scores(model: torch.nn.Module, seed: int = 1) -> torch.Tensor:
    pixels = torch.rand(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)) * 255
    with torch.no_grad():
        return model(pixels)[0]


# --- item: PaDiM channels are stored, not re-drawn ------------------------------------------

def test_run_json_holds_the_channels_model_pt_holds(run):
    meta = read_json(run / "run.json")
    state = torch.load(run / "model.pt", weights_only=True)
    assert meta["dims"] == 12  # the --dims given, not the default (100)
    assert meta["channels"] == state["channels"].tolist()


def test_a_run_whose_channels_are_not_the_seeds_choice_loads_and_scores_the_same(copy):
    """As if torch.randperm had drawn differently when the run was trained: run.json's list wins."""
    meta = read_json(copy / "run.json")
    other = select_channels(meta["seed"] + 7, meta["dims"])
    assert not torch.equal(other, select_channels(meta["seed"], meta["dims"]))
    model = PaDiMModel(load_backbone("imagenet", SIZE), other)
    emb = model.embed(torch.rand(6, 3, SIZE, SIZE) * 255).double()
    x = emb.reshape(6, 12, -1).permute(2, 0, 1)
    cov = torch.einsum("pni,pnj->pij", x - x.mean(1, keepdim=True), x - x.mean(1, keepdim=True)) / 5
    model.set_gaussians(x.mean(1), cov + COV_EPS * torch.eye(12, dtype=torch.float64))
    torch.save(model.state_dict(), copy / "model.pt")
    _edit(copy / "run.json", lambda m: m.update(DETECTORS["padim"].shape(model)))

    loaded, _ = load_run(copy)
    assert torch.equal(loaded.channels, other)
    torch.testing.assert_close(_scores(loaded), _scores(model), rtol=0, atol=0)

    # a run.json without the list (runs before it) rebuilds the seed's channels: refused, not misread
    _edit(copy / "run.json", lambda m: m.pop("channels"))
    with pytest.raises(ValueError, match=r"model\.pt: its PaDiM channels .* differ .*re-train the run"):
        load_run(copy)


def test_old_runs_without_the_channel_list_still_load(copy):
    before, _ = load_run(copy)
    _edit(copy / "run.json", lambda m: m.pop("channels"))
    after, _ = load_run(copy)
    torch.testing.assert_close(_scores(after), _scores(before), rtol=0, atol=0)


def test_run_json_and_model_pt_hold_the_neighbourhood_and_must_agree(copy):
    """The feature neighbourhood changes what is computed, so run.json and model.pt both hold
    it: a run.json that lost or changed it is refused, not misread."""
    meta = read_json(copy / "run.json")
    assert meta["neighbourhood"] == 3  # training's default
    pooled, _ = load_run(copy)
    assert pooled.neighbourhood == 3
    _edit(copy / "run.json", lambda m: m.pop("neighbourhood"))  # would load as raw features (below)
    with pytest.raises(ValueError, match=r"model\.pt was fitted with PaDiM neighbourhood 3, run\.json gives 1: "
                                         r"set run\.json \"neighbourhood\" to 3"):
        load_run(copy)
    _edit(copy / "run.json", lambda m: m.update(neighbourhood=4))
    with pytest.raises(ValueError, match=r"run\.json: 'neighbourhood' 4: must be an odd integer >= 1 \(put back "
                                         r"the value the run was trained with"):
        load_run(copy)


def test_runs_saved_before_the_neighbourhood_load_as_raw_padim(copy):
    """model.pt and run.json from before the option hold neither: fitted on raw features."""
    pooled, _ = load_run(copy)
    state = torch.load(copy / "model.pt", weights_only=True)
    del state["neighbourhood_size"]
    torch.save(state, copy / "model.pt")
    _edit(copy / "run.json", lambda m: m.pop("neighbourhood"))
    raw, _ = load_run(copy)
    assert raw.neighbourhood == 1
    assert not torch.allclose(_scores(raw), _scores(pooled))  # the same weights on other features
    _edit(copy / "run.json", lambda m: m.update(neighbourhood=3))  # such a model.pt is raw: refused
    with pytest.raises(ValueError, match=r"model\.pt was fitted with PaDiM neighbourhood 1, run\.json gives 3"):
        load_run(copy)


def test_a_malformed_channel_list_names_run_json(copy):
    _edit(copy / "run.json", lambda m: m.update(channels=[3, 1, 2]))
    with pytest.raises(ValueError, match=r"run\.json: 'channels' must be 12 \(dims\) sorted"):
        load_run(copy)


# --- item: unreadable calibration / test images ---------------------------------------------

def test_export_without_the_calibration_images_names_them_and_leaves_no_tmp(copy):
    _edit(copy / "split.json", lambda s: s.update(calibration=[["/nowhere/a.png", "normal"],
                                                               ["/nowhere/b.png", "spot"]]))
    with pytest.raises(ValueError, match=r"none of the 2 calibration images in .*split\.json can be read "
                                         r"\(/nowhere/a\.png, /nowhere/b\.png\); restore the dataset"):
        export_onnx(copy)
    assert not (copy / "bundle.tmp").exists() and not (copy / "bundle").exists()


def test_export_of_a_split_without_calibration_names_the_key(copy):
    _edit(copy / "split.json", lambda s: s.pop("calibration"))
    with pytest.raises(ValueError, match=r"split\.json: no key 'calibration'; re-train the run"):
        export_onnx(copy)
    assert not (copy / "bundle.tmp").exists()


def test_export_still_writes_a_bundle_and_no_tmp(copy):
    bundle = export_onnx(copy)
    manifest = read_json(bundle / "manifest.json")
    assert manifest["parity"]["decision_mismatches"] == 0 and manifest["parity"]["images"] == 7
    assert not (copy / "bundle.tmp").exists()


def test_evaluate_with_no_readable_test_image_fails_clearly_and_keeps_run_json(copy):
    before = (copy / "run.json").read_text()
    _edit(copy / "split.json", lambda s: s.update(test=[[p + ".gone", c] for p, c in s["test"]]))
    with pytest.raises(ValueError, match=r"none of the \d+ test images in .*split\.json can be read"):
        evaluate(copy, aggregate="max", report=False)
    assert (copy / "run.json").read_text() == before  # the new aggregate is stored only on success


# --- item: malformed run files ---------------------------------------------------------------

def test_a_truncated_metrics_json_is_named_with_what_to_do(copy):
    text = (copy / "metrics.json").read_text()
    (copy / "metrics.json").write_text(text[:40])
    with pytest.raises(ValueError, match=r"metrics\.json: not valid JSON .*re-run `linegate evaluate "):
        export_onnx(copy)
    # ... and evaluate, the cure, is not stopped by it
    metrics = evaluate(copy, report=False)
    assert read_json(copy / "metrics.json")["calibration"] == metrics["calibration"]


@pytest.mark.parametrize("file, remove, message", [
    ("metrics.json", ("calibration", "display_range"),
     r"metrics\.json: no key 'calibration\.display_range'; re-run `linegate evaluate "),
    ("run.json", ("map_size",), r"run\.json: no key 'map_size'; re-train the run"),
    ("run.json", ("image_size",), r"run\.json: no key 'image_size'; re-train the run"),
])
def test_a_missing_key_is_named_with_its_file(copy, file, remove, message):
    def drop(data):
        for key in remove[:-1]:
            data = data[key]
        del data[remove[-1]]

    _edit(copy / file, drop)
    with pytest.raises(ValueError, match=message):
        export_onnx(copy)
    assert not (copy / "bundle.tmp").exists()


def test_the_cli_reports_a_malformed_run_without_a_traceback(copy):
    _edit(copy / "run.json", lambda m: m.pop("map_size"))
    proc = subprocess.run(linegate_cmd("export", "onnx", str(copy)), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "no key 'map_size'" in proc.stderr and "Traceback" not in proc.stderr


# --- item: evaluate keeps training facts, writes run.json last -------------------------------

def test_evaluate_keeps_the_training_time_skipped_files(copy):
    split = read_json(copy / "split.json")
    trained, calibrated = split["train"][0][0], split["calibration"][0][0]
    # as training records them: an unreadable training image, and a calibration one that is
    # readable again now (so re-evaluation must drop it)
    _edit(copy / "metrics.json", lambda m: m.update(skipped=[trained, calibrated]))
    metrics = evaluate(copy, aggregate="max", report=False)
    assert metrics["skipped"] == [trained] == read_json(copy / "metrics.json")["skipped"]
    assert read_json(copy / "run.json")["aggregate"] == "max"


# --- item: options checked before any work ---------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    ({"dims": 0}, r"--dims 0: must be an integer in 1\.\.176"),
    ({"dims": 177}, r"--dims 177: must be an integer in 1\.\.176"),
    ({"image_size": 16}, r"--image-size 16: must be an integer of at least 32"),
    ({"batch_size": 0}, r"--batch-size 0: must be an integer of at least 1"),
    ({"neighbourhood": 2}, r"--neighbourhood 2: must be an odd integer >= 1"),
    ({"neighbourhood": 0}, r"--neighbourhood 0: must be an odd integer >= 1"),
    ({"model": "patchcore", "neighbourhood": 3}, r"--neighbourhood applies to padim only, not patchcore"),
    ({"neighbourhood": 29}, r"--neighbourhood 29: at --image-size 224 the coarsest feature map is 14 x 14, and a "
                            r"window wider than 27"),
])
def test_out_of_range_numbers_fail_before_any_work(tmp_path, kwargs, message):
    data = _dataset(tmp_path / "data")
    with pytest.raises(ValueError, match=message):
        train(data, tmp_path / "run", **kwargs)
    assert not (tmp_path / "run").exists()


def test_the_command_line_refuses_a_bad_neighbourhood_before_any_work(tmp_path):
    data = _dataset(tmp_path / "data")
    for args, message in ((["--neighbourhood", "2"], "--neighbourhood 2: must be an odd integer >= 1"),
                          (["--model", "fcdd", "--neighbourhood", "3"], "--neighbourhood applies to padim only")):
        proc = subprocess.run(linegate_cmd("train", str(data), "--out", str(tmp_path / "run"), *args),
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
        assert not (tmp_path / "run").exists()


def test_a_dataset_with_only_the_normal_class_fails_before_fitting(tmp_path):
    data = _dataset(tmp_path / "data")
    shutil.rmtree(data / "spot")
    with pytest.raises(ValueError, match=r"only the normal class .* add one folder of images per defect class"):
        train(data, tmp_path / "run", model="fcdd", image_size=SIZE, counts=COUNTS)
    assert not (tmp_path / "run" / "model.pt").exists()
