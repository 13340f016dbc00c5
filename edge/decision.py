"""Score aggregate -> normalise -> threshold -> accept / reject.

The graph already returns the mean of the map; other aggregates are computed here from the
feature-resolution map, which is small (e.g. 28 x 28): "mean", "max", "topk:P" (mean of the top
P percent), each optionally after a Gaussian blur of the map, written "max+blur:S" (S: the
blur's sigma in map cells). PaDiM's and PatchCore's papers blur the map before taking its
maximum: a single noisy cell then counts less than a defect that lights up a few neighbours.
Training (calibration) and the runtime call the same function, so they cannot drift.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:  # bundle validation imports overlay, which imports this module
    from .bundle import Bundle

ACCEPT, REJECT, ERROR = "accept", "reject", "error"
NON_FINITE_SCORE = "the engine returned a non-finite score (NaN or inf) for this frame"


@dataclass(slots=True)
class Decision:
    score: float
    score_norm: float  # score scaled by the calibration set's min/max: 0..1 on calibration data
    threshold: float
    decision: str


BLUR = "+blur:"
AGGREGATE_HELP = "mean, max or topk:P (P in (0, 100]), optionally +blur:S (S > 0: Gaussian sigma in map cells)"


def split_blur(aggregate: str) -> tuple[str, float]:
    """"max+blur:1" -> ("max", 1.0); "max" -> ("max", 0.0)."""
    if BLUR not in aggregate:
        return aggregate, 0.0
    name, _, sigma_text = aggregate.partition(BLUR)
    try:
        sigma = float(sigma_text)
    except ValueError:
        sigma = float("nan")
    if not (np.isfinite(sigma) and 0 < sigma <= 16):
        raise ValueError(f"aggregate {aggregate!r}: the blur's sigma must be a number in (0, 16] map cells, "
                         "e.g. max+blur:1")
    return name, sigma


def blur_maps(maps: np.ndarray, sigma: float) -> np.ndarray:
    """Each (h, w) map Gaussian-blurred (OpenCV; edges reflected, so a border cell is not
    diluted by zeros)."""
    maps = np.ascontiguousarray(maps, dtype=np.float32)
    return np.stack([cv2.GaussianBlur(m, (0, 0), sigmaX=sigma, borderType=cv2.BORDER_REFLECT) for m in maps]) \
        if len(maps) else maps


def aggregate_maps(maps: np.ndarray, aggregate: str) -> np.ndarray:
    """Image scores from (B, h, w) maps by `aggregate` (see the module's docstring)."""
    aggregate, sigma = split_blur(aggregate)
    if sigma:
        maps = blur_maps(maps, sigma)
    flat = maps.reshape(len(maps), -1)
    if aggregate == "mean":
        return flat.mean(axis=1)
    if aggregate == "max":
        return flat.max(axis=1)
    if aggregate.startswith("topk:"):
        try:
            percent = float(aggregate[5:])
        except ValueError:
            percent = float("nan")
        if not 0 < percent <= 100:
            raise ValueError(f"aggregate {aggregate!r}: P must be a number in (0, 100]")
        k = max(1, int(round(flat.shape[1] * percent / 100)))
        return np.partition(flat, flat.shape[1] - k, axis=1)[:, -k:].mean(axis=1)
    raise ValueError(f"aggregate {aggregate!r}: use {AGGREGATE_HELP}")


class DecisionRule:
    def __init__(self, threshold: float, aggregate: str = "mean", norm_min: float = 0.0,
                 norm_max: float = 1.0, graph_aggregate: str = "mean"):
        aggregate_maps(np.zeros((1, 1, 1), np.float32), aggregate)  # validate the name early
        if not np.isfinite(threshold):
            raise ValueError(f"threshold {threshold}: must be a finite number")
        self.threshold = float(threshold)
        self.aggregate = aggregate
        self.norm_min, self.norm_span = float(norm_min), float(norm_max) - float(norm_min)
        self.graph_aggregate = graph_aggregate

    @classmethod
    def from_bundle(cls, bundle: Bundle, threshold: float | None = None,
                    aggregate: str | None = None) -> "DecisionRule":
        d = bundle.decision
        if aggregate and aggregate != d["aggregate"] and threshold is None:
            raise ValueError(f"aggregate {aggregate!r} differs from the calibrated {d['aggregate']!r}: "
                             "the bundle's threshold does not apply to it; give a threshold too")
        return cls(d["threshold"] if threshold is None else threshold, aggregate or d["aggregate"],
                   d["normalisation"]["min"], d["normalisation"]["max"],
                   bundle.manifest["outputs"]["score"]["aggregate"])

    def scores(self, graph_scores: np.ndarray | None, maps: np.ndarray) -> np.ndarray:
        """The graph's own score where it is the calibrated aggregate (no per-frame work), else
        the aggregate of the maps; `graph_scores=None` (e.g. maps stitched from tiles, whose
        per-tile graph scores are not the frame's) always takes the maps."""
        if graph_scores is not None and self.aggregate == self.graph_aggregate:
            return graph_scores
        return aggregate_maps(maps, self.aggregate)

    def decide(self, graph_scores: np.ndarray | None, maps: np.ndarray) -> list[Decision]:
        """One decision per image. A score that is not finite (an engine that overflowed, e.g.
        in reduced precision) is an error, never an accept: `NaN >= threshold` is False."""
        scores = self.scores(graph_scores, maps)
        norm = (scores - self.norm_min) / self.norm_span
        return [Decision(float(s), float(n), self.threshold,
                         ERROR if not np.isfinite(s) else REJECT if s >= self.threshold else ACCEPT)
                for s, n in zip(scores, norm)]
