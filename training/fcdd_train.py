"""Training FCDD: confetti-noise anomalies, outlier exposure, dihedral augmentation, the FCDD loss.

The backbone is frozen, so its features are computed once, before the first epoch, for:
- every one of the 8 dihedral variants (rotations by 90 degrees x horizontal flip; the vertical
  flip is one of them) of each normal and each outlier-exposure image;
- a pool of confetti-noised normal images, each in a random dihedral variant.
Every epoch then trains the head only, on cached features: each normal image once in a random
variant, and as many anomalies, half real outlier-exposure images (when the split has any) and
half confetti. This is the loss and the augmentation of re-running the backbone every epoch, at
a small fraction of the cost (the backbone would dominate a 200-epoch run many times over).
"""
from __future__ import annotations

import logging
import math

import cv2
import numpy as np
import torch
from tqdm import tqdm

from .backbone import EfficientNetLite0
from .cpu import one_thread
from .fcdd import DEFAULT_HIDDEN, FCDDHead, FCDDModel, stride8_features
from .padim import extract

log = logging.getLogger(__name__)
DEFAULT_EPOCHS = 200  # seed
LEARNING_RATE = 1e-4  # seed: Adam, 1e-4
WEIGHT_DECAY = 1e-6
BATCH_SIZE = 32
CONFETTI_PER_IMAGE = 4
DIHEDRAL = [(k, flip) for flip in (False, True) for k in range(4)]


def dihedral(images: torch.Tensor, variant: int) -> torch.Tensor:
    """One of the 8 symmetries of the square: rotate by k * 90 degrees, then maybe flip."""
    k, flip = DIHEDRAL[variant]
    out = torch.rot90(images, k, dims=(2, 3)) if k else images
    return torch.flip(out, dims=(3,)) if flip else out


def confetti_noise(image: np.ndarray, rng: np.random.Generator, blobs: tuple[int, int] = (1, 3),
                   sides: tuple[float, float] = (8, 54), smooth_sigma: float = 5.0) -> np.ndarray:
    """FCDD's "confetti" anomaly: a few rotated square blobs of random colour (or white) added to
    (or, for half of them, subtracted from) a normal image, the noise smoothed by a Gaussian so
    the blobs have soft edges. Sizes are the paper's for 224 px, scaled to the image.

    image: 3 x H x W float32 pixels 0..255 -> the same shape, clipped to 0..255.
    (The paper adds the noise and subtracts it only when adding changes too little; pills are
    near-white, where addition saturates, so here the sign is random per blob.)
    """
    _, height, width = image.shape
    scale = min(height, width) / 224
    noise = np.zeros((height, width, 3), np.float32)
    for _ in range(int(rng.integers(blobs[0], blobs[1] + 1))):
        side = rng.uniform(*sides) * scale
        centre = (rng.uniform(0, width), rng.uniform(0, height))
        corners = cv2.boxPoints((centre, (side, side), rng.uniform(-45, 45))).astype(np.int32)
        colour = rng.integers(0, 256, 3) if rng.random() < 0.6 else np.full(3, 255)
        sign = 1.0 if rng.random() < 0.5 else -1.0
        mask = np.zeros((height, width), np.uint8)
        cv2.fillConvexPoly(mask, corners, 1)
        noise[mask.astype(bool)] = sign * colour.astype(np.float32)
    sigma = smooth_sigma * scale
    noise = cv2.GaussianBlur(noise, (2 * math.ceil(3 * sigma) + 1,) * 2, sigma)
    return np.clip(image + noise.transpose(2, 0, 1), 0, 255).astype(np.float32)


def fcdd_loss(amap: torch.Tensor, anomalous: torch.Tensor) -> torch.Tensor:
    """The FCDD objective on pseudo-Huber maps (B, h, w): mean A for normal images,
    -log(1 - exp(-mean A)) for anomalous ones; averaged over the batch."""
    score = amap.flatten(1).mean(dim=1)
    anomalous_term = -torch.log(-torch.expm1(-score) + 1e-31)  # 1 - exp(-s), stable near 0
    return torch.where(anomalous, anomalous_term, score).mean()


class FeatureCache:
    """Backbone features (float16, to halve the memory) of the training views."""

    def __init__(self, backbone: EfficientNetLite0, normal: torch.Tensor, outliers: torch.Tensor,
                 rng: np.random.Generator, confetti_per_image: int, batch_size: int):
        def features(images: torch.Tensor, desc: str) -> torch.Tensor:
            return extract(lambda x: stride8_features(backbone, x).half(), images, batch_size, desc)

        def all_variants(images: torch.Tensor, what: str) -> torch.Tensor:  # (N, 8, C, h, w)
            if not len(images):
                return torch.zeros(0)
            views = [features(dihedral(images, v), f"FCDD features: {what} {v + 1}/8") for v in range(8)]
            return torch.stack(views, dim=1)

        self.normal = all_variants(normal, "normal view")
        self.outliers = all_variants(outliers, "outlier-exposure view")
        confetti, numpy_normal = [], normal.numpy()
        for i in range(confetti_per_image * len(normal)):
            noised = confetti_noise(numpy_normal[i % len(normal)], rng)
            confetti.append(dihedral(torch.from_numpy(noised)[None], int(rng.integers(8)))[0])
        self.confetti = features(torch.stack(confetti), "FCDD features: confetti") if confetti else None

    def standardisation(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean and std of the normal features (all views)."""
        x = self.normal.float().transpose(0, 2).flatten(1)  # (C, rest)
        return x.mean(dim=1).reshape(1, -1, 1, 1), x.std(dim=1).clamp_min(1e-6).reshape(1, -1, 1, 1)


def train_fcdd(backbone: EfficientNetLite0, normal: torch.Tensor, outliers: torch.Tensor, seed: int = 0,
               epochs: int = DEFAULT_EPOCHS, hidden: int = DEFAULT_HIDDEN, batch_size: int = BATCH_SIZE,
               lr: float = LEARNING_RATE, confetti_per_image: int = CONFETTI_PER_IMAGE,
               feature_batch: int = 16) -> FCDDModel:
    """Train the FCDD head on normal images and outlier-exposure images (N, 3, H, W) 0..255."""
    if len(normal) < 1:
        raise ValueError("FCDD needs at least one normal training image")
    if epochs < 1:
        raise ValueError(f"--epochs {epochs}: must be at least 1")
    rng = np.random.default_rng(seed)
    cache = FeatureCache(backbone, normal, outliers, rng, confetti_per_image, feature_batch)
    torch.manual_seed(seed)  # the head's initial weights
    with one_thread():  # small batches of 28x28 maps (training/cpu.py)
        head = fit_head(cache, rng, epochs, hidden, batch_size, lr)
    return FCDDModel(backbone, head, tuple(cache.normal.shape[-2:]))


def fit_head(cache: FeatureCache, rng: np.random.Generator, epochs: int = DEFAULT_EPOCHS,
             hidden: int = DEFAULT_HIDDEN, batch_size: int = BATCH_SIZE, lr: float = LEARNING_RATE) -> FCDDHead:
    """The epochs themselves, on cached features only."""
    head = FCDDHead(cache.normal.shape[2], hidden)
    mean, std = cache.standardisation()
    head.feat_mean.copy_(mean)
    head.feat_std.copy_(std)
    optimiser = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)
    n = len(cache.normal)
    n_outlier_views = len(cache.outliers) * 8
    outlier_views = cache.outliers.flatten(0, 1) if n_outlier_views else None
    head.train()
    progress = tqdm(range(epochs), desc="FCDD training", unit="epoch")
    for _ in progress:
        # this epoch's samples: every normal image in a random view, as many anomalies
        normal_feats = cache.normal[torch.arange(n), torch.from_numpy(rng.integers(0, 8, n))]
        n_real = n // 2 if n_outlier_views else 0
        parts = [normal_feats]
        if n_real:
            parts.append(outlier_views[torch.from_numpy(rng.integers(0, n_outlier_views, n_real))])
        if cache.confetti is not None:
            parts.append(cache.confetti[torch.from_numpy(rng.integers(0, len(cache.confetti), n - n_real))])
        feats = torch.cat(parts)
        labels = torch.arange(len(feats)) >= n
        order = torch.from_numpy(rng.permutation(len(feats)))
        total, count = 0.0, 0
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            loss = fcdd_loss(head(feats[idx].float()), labels[idx])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += loss.item() * len(idx)
            count += len(idx)
        progress.set_postfix(loss=f"{total / count:.4f}")
    return head.eval()
