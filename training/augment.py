"""Mirrored copies of the normal training images, for the detectors that model "normal" from
the training set alone (PaDiM's per-patch Gaussians, PatchCore's memory bank).

A mirror is only a normal image where the scene is symmetric: on pillQC the light comes from
above, so a left-right mirror shows a plausible pill and an up-down one does not (the shadow
and the side wall would be on top). Nothing here can know that about a line, so it is opt-in
(`linegate train --augment hflip`). Mirrors also teach the detector that a mirrored part is
normal: leave them off where a part fitted the wrong way round is a defect.

FCDD does not take it: it already trains with random flips and 90-degree turns (the seed's
augmentation, training/fcdd_train.py).
"""
from __future__ import annotations

import torch

MIRRORS = {"hflip": (3,), "vflip": (2,)}  # the image axes of an (N, 3, H, W) tensor they flip


def parse_augment(spec: str | None) -> tuple[str, ...]:
    """"hflip", "vflip", "hflip,vflip" (or None / "" / "none") -> the mirrors, in a fixed order."""
    if spec is None or spec.strip().lower() in ("", "none"):
        return ()
    names = [s.strip().lower() for s in spec.split(",")]
    if not set(names) <= set(MIRRORS) or len(set(names)) != len(names):
        raise ValueError(f"--augment {spec!r}: give hflip, vflip or hflip,vflip (each once), or none")
    return tuple(m for m in MIRRORS if m in names)


def with_mirrors(images: torch.Tensor, mirrors: tuple[str, ...]) -> torch.Tensor:
    """The images followed by their mirrors: (N, 3, H, W) -> (k N, 3, H, W), k = 2 for one
    mirror, 4 for both (the images, each mirror, and both at once: a half turn)."""
    if not mirrors:
        return images
    out = [images]
    for name in mirrors:
        out = out + [torch.flip(x, dims=MIRRORS[name]) for x in out]
    return torch.cat(out)
