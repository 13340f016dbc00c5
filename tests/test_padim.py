"""PaDiM's whitened Mahalanobis equals the textbook formula with an explicit inverse."""
import numpy as np
import torch
from sklearn.covariance import ledoit_wolf

from training.backbone import load_backbone
from training.padim import COV_EPS, fit_padim, patch_covariances


def test_padim_map_equals_straightforward_mahalanobis():
    torch.manual_seed(0)
    backbone = load_backbone("imagenet", image_size=64)
    train = torch.rand(12, 3, 64, 64) * 255
    model = fit_padim(backbone, train, seed=1, dims=20, batch_size=6)
    emb = model.embed(train).numpy().astype(np.float64)  # (N, D, h, w)
    n, d, h, w = emb.shape
    x = emb.reshape(n, d, h * w)
    test = torch.rand(3, 3, 64, 64) * 255
    with torch.no_grad():
        score, amap = model(test)
    e = model.embed(test).numpy().astype(np.float64).reshape(3, d, h * w)
    expected = np.empty((3, h * w))
    for p in range(h * w):
        cov = ledoit_wolf(x[:, :, p])[0]
        inv = np.linalg.inv(cov)
        diff = e[:, :, p] - x[:, :, p].mean(axis=0)
        expected[:, p] = np.sqrt(np.einsum("bi,ij,bj->b", diff, inv, diff))
    np.testing.assert_allclose(amap.numpy().reshape(3, -1), expected, rtol=2e-3)
    np.testing.assert_allclose(score.numpy(), expected.mean(axis=1), rtol=2e-3)
    # normal training images score lower than noise images
    with torch.no_grad():
        assert model(train[:3])[0].mean() < score.mean()


def test_patch_covariances_are_ledoit_wolf_and_never_singular():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 8, 20))  # 3 patches, 8 images, 20 dims: sample covariances are singular
    x[2] = 0.5  # a patch whose features never vary
    cov = patch_covariances(torch.from_numpy(x)).numpy()
    for p in range(2):
        np.testing.assert_allclose(cov[p], ledoit_wolf(x[p])[0], rtol=1e-12)
        assert np.linalg.eigvalsh(cov[p]).min() > 0  # shrinkage makes it invertible
    np.testing.assert_allclose(cov[2], COV_EPS * np.eye(20))  # nothing to shrink: the seed's 0.01 I
