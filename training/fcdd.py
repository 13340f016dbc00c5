"""FCDD (Liznerski et al. 2021, seed "Explainable One-Class Classification"), on a frozen
EfficientNet-Lite0.

A small fully convolutional head (1x1, 3x3, 1x1 convolutions) maps the backbone's multi-scale
features (stride 4, 8 and 16 taps, brought to the stride-8 grid) to one channel; the anomaly
map is the pseudo-Huber transform of it, A = sqrt(phi^2 + 1) - 1, so it is >= 0 and the
image score is its mean (the seed's score). Normal images are trained towards A = 0
everywhere, anomalous ones away from it (training/fcdd_train.py).

`FCDDModel` is a plain nn.Module with no training state (no batch norm): the per-channel
feature standardisation is a fixed buffer computed from the normal training features. The
graph returns the map at feature resolution; `edge.overlay.gaussian_upsample` produces the
paper's full-resolution heatmap (a transposed convolution with a Gaussian kernel) only when
an overlay is drawn (the runtime and the report share it).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .backbone import TAP_CHANNELS, EfficientNetLite0

DEFAULT_HIDDEN = 32


def stride8_features(backbone: EfficientNetLite0, pixels: torch.Tensor) -> torch.Tensor:
    """The three taps on the stride-8 grid: stride 4 averaged 2x2, stride 16 upsampled."""
    s4, s8, s16 = backbone.features(pixels)
    size = s8.shape[-2:]
    s4 = F.adaptive_avg_pool2d(s4, size) if s4.shape[-2:] != size else s4
    s16 = F.interpolate(s16, size=size, mode="bilinear", align_corners=False)
    return torch.cat([s4, s8, s16], dim=1)


FEATURE_CHANNELS = sum(TAP_CHANNELS.values())


class FCDDHead(nn.Module):
    """Standardise -> 1x1 conv -> ReLU -> 3x3 conv -> ReLU -> 1x1 conv -> pseudo-Huber:
    (B, C, h, w) features -> (B, h, w) map. The 1x1 reduction first keeps the 3x3 (the only
    spatial context the head adds to the backbone's) cheap: 200 epochs train in minutes."""

    def __init__(self, channels: int = FEATURE_CHANNELS, hidden: int = DEFAULT_HIDDEN):
        super().__init__()
        self.register_buffer("feat_mean", torch.zeros(1, channels, 1, 1))
        self.register_buffer("feat_std", torch.ones(1, channels, 1, 1))
        self.conv1 = nn.Conv2d(channels, hidden, 1)
        self.conv2 = nn.Conv2d(hidden, hidden // 2, 3, padding=1)
        self.conv3 = nn.Conv2d(hidden // 2, 1, 1)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        x = (feats - self.feat_mean) / self.feat_std
        phi = self.conv3(F.relu(self.conv2(F.relu(self.conv1(x)))))[:, 0]
        return torch.sqrt(phi * phi + 1.0) - 1.0  # FCDD's pseudo-Huber map A(X)


class FCDDModel(nn.Module):
    def __init__(self, backbone: EfficientNetLite0, head: FCDDHead, map_size: tuple[int, int]):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.map_size = tuple(map_size)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        return stride8_features(self.backbone, pixels)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (score (B,), anomaly_map (B, h, w)); score = mean of the map."""
        anomaly_map = self.head(self.embed(pixels))
        return anomaly_map.mean(dim=(1, 2)), anomaly_map
