"""Heatmap overlays: the anomaly map coloured with an OpenCV colormap, blended over the frame,
the decision drawn on it, JPEG-encoded. Only frames that publish an overlay pay for this."""
from __future__ import annotations

import cv2
import numpy as np

from .decision import REJECT, Decision

COLOURS_BGR = {REJECT: (0, 0, 255)}
ACCEPT_BGR = (0, 200, 0)


def render_overlay(image_rgb: np.ndarray, anomaly_map: np.ndarray, display_range: tuple[float, float],
                   decision: Decision, alpha: float = 0.45) -> np.ndarray:
    """BGR image: frame + colourised map (display range -> 0..255) + decision banner."""
    h, w = image_rgb.shape[:2]
    lo, hi = display_range
    scaled = np.clip((anomaly_map - lo) * (255.0 / (hi - lo)), 0, 255).astype(np.uint8)
    heat = cv2.applyColorMap(cv2.resize(scaled, (w, h), interpolation=cv2.INTER_LINEAR), cv2.COLORMAP_JET)
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
