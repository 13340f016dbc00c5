"""Heatmap overlays: the anomaly map brought to the frame's size, coloured with an OpenCV
colormap, blended over the frame, the decision drawn on it, JPEG-encoded. Only frames that
publish an overlay pay for this. Training's report draws its overlays with the same code.
"""
from __future__ import annotations

from functools import lru_cache

import cv2
import numpy as np

from .decision import REJECT, Decision

COLOURS_BGR = {REJECT: (0, 0, 255)}
ACCEPT_BGR = (0, 200, 0)
# How a feature-resolution map reaches the frame (the bundle's `outputs.map.upsample`).
UPSAMPLES = ("bilinear", "gaussian")
# FCDD's heatmap upsampling (paper: a Gaussian of std 10 px for 224 px inputs, wider than the
# stride, so the heatmap is smooth rather than blocky).
UPSAMPLE_SIGMA_224 = 10.0
# OpenCV's JET colormap as a lookup table, built once: applyColorMap rebuilds its table on
# every call, which cost more than the rest of an overlay (0.37 of 1.05 ms at 225 x 225).
JET_LUT = cv2.applyColorMap(np.arange(256, dtype=np.uint8).reshape(256, 1), cv2.COLORMAP_JET)


def colourise(grey: np.ndarray) -> np.ndarray:
    """uint8 H x W -> BGR H x W x 3, exactly cv2.applyColorMap(grey, cv2.COLORMAP_JET)."""
    return cv2.LUT(cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR), JET_LUT)


@lru_cache(maxsize=16)
def _spread_matrix(n_out: int, n_map: int, sigma: float) -> np.ndarray:
    """(n_out, n_map): the weight of map row/column j at image row/column i, OpenCV's Gaussian
    kernel (cv2.getGaussianKernel, 3 sigma each side) centred on that patch's centre."""
    half = int(np.ceil(3 * sigma))
    kernel = cv2.getGaussianKernel(2 * half + 1, sigma, cv2.CV_64F).ravel()
    centres = ((np.arange(n_map) + 0.5) * n_out / n_map).astype(int)
    offset = np.arange(n_out)[:, None] - centres[None, :] + half
    inside = (offset >= 0) & (offset <= 2 * half)
    return np.where(inside, kernel[np.clip(offset, 0, 2 * half)], 0.0).astype(np.float32)


def gaussian_upsample(maps: np.ndarray, size: tuple[int, int], sigma: float | None = None) -> np.ndarray:
    """FCDD's heatmap upsampling: each map value is spread over the image by a Gaussian centred
    on its patch (a transposed convolution with a Gaussian kernel, stride = the map's stride).

    The result is divided by the same upsampling of a map of ones, so the values keep the
    map's scale (the bundle's display range still applies). maps (B, h, w) or (h, w) ->
    (B, H, W) or (H, W), size = (H, W).

    The kernel is separable and the map's values sit on a grid, so the spread is two small
    matrix products, rows @ map @ cols^T: the same numbers as blurring the sparse image with
    cv2.GaussianBlur (zero border), without touching the empty pixels (0.3 instead of 1.8 ms
    at 225 x 225; 24 instead of 450 ms at 1280 x 1024, where sigma grows with the frame).
    """
    maps = np.asarray(maps, dtype=np.float32)
    squeeze = maps.ndim == 2
    maps = maps[None] if squeeze else maps
    height, width = int(size[0]), int(size[1])
    sigma = UPSAMPLE_SIGMA_224 * min(height, width) / 224 if sigma is None else float(sigma)
    rows, cols, inverse_weight = _spread(height, width, maps.shape[1], maps.shape[2], sigma)
    out = rows @ maps @ cols.T * inverse_weight
    return out[0] if squeeze else out


@lru_cache(maxsize=16)
def _spread(height: int, width: int, h: int, w: int, sigma: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The two spread matrices and 1 / the spread of a map of ones, per frame and map size:
    the same for every frame of a camera, and the outer product alone took 0.3 ms a frame."""
    rows, cols = _spread_matrix(height, h, sigma), _spread_matrix(width, w, sigma)
    weight = np.maximum(np.outer(rows.sum(axis=1), cols.sum(axis=1)), 1e-12)
    return rows, cols, (1.0 / weight).astype(np.float32)


def upsample_map(anomaly_map: np.ndarray, size: tuple[int, int], how: str = "bilinear") -> np.ndarray:
    """A feature-resolution map at size = (H, W): bilinear, or FCDD's Gaussian."""
    if how == "gaussian":
        return gaussian_upsample(anomaly_map, size)
    if how != "bilinear":
        raise ValueError(f"unknown map upsampling {how!r}; expected one of {UPSAMPLES}")
    return cv2.resize(np.asarray(anomaly_map, np.float32), (size[1], size[0]), interpolation=cv2.INTER_LINEAR)


def render_overlay(image_rgb: np.ndarray, anomaly_map: np.ndarray, display_range: tuple[float, float],
                   decision: Decision, alpha: float = 0.45, upsample: str = "bilinear") -> np.ndarray:
    """BGR image: frame + colourised map (display range -> 0..255) + decision banner.
    `upsample` brings the map to the frame's size (the bundle's `outputs.map.upsample`)."""
    h, w = image_rgb.shape[:2]
    lo, hi = display_range
    def to_uint8(values: np.ndarray) -> np.ndarray:
        return np.clip((values - lo) * (255.0 / (hi - lo)), 0, 255).astype(np.uint8)

    if upsample == "bilinear":  # scale the small map, then resize bytes: cheaper on big frames
        scaled = cv2.resize(to_uint8(anomaly_map), (w, h), interpolation=cv2.INTER_LINEAR)
    else:
        scaled = to_uint8(upsample_map(anomaly_map, (h, w), upsample))
    heat = colourise(scaled)
    frame_bgr = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR)
    out = cv2.addWeighted(frame_bgr, 1.0 - alpha, heat, alpha, 0.0)
    colour = COLOURS_BGR.get(decision.decision, ACCEPT_BGR)
    thickness = max(2, min(h, w) // 80)
    cv2.rectangle(out, (0, 0), (w - 1, h - 1), colour, thickness)
    scale = max(0.4, min(h, w) / 500)
    text = f"{decision.decision.upper()} {decision.score:.3g}/{decision.threshold:.3g}"
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    cv2.rectangle(out, (0, 0), (min(w, tw + 8), th + base + 8), colour, cv2.FILLED)
    cv2.putText(out, text, (4, th + 4), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def encode_jpeg(image_bgr: np.ndarray, quality: int = 85) -> bytes:
    ok, buf = cv2.imencode(".jpg", image_bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


def encode_png(image_rgb: np.ndarray, level: int = 1) -> bytes:
    """An RGB (or grey) frame as PNG, lossless; level 1: fast, the frame is big."""
    image = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR) if image_rgb.ndim == 3 and image_rgb.shape[2] == 3 else image_rgb
    ok, buf = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, level])
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


class OverlayPolicy:
    """Which frames get an overlay: every reject; of the accepts, the 1st, N+1th, ... (0 = none)."""

    def __init__(self, accepts_every: int = 0):
        if accepts_every < 0:
            raise ValueError("overlay accepts_every must be >= 0 (0 = no overlays for accepts)")
        self.accepts_every = accepts_every
        self._accepts = 0

    def wants(self, decision: Decision) -> bool:
        if decision.decision == REJECT:
            return True
        if decision.decision != "accept" or not self.accepts_every:
            return False
        self._accepts += 1
        return (self._accepts - 1) % self.accepts_every == 0
