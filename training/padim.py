"""PaDiM (Defard et al. 2020), as in the seed "Detect Image Anomalies Using Pretrained
ResNet-18 Feature Embeddings", on EfficientNet-Lite0.

Multi-scale features of a frozen backbone are concatenated at the stride-4 resolution, a
seeded random 100 of the channels are kept, and each spatial patch gets a Gaussian
(mean, covariance + 0.01 I). The anomaly map is the Mahalanobis distance per patch.

`PaDiMModel` is a plain nn.Module with no training state, so it exports to ONNX as is.
The Mahalanobis term is computed as a whitening: with the Cholesky factor C of the patch
covariance, d^2 = ||C^-1 (x - mu)||^2, i.e. one batched MatMul of (P, B, D) by (P, D, D)
instead of an einsum against an explicit inverse. The image score is the mean of the map
at feature resolution (the mean of an upsampled map is, up to borders, the same number);
the runtime upsamples only for overlays.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from .backbone import TAP_CHANNELS, EfficientNetLite0

COV_EPS = 0.01  # the seed's regulariser: covariance + 0.01 I
DEFAULT_DIMS = 100


class PaDiMModel(nn.Module):
    def __init__(self, backbone: EfficientNetLite0, channels: torch.Tensor,
                 mean: torch.Tensor, whiten: torch.Tensor, map_size: tuple[int, int]):
        super().__init__()
        self.backbone = backbone
        self.map_size = tuple(map_size)
        self.register_buffer("channels", channels.long())  # (D,) indices into the concatenation
        self.register_buffer("mean", mean.float())  # (P, D)
        self.register_buffer("whiten", whiten.float())  # (P, D, D): C^-T per patch

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) pixels 0..255 -> (B, D, h, w) selected multi-scale features."""
        taps = self.backbone.features(pixels)
        taps = [t if t.shape[-2:] == self.map_size else F.interpolate(t, size=self.map_size, mode="nearest")
                for t in taps]
        return torch.index_select(torch.cat(taps, dim=1), 1, self.channels)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (score (B,), anomaly_map (B, h, w)); score = mean of the map."""
        emb = self.embed(pixels)
        b, d, h, w = emb.shape
        x = emb.reshape(b, d, h * w).permute(2, 0, 1)  # (P, B, D)
        z = torch.matmul(x - self.mean.unsqueeze(1), self.whiten)  # (P, B, D)
        dist = torch.sqrt((z * z).sum(dim=-1))  # (P, B)
        anomaly_map = dist.transpose(0, 1).reshape(b, h, w)
        return anomaly_map.mean(dim=(1, 2)), anomaly_map


def select_channels(seed: int, dims: int = DEFAULT_DIMS) -> torch.Tensor:
    total = sum(TAP_CHANNELS.values())
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(total, generator=gen)[:dims].sort().values


@torch.no_grad()
def extract(model_embed, images: torch.Tensor, batch_size: int = 16, desc: str = "features") -> torch.Tensor:
    """Run `model_embed` over images in batches with a progress bar; concatenates the outputs."""
    outs = []
    for i in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", leave=False):
        outs.append(model_embed(images[i:i + batch_size]))
    return torch.cat(outs)


@torch.no_grad()
def fit_padim(backbone: EfficientNetLite0, train_images: torch.Tensor, seed: int = 0,
              dims: int = DEFAULT_DIMS, batch_size: int = 16) -> PaDiMModel:
    """Fit the per-patch Gaussians on normal images (N, 3, H, W) pixels 0..255."""
    if len(train_images) < 2:
        raise ValueError("PaDiM needs at least 2 normal training images")
    channels = select_channels(seed, dims)
    with torch.no_grad():
        size = tuple(backbone.features(train_images[:1])[0].shape[-2:])
    model = PaDiMModel(backbone, channels, torch.zeros(size[0] * size[1], dims),
                       torch.zeros(size[0] * size[1], dims, dims), size)
    emb = extract(model.embed, train_images, batch_size, desc="PaDiM features")  # (N, D, h, w)
    n = emb.shape[0]
    x = emb.reshape(n, dims, -1).permute(2, 0, 1).double()  # (P, N, D)
    mean = x.mean(dim=1)
    centred = x - mean.unsqueeze(1)
    cov = centred.transpose(1, 2) @ centred / (n - 1) + COV_EPS * torch.eye(dims, dtype=torch.float64)
    chol = torch.linalg.cholesky(cov)  # cov = C C^T
    eye = torch.eye(dims, dtype=torch.float64).expand_as(cov)
    inv_chol = torch.linalg.solve_triangular(chol, eye, upper=False)  # C^-1
    model.mean.copy_(mean.float())
    model.whiten.copy_(inv_chol.transpose(1, 2).float())  # row vectors: z = (x - mu) C^-T
    return model
