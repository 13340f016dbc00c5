"""The fast PaDiM head (blocked whitening, no upsampling) equals the straightforward formula:
upsample + concatenate + select the features, mean and covariance per patch (the seed's
covariance + 0.01 I, or training's Ledoit-Wolf), and the Mahalanobis distance with an explicit
inverse, in float64."""
import json

import numpy as np
import pytest
import torch

from training.backbone import load_backbone
from training.padim import COV_EPS, PaDiMModel, extract, select_channels


def straightforward_maps(train_emb: np.ndarray, test_emb: np.ndarray, ledoit: bool = False) -> np.ndarray:
    """(N, D, h, w) normal embeddings, (M, D, h, w) test embeddings -> (M, h, w) distances."""
    from sklearn.covariance import ledoit_wolf

    n, d, h, w = train_emb.shape
    x = train_emb.reshape(n, d, h * w).transpose(2, 0, 1).astype(np.float64)  # (P, N, D)
    mean = x.mean(axis=1)
    centred = x - mean[:, None]
    if ledoit:  # what fit_padim does
        cov = np.stack([ledoit_wolf(patch)[0] for patch in x])
    else:
        cov = np.einsum("pni,pnj->pij", centred, centred) / (n - 1) + COV_EPS * np.eye(d)
    inv = np.linalg.inv(cov)
    diff = test_emb.reshape(len(test_emb), d, h * w).transpose(2, 0, 1) - mean[:, None]  # (P, M, D)
    return np.sqrt(np.einsum("pmi,pij,pmj->mp", diff, inv, diff)).reshape(-1, h, w)


@pytest.mark.parametrize("size, groups, neighbourhood", [(64, (2, 1, 1), 1), (72, (1, 1, 1), 1), (96, (3, 2, 2), 1),
                                                        (64, (2, 1, 1), 3), (72, (1, 1, 1), 5)])
def test_head_layouts_match_textbook(size, groups, neighbourhood):
    """64/96 px: taps nest (patches share coarse features); 72 px: taps 18/9/5 don't nest,
    the row-major fallback. Several output-group splits of the triangle, with raw and with
    locally aware features."""
    torch.manual_seed(0)
    model = PaDiMModel(load_backbone("imagenet", image_size=size), select_channels(3, 24), groups, neighbourhood)
    train = torch.rand(30, 3, size, size) * 255
    emb = extract(model.embed, train, 15).double()
    n, d, h, w = emb.shape
    x = emb.reshape(n, d, -1).permute(2, 0, 1)
    centred = x - x.mean(1, keepdim=True)
    model.set_gaussians(x.mean(1), centred.transpose(1, 2) @ centred / (n - 1) + COV_EPS * torch.eye(d))
    test = torch.rand(4, 3, size, size) * 255
    with torch.no_grad():
        score, amap = model(test)
    expected = straightforward_maps(emb.numpy(), model.embed(test).numpy())
    np.testing.assert_allclose(amap.numpy(), expected, rtol=1e-4)
    np.testing.assert_allclose(score.numpy(), expected.mean(axis=(1, 2)), rtol=1e-4)


@pytest.mark.pillqc
def test_fast_head_matches_textbook_on_pillqc(pillqc_run):
    """The trained pillQC run, as saved (load_run) and as exported (ONNX Runtime), against
    the straightforward formula fitted on the run's own training images, on held-back
    normal, chip and dirt images."""
    from edge.bundle import load_bundle
    from edge.engine import OnnxRuntimeEngine
    from training.data import Split, load_images
    from training.train import load_run

    model, meta = load_run(pillqc_run)
    split = Split.from_json(json.loads((pillqc_run / "split.json").read_text()))
    size = tuple(meta["image_size"])
    train = load_images(split.train, size).tensors
    picks = [next(item for item in split.test if item[1] == cls) for cls in ("normal", "chip", "dirt")]
    test = load_images(picks, size).tensors
    with torch.no_grad():
        train_emb = extract(model.embed, torch.from_numpy(train), 16, desc="textbook features").numpy()
        test_emb = model.embed(torch.from_numpy(test)).numpy()
        score, amap = model(torch.from_numpy(test))
    expected = straightforward_maps(train_emb, test_emb, ledoit=True)
    np.testing.assert_allclose(amap.numpy(), expected, rtol=1e-3)
    np.testing.assert_allclose(score.numpy(), expected.mean(axis=(1, 2)), rtol=1e-4)
    ort_scores, ort_maps = OnnxRuntimeEngine.from_bundle(load_bundle(pillqc_run / "bundle")).infer(test)
    np.testing.assert_allclose(ort_maps, expected, rtol=1e-3)
    np.testing.assert_allclose(ort_scores, expected.mean(axis=(1, 2)), rtol=1e-4)
    # the defective parts are the ones that stand out
    assert expected[0].mean() < min(expected[1].mean(), expected[2].mean())


def test_locally_aware_features_average_each_taps_3x3_neighbourhood():
    """embed() with neighbourhood 3 against a hand-written mean of the 3x3 neighbours (zeros
    beyond the border, counted), at the tap's own resolution, then the nearest upsample."""
    torch.manual_seed(0)
    backbone = load_backbone("imagenet", image_size=64)
    channels = torch.arange(176)
    pixels = torch.rand(2, 3, 64, 64) * 255
    with torch.no_grad():
        raw = backbone.features(pixels)
        emb = PaDiMModel(backbone, channels, neighbourhood=3).embed(pixels)
    start = 0
    for tap in raw:
        c, h, w = tap.shape[1:]
        padded = torch.nn.functional.pad(tap, (1, 1, 1, 1))
        hand = sum(padded[:, :, dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)) / 9
        step = emb.shape[-1] // w  # the taps nest at 64 px: every step-th patch holds one feature
        torch.testing.assert_close(emb[:, start:start + c, ::step, ::step], hand, rtol=1e-5, atol=1e-5)
        start += c
    assert start == emb.shape[1]


def test_runs_saved_with_the_old_head_still_load():
    """model.pt from before the blocked head held mean (P, D) and whiten = C^-T (P, D, D)."""
    torch.manual_seed(0)
    backbone = load_backbone("imagenet", image_size=64)
    channels = select_channels(5, 24)
    model = PaDiMModel(backbone, channels)
    emb = extract(model.embed, torch.rand(30, 3, 64, 64) * 255, 15).double()
    n, d = emb.shape[:2]
    x = emb.reshape(n, d, -1).permute(2, 0, 1)
    mean, centred = x.mean(1), x - x.mean(1, keepdim=True)
    cov = centred.transpose(1, 2) @ centred / (n - 1) + COV_EPS * torch.eye(d)
    model.set_gaussians(mean, cov)
    chol = torch.linalg.cholesky(cov)
    inv_chol = torch.linalg.solve_triangular(chol, torch.eye(d, dtype=torch.float64).expand_as(cov), upper=False)
    old = {k: v for k, v in model.state_dict().items() if not k.startswith("weight_")}
    old.update(mean=mean.float(), whiten=inv_chol.transpose(1, 2).float())
    loaded = PaDiMModel(load_backbone(None, image_size=64), channels)
    loaded.load_state_dict(old)
    test = torch.rand(3, 3, 64, 64) * 255
    with torch.no_grad():
        np.testing.assert_allclose(loaded(test)[1].numpy(), model(test)[1].numpy(), rtol=1e-4)
