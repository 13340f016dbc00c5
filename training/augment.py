"""Mirrored copies of the normal training images, for the detectors that model "normal" from
the training set alone (PaDiM's per-patch Gaussians, PatchCore's memory bank).

A mirror is only a normal image where the scene is symmetric: on pillQC the light comes from
above, so a left-right mirror shows a plausible pill and an up-down one does not (the shadow
and the side wall would be on top). Nothing here can know that about a line, so it is opt-in
(`linegate train --augment hflip`). Mirrors also teach the detector that a mirrored part is
normal: leave them off where a part fitted the wrong way round is a defect.

FCDD does not take it: it already trains with random flips and 90-degree turns (the seed's
augmentation, training/fcdd_train.py).

`jpeg[:Q]` adds one JPEG-compressed copy of each normal training image, compressed at the
file's own resolution before the resize, as a camera that sends MJPEG (or a JPEG-saving
frame grabber) delivers it. The copies' qualities are spread evenly from Q (default 75) to
95 over the images, since a line's compression is rarely known exactly and a model fitted
at one quality still rejects a stronger one (the demo fitted at q90 alone: 14% of good parts
rejected at q85, 99% at q75). A model fitted on lossless images only takes JPEG's 8x8 block
artefacts for an anomaly: the demo's PaDiM rejected 99% of its good parts at JPEG q95
(benchmarks/results/jpeg_robustness/). With mirrors, the copies are mirrored too.
"""
from __future__ import annotations

from pathlib import Path

import cv2
from typing import Callable

import numpy as np
import torch

MIRRORS = {"hflip": (3,), "vflip": (2,)}  # the image axes of an (N, 3, H, W) tensor they flip
JPEG_DEFAULT_QUALITY = 75
JPEG_TOP_QUALITY = 95  # copies span Q..95: above 95 JPEG is close to lossless
_HELP = "give hflip, vflip or hflip,vflip (each once), and/or jpeg[:QUALITY 1-100], or none"


def _names(spec: str | None) -> list[str]:
    if spec is None or spec.strip().lower() in ("", "none"):
        return []
    names = [s.strip().lower() for s in spec.split(",")]
    mirrors = [n for n in names if not n.startswith("jpeg")]
    jpegs = [n for n in names if n.startswith("jpeg")]
    if not set(mirrors) <= set(MIRRORS) or len(set(mirrors)) != len(mirrors) or len(jpegs) > 1:
        raise ValueError(f"--augment {spec!r}: {_HELP}")
    return names


def parse_augment(spec: str | None) -> tuple[str, ...]:
    """"hflip", "vflip", "hflip,vflip" (or None / "" / "none"), each possibly with a jpeg[:Q]
    item -> the mirrors, in a fixed order (jpeg_quality() reads the jpeg item)."""
    names = _names(spec)
    jpeg_quality(spec)  # a bad quality is refused here too
    return tuple(m for m in MIRRORS if m in names)


def jpeg_quality(spec: str | None) -> int | None:
    """The lowest quality of the ``jpeg[:Q]`` item of an --augment spec, or None without one."""
    for name in _names(spec):
        if name.startswith("jpeg"):
            _, colon, text = name.partition(":")
            if name not in ("jpeg",) and not colon:
                raise ValueError(f"--augment {spec!r}: {_HELP}")
            quality = int(text) if text.isdigit() else -1 if colon else JPEG_DEFAULT_QUALITY
            if not 1 <= quality <= 100:
                raise ValueError(f"--augment {spec!r}: the JPEG quality must be an integer in 1-100 (e.g. jpeg:75)")
            return quality
    return None


def jpeg_round_trip(rgb: np.ndarray, quality: int) -> np.ndarray:
    """An RGB image as it comes back from JPEG at ``quality`` (what an MJPEG camera delivers)."""
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("OpenCV could not JPEG-encode the image")
    return cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def copy_qualities(n: int, lowest: int) -> list[int]:
    """The JPEG quality of each of ``n`` copies: evenly from ``lowest`` to 95, interleaved so
    that neighbouring images (often alike) get far-apart qualities."""
    top = max(lowest, JPEG_TOP_QUALITY)
    spread = np.linspace(lowest, top, n).round().astype(int) if n > 1 else np.array([lowest] * n)
    order = np.argsort([(i * 0.6180339887) % 1.0 for i in range(n)], kind="stable")  # golden-ratio shuffle
    return [int(q) for q in spread[order]]


def jpeg_copies(paths: list[str], prepare: Callable[[np.ndarray], np.ndarray], lowest: int) -> torch.Tensor:
    """(N x k, 3, H, W) float tensors of the images at ``paths`` after a JPEG round trip (quality
    from ``lowest`` to 95, see copy_qualities), then ``prepare``: the run's frame geometry
    (training/geometry.py), which gives k = 1 input or k tiles per image, as the originals get."""
    from edge.images import read_image

    qualities = copy_qualities(len(paths), lowest)
    return torch.from_numpy(np.concatenate([prepare(jpeg_round_trip(read_image(Path(p)), q))
                                            for p, q in zip(paths, qualities)]))


def with_mirrors(images: torch.Tensor, mirrors: tuple[str, ...]) -> torch.Tensor:
    """The images followed by their mirrors: (N, 3, H, W) -> (k N, 3, H, W), k = 2 for one
    mirror, 4 for both (the images, each mirror, and both at once: a half turn)."""
    if not mirrors:
        return images
    out = [images]
    for name in mirrors:
        out = out + [torch.flip(x, dims=MIRRORS[name]) for x in out]
    return torch.cat(out)
