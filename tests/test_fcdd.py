"""FCDD: the loss, the augmentations, the Gaussian heatmap upsampling, and training on real
pill images end to end (few epochs, 64 px) through export with its parity check."""
import csv
import math

import numpy as np
import pytest
import torch

from conftest import read_json
from edge.overlay import gaussian_upsample
from training.fcdd import FCDDHead
from training.fcdd_train import confetti_noise, dihedral, fcdd_loss


def test_fcdd_loss_hand_computed():
    amap = torch.zeros(3, 2, 2)
    amap[0] = torch.tensor([[0.0, 0.2], [0.2, 0.0]])  # normal: mean A = 0.1
    amap[1] = torch.tensor([[1.0, 1.0], [1.0, 3.0]])  # anomalous: mean A = 1.5
    amap[2] = 2.0  # normal, mean 2
    labels = torch.tensor([False, True, False])
    expected = (0.1 + -math.log(1 - math.exp(-1.5)) + 2.0) / 3
    assert float(fcdd_loss(amap, labels)) == pytest.approx(expected, rel=1e-6)
    # an anomalous map near zero costs a lot, one far from zero almost nothing
    assert float(fcdd_loss(torch.full((1, 2, 2), 1e-3), torch.tensor([True]))) > 6
    assert float(fcdd_loss(torch.full((1, 2, 2), 20.0), torch.tensor([True]))) < 1e-6


def test_head_map_is_pseudo_huber_of_the_output():
    head = FCDDHead(channels=5, hidden=4)
    feats = torch.randn(2, 5, 6, 6)
    with torch.no_grad():
        phi = head.conv3(torch.relu(head.conv2(torch.relu(head.conv1(feats)))))[:, 0]
        amap = head(feats)
    torch.testing.assert_close(amap, torch.sqrt(phi ** 2 + 1) - 1)
    assert (amap >= 0).all()


def test_dihedral_gives_the_eight_symmetries():
    image = torch.arange(16.0).reshape(1, 1, 4, 4).repeat(1, 3, 1, 1)  # no symmetry of its own
    views = [dihedral(image, v) for v in range(8)]
    assert torch.equal(views[0], image)
    assert len({tuple(v.flatten().tolist()) for v in views}) == 8
    assert any(torch.equal(v, torch.flip(image, dims=(2,))) for v in views)  # vertical flip
    assert any(torch.equal(v, torch.flip(image, dims=(3,))) for v in views)  # horizontal flip


def test_confetti_noise_pastes_soft_blobs():
    image = np.full((3, 112, 112), 128.0, np.float32)
    out = confetti_noise(image, np.random.default_rng(3))
    changed = np.abs(out - image).max(axis=0) > 1
    assert out.shape == image.shape and out.dtype == np.float32
    assert out.min() >= 0 and out.max() <= 255
    assert 0.002 < changed.mean() < 0.6  # blobs, not the whole image
    np.testing.assert_array_equal(out, confetti_noise(image, np.random.default_rng(3)))  # seeded
    assert not np.array_equal(out, confetti_noise(image, np.random.default_rng(4)))
    # soft edges (smoothed noise): intermediate values exist around the blobs
    diff = np.abs(out - image).max(axis=0)
    assert np.sum((diff > 1) & (diff < 0.5 * diff.max())) > 0


def test_gaussian_upsample_keeps_the_map_scale():
    flat = gaussian_upsample(np.full((7, 7), 3.0, np.float32), (56, 56))
    np.testing.assert_allclose(flat, 3.0, rtol=1e-5)
    amap = np.zeros((7, 7), np.float32)
    amap[2, 5] = 1.0
    up = gaussian_upsample(amap[None], (56, 56))[0]
    assert up.shape == (56, 56)
    y, x = np.unravel_index(np.argmax(up), up.shape)
    assert abs(y - 2.5 * 8) <= 2 and abs(x - 5.5 * 8) <= 2  # peak at the patch's centre
    assert 0 <= up.min() and up.max() <= 1.0  # weighted averages of map values
    assert up[0, 0] < 0.05 * up.max()  # and it decays away from it


def test_gaussian_upsample_equals_blurring_the_sparse_image():
    """The matrix form gives the numbers of the paper's construction: the map's values placed
    at their patch centres in an empty image, blurred with OpenCV's Gaussian (zero border),
    divided by the same blur of a map of ones."""
    import cv2

    rng = np.random.default_rng(0)
    for (height, width), (h, w), sigma in (((225, 225), (28, 28), 10.0), ((100, 300), (14, 14), 6.0)):
        maps = rng.random((2, h, w), dtype=np.float32) * 5
        rows = ((np.arange(h) + 0.5) * height / h).astype(int)
        cols = ((np.arange(w) + 0.5) * width / w).astype(int)
        ksize = 2 * int(np.ceil(3 * sigma)) + 1

        def blur(values):
            sparse = np.zeros((height, width), np.float32)
            sparse[np.ix_(rows, cols)] = values
            return cv2.GaussianBlur(sparse, (ksize, ksize), sigma, borderType=cv2.BORDER_CONSTANT)

        expected = np.stack([blur(m) / blur(np.ones((h, w), np.float32)) for m in maps])
        np.testing.assert_allclose(gaussian_upsample(maps, (height, width), sigma), expected, atol=1e-4)


@pytest.mark.pillqc
def test_fcdd_trains_on_real_images_and_exports(small_runs):
    from edge.bundle import load_bundle
    from edge.engine import open_engine
    from training.data import Split, load_images
    from training.train import load_run

    run = small_runs("fcdd")
    meta, metrics = read_json(run / "run.json"), read_json(run / "metrics.json")
    assert meta["detector"] == "fcdd" and meta["options"] == {"epochs": 30}
    assert meta["outlier_exposure"] == 2  # the split's two defects, which FCDD alone learns from
    assert metrics["calibration"]["auroc"] >= 0.8 and metrics["test"]["auroc"] >= 0.8
    model, _ = load_run(run)
    split = Split.from_json(read_json(run / "split.json"))
    size = tuple(meta["image_size"])
    # it learnt its objective: the outlier-exposure images it was shown map far from zero
    normal = load_images(split.train, size).tensors
    outliers = load_images(split.train_anomalous, size).tensors
    assert len(outliers) == 2
    with torch.no_grad():
        assert model(torch.from_numpy(outliers))[0].min() > model(torch.from_numpy(normal))[0].mean()
    # the reloaded run reproduces its own predictions, and ONNX Runtime reproduces torch
    with open(run / "predictions.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r["set"] == "test"]
    test = load_images([(r["path"], r["class"]) for r in rows], size).tensors
    with torch.no_grad():
        torch_scores, torch_maps = (t.numpy() for t in model(torch.from_numpy(test)))
    bundle = load_bundle(run / "bundle")
    ort_scores, ort_maps = open_engine(bundle).infer(test)
    np.testing.assert_allclose(ort_maps, torch_maps, rtol=1e-3, atol=1e-5)
    if metrics["calibration"]["aggregate"] == "mean":
        np.testing.assert_allclose(torch_scores, [float(r["score"]) for r in rows], rtol=1e-4)
    assert bundle.manifest["detector"] == "fcdd"
    assert bundle.manifest["outputs"]["map"]["upsample"] == "gaussian"
    assert bundle.manifest["parity"]["decision_mismatches"] == 0


@pytest.mark.pillqc
def test_runtime_overlays_use_the_bundles_gaussian_upsampling(small_runs, tmp_path):
    """An FCDD bundle says "gaussian": the overlays the runtime publishes are drawn with the
    paper's Gaussian upsampling, not the bilinear one (both drawn and encoded here from the
    same ONNX Runtime maps: the published JPEG is byte for byte the Gaussian one)."""
    from edge.bundle import load_bundle
    from edge.decision import DecisionRule
    from edge.engine import open_engine
    from edge.images import preprocess, read_image
    from edge.overlay import encode_jpeg, render_overlay
    from edge.pipeline import Pipeline, RunOptions
    from edge.publisher import Publisher
    from edge.sources import FolderSource
    from edge.subscriber import Subscriber

    run = small_runs("fcdd")
    bundle = load_bundle(run / "bundle")
    assert bundle.map_upsample == "gaussian" and bundle.interpolation == "staged"
    with open(run / "predictions.csv") as fh:
        paths = [r["path"] for r in csv.DictReader(fh) if r["set"] == "test"][:4]
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, p in enumerate(paths):
        (folder / f"f{i}.png").symlink_to(p)
    engine, rule = open_engine(bundle), DecisionRule.from_bundle(bundle)
    publisher = Publisher("tcp://127.0.0.1:*", model_id=bundle.model_id)
    with Subscriber(publisher.endpoint, ("overlay",)) as sub:
        Pipeline(bundle, engine, rule, [FolderSource(folder)], publisher,
                 RunOptions(max_batch=4, overlay_accepts_every=1, wait_subscribers=1)).run()
        got = [sub.recv(timeout_ms=5000) for _ in paths]
    assert all(m is not None for m in got)
    for msg in got:
        rgb = read_image(folder / msg.header["source"])
        scores, maps = engine.infer(preprocess(rgb, bundle.input_size, bundle.interpolation)[None])
        decision = rule.decide(scores, maps)[0]
        drawn = {how: encode_jpeg(render_overlay(rgb, maps[0], bundle.display_range, decision, upsample=how))
                 for how in ("gaussian", "bilinear")}
        assert msg.payload == drawn["gaussian"] and msg.payload != drawn["bilinear"]
