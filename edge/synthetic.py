"""Deterministic synthetic inspection images: one oval tablet on a plain tray, good or defective.

`linegate demo` trains and runs on these, so they need no data and no camera. The normal
variation is real (light level, lighting gradient, colour cast, position and rotation jitter,
surface texture, sensor noise) so that the detector has something to learn; the defects
(scratch, spot, chip) are clearly visible at 224 x 224 so that it can succeed.

Each `make()` call draws exactly two seeds from the generator's stream, one for the scene
and one for the defect, whatever the label. Two generators with the same seed therefore
render the same part under the same light for their n-th call, and differ only where a
defect was drawn; the tests rely on that. Only numpy and OpenCV: edge/ never imports torch.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

DEFECT_CLASSES: tuple[str, ...] = ("scratch", "spot", "chip")
NORMAL_CLASS = "normal"

_SHIFT = 4  # fixed-point bits for sub-pixel OpenCV drawing: jitter moves parts by fractions of a pixel
_ONE = 1 << _SHIFT

# Scratch and spot return a Paint: (alpha map, per-channel values, multiply?). Under alpha the
# surface becomes surface * values when multiply is true (a darkening), else the colour values.
Paint = tuple[np.ndarray, np.ndarray, bool]
ToImage = Callable[[np.ndarray, np.ndarray], np.ndarray]  # part coordinates -> image pixels (N x 2)


def _fixed(points: np.ndarray) -> np.ndarray:
    """Float pixel coordinates as OpenCV's fixed-point int32 polyline points."""
    return np.round(np.asarray(points) * _ONE).astype(np.int32).reshape(-1, 1, 2)


class PartGenerator:
    """Renders size x size RGB images of a cream oval tablet with a score line."""

    def __init__(self, size: int = 224, seed: int = 0) -> None:
        if size < 32:
            raise ValueError(f"size must be at least 32 pixels, got {size}")
        self.size = size
        self._rng = np.random.default_rng(seed)
        ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
        self._xs, self._ys = xs, ys
        # Banks of per-pixel randomness, drawn once; each image takes a random window (see _window).
        self._noise = self._rng.standard_normal((2 * size, 2 * size, 3), dtype=np.float32)
        self._dots = (self._rng.random((2 * size, 2 * size)) < 0.003).astype(np.float32)

    # -- public API -------------------------------------------------------------------------

    def make(self, label: str = NORMAL_CLASS) -> np.ndarray:
        """One H x W x 3 uint8 RGB image of a part with the given label (normal or a defect class)."""
        if label != NORMAL_CLASS and label not in DEFECT_CLASSES:
            raise ValueError(f"unknown label {label!r}; expected {NORMAL_CLASS!r} or one of {DEFECT_CLASSES}")
        scene_seed, defect_seed = self._rng.integers(0, 2**63, size=2)
        return self._render(np.random.default_rng(scene_seed), np.random.default_rng(defect_seed), label)

    def sample(self, defect_rate: float = 0.3) -> tuple[np.ndarray, str]:
        """A random part: defective with probability defect_rate (class chosen uniformly)."""
        if not 0.0 <= defect_rate <= 1.0:
            raise ValueError(f"defect_rate must be in [0, 1], got {defect_rate}")
        # Both draws every time, so the stream advances the same way whichever branch is taken.
        u, k = self._rng.random(), int(self._rng.integers(len(DEFECT_CLASSES)))
        label = DEFECT_CLASSES[k] if u < defect_rate else NORMAL_CLASS
        return self.make(label), label

    # -- rendering --------------------------------------------------------------------------

    def _render(self, rng: np.random.Generator, drng: np.random.Generator, label: str) -> np.ndarray:
        # Everything stays float32: numpy scalars would silently promote whole images to float64.
        s = self.size
        xs, ys = self._xs, self._ys

        def uni(lo: float, hi: float) -> float:
            return float(rng.uniform(lo, hi))

        # Pose: small jitter around the centre and a small rotation, as on a fixtured line.
        cx, cy = s / 2 + uni(-0.04, 0.04) * s, s / 2 + uni(-0.04, 0.04) * s
        theta = np.deg2rad(uni(-12.0, 12.0))
        a = s * 0.34 * uni(0.98, 1.02)  # semi-axes: parts vary slightly in size
        b = a * 0.72
        cos_t, sin_t = float(np.cos(theta)), float(np.sin(theta))
        dx, dy = xs - cx, ys - cy
        u = dx * cos_t + dy * sin_t  # part coordinates (along / across the tablet)
        v = dy * cos_t - dx * sin_t
        rn = np.sqrt((u / a) ** 2 + (v / b) ** 2)  # 0 at the centre, 1 on the rim

        def to_image(pu: np.ndarray, pv: np.ndarray) -> np.ndarray:
            """Part coordinates -> image pixel coordinates (N x 2)."""
            return np.stack([cx + pu * cos_t - pv * sin_t, cy + pu * sin_t + pv * cos_t], axis=-1)

        # Part mask with a one-pixel anti-aliased rim, computed analytically from rn.
        mask = np.clip((1.0 - rn) * b + 0.5, 0.0, 1.0)
        if label == "chip":
            mask = self._chip(drng, mask, a, b, to_image)

        # Tray: plain slate background with faint low-frequency mottling and a soft drop shadow
        # (blurred at quarter resolution, which is as good for a shadow and ten times cheaper).
        q = max(8, s // 4)
        shadow = cv2.resize(cv2.GaussianBlur(cv2.resize(mask, (q, q), interpolation=cv2.INTER_AREA),
                                             (0, 0), q * 0.02), (s, s), interpolation=cv2.INTER_LINEAR)
        shadow = np.roll(shadow, (round(s * 0.015), round(s * 0.01)), axis=(0, 1))
        bg_lum = (1.0 + 0.04 * self._smooth_noise(rng, 8)) * (1.0 - 0.45 * shadow)
        bg_colour = np.array([62, 72, 84]) * uni(0.9, 1.1)

        # Tablet surface: domed shading, blotchy texture, sparse darker speckles, embossed score
        # line. Mid-tone, so that bright scratches keep their contrast under the brightest light.
        base = np.array([192, 180, 152]) * uni(0.94, 1.06) * rng.uniform(0.98, 1.02, size=3)
        rc = np.minimum(rn, 1.0)
        lum = 1.08 - 0.30 * rc * rc * rc
        lum *= 1.0 + 0.05 * self._smooth_noise(rng, 24) + 0.03 * self._smooth_noise(rng, 64)
        lum *= 1.0 - 0.35 * cv2.GaussianBlur(self._window(rng, self._dots), (0, 0), 0.6)
        groove = np.zeros((s, s), np.uint8)
        line = to_image(np.array([-0.8 * a, 0.8 * a]), np.zeros(2))
        cv2.polylines(groove, [_fixed(line)], False, 255, max(1, round(s / 150)), cv2.LINE_AA, _SHIFT)
        groove_f = cv2.GaussianBlur(groove, (3, 3), 0).astype(np.float32) / 255.0
        # Highlight just below the groove, where light from above hits its far wall.
        lum *= 1.0 - 0.22 * groove_f + 0.10 * np.roll(groove_f, 1 + s // 112, axis=0)

        paint = None
        if label == "scratch":
            paint = self._scratch(drng, a, b, to_image)
        elif label == "spot":
            paint = self._spot(drng, a, b, to_image)

        # Lighting: global gain, a soft linear gradient in a random direction, slight colour cast.
        gain, phi, slope = uni(0.8, 1.12), uni(0.0, 2 * np.pi), uni(0.0, 0.35)
        light = gain * (1.0 + slope * (dx * float(np.cos(phi)) + dy * float(np.sin(phi))) / s)
        cast = 1.0 + np.clip(rng.normal(0.0, 0.03, size=3), -0.05, 0.05)

        # Compose per channel: broadcasting over a trailing axis of 3 is slow in numpy.
        noise = self._window(rng, self._noise) * uni(1.5, 4.0)  # sensor noise, last: same for twins
        channels = []
        for c in range(3):
            part_c = lum * float(base[c])
            if paint is not None:  # a defect repaints part of the surface
                alpha, values, multiply = paint
                target = part_c * float(values[c]) if multiply else float(values[c])
                part_c += (target - part_c) * alpha
            bg_c = bg_lum * float(bg_colour[c])
            channels.append((bg_c + (part_c - bg_c) * mask) * (light * float(cast[c])) + noise[:, :, c])
        return cv2.merge(channels).clip(0, 255).astype(np.uint8)

    def _smooth_noise(self, rng: np.random.Generator, cells: int) -> np.ndarray:
        """Zero-mean, roughly unit-range noise with about `cells` blobs across the image."""
        coarse = rng.standard_normal((cells, cells), dtype=np.float32)
        return cv2.resize(coarse, (self.size, self.size), interpolation=cv2.INTER_CUBIC) * 0.5

    def _window(self, rng: np.random.Generator, bank: np.ndarray) -> np.ndarray:
        """A random size x size window of a pre-drawn bank: fresh-looking per-pixel randomness
        for a few microseconds instead of drawing 150k normals (about 2 ms) per image."""
        oy, ox = rng.integers(0, self.size, size=2)
        return bank[oy:oy + self.size, ox:ox + self.size]

    # -- defects: each draws only from the defect RNG, so the scene is the same without them ----

    def _scratch(self, rng: np.random.Generator, a: float, b: float, to_image: ToImage) -> Paint:
        """A thin dark or bright gently curved line across the tablet."""
        s = self.size
        # Endpoints on roughly opposite sides, well inside the rim, joined by a bent curve.
        ang = rng.uniform(0, 2 * np.pi)
        r0, r1 = rng.uniform(0.55, 0.9, size=2)
        dang = ang + np.pi + rng.uniform(-0.6, 0.6)
        p0 = np.array([r0 * a * np.cos(ang), r0 * b * np.sin(ang)])
        p2 = np.array([r1 * a * np.cos(dang), r1 * b * np.sin(dang)])
        p1 = (p0 + p2) / 2 + rng.normal(0, 0.15, size=2) * np.array([a, b])
        t = np.linspace(0, 1, 24)[:, None]
        curve = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2  # quadratic Bezier
        ink = np.zeros((s, s), np.uint8)
        thickness = max(1, round(s * rng.uniform(0.008, 0.014)))
        pts = _fixed(to_image(curve[:, 0], curve[:, 1]))
        cv2.polylines(ink, [pts], False, 255, thickness, cv2.LINE_AA, _SHIFT)
        alpha = cv2.GaussianBlur(ink, (3, 3), 0).astype(np.float32) * float(rng.uniform(0.85, 1.0) / 255)
        if rng.random() < 0.65:
            return alpha, np.full(3, rng.uniform(0.25, 0.45)), True  # a dark groove
        return alpha, np.full(3, rng.uniform(245, 255)), False  # bright: the coating scraped off

    def _spot(self, rng: np.random.Generator, a: float, b: float, to_image: ToImage) -> Paint:
        """One to three dark, dirt-coloured, soft-edged blobs on the tablet."""
        s = self.size
        ink = np.zeros((s, s), np.uint8)
        n = int(rng.integers(1, 4))
        rad, ang = rng.uniform(0.0, 0.7, size=n), rng.uniform(0, 2 * np.pi, size=n)
        for x, y in to_image(rad * a * np.cos(ang), rad * b * np.sin(ang)):
            axes = s * rng.uniform(0.025, 0.05, size=2) * (1.3 if rng.random() < 0.5 else 1.0)
            cv2.ellipse(ink, (round(x * _ONE), round(y * _ONE)), (round(axes[0] * _ONE), round(axes[1] * _ONE)),
                        float(rng.uniform(0, 180)), 0, 360, 255, -1, cv2.LINE_AA, _SHIFT)
        alpha = cv2.GaussianBlur(ink, (0, 0), max(0.5, s * 0.006)).astype(np.float32)
        alpha *= float(rng.uniform(0.8, 0.95) / 255)
        return alpha, np.array([78, 60, 42]) * rng.uniform(0.6, 1.2), False

    def _chip(self, rng: np.random.Generator, mask: np.ndarray, a: float, b: float,
              to_image: ToImage) -> np.ndarray:
        """Cuts a jagged bite out of the rim so the tray shows through."""
        s = self.size
        ang = rng.uniform(0, 2 * np.pi)
        centre = np.array([a * np.cos(ang), b * np.sin(ang)])  # on the rim
        k = 9
        radius = s * rng.uniform(0.08, 0.12) * rng.uniform(0.65, 1.0, size=k)
        spokes = np.sort(rng.uniform(0, 2 * np.pi, size=k))
        poly = to_image(centre[0] + radius * np.cos(spokes), centre[1] + radius * np.sin(spokes))
        bite = np.zeros((s, s), np.uint8)
        cv2.fillPoly(bite, [_fixed(poly)], 255, cv2.LINE_AA, _SHIFT)
        return mask * (1.0 - bite.astype(np.float32) / 255.0)


def write_dataset(root: str | Path, n_normal: int, n_per_defect: int, size: int = 224, seed: int = 0,
                  progress: bool = False) -> dict[str, int]:
    """Write root/normal/*.png and root/<defect>/*.png (folder per class, names like normal_0000.png); return counts per class."""
    if n_normal < 0 or n_per_defect < 0:
        raise ValueError(f"counts must be non-negative, got n_normal={n_normal}, n_per_defect={n_per_defect}")
    root = Path(root)
    gen = PartGenerator(size=size, seed=seed)
    counts: dict[str, int] = {}
    for label, n in [(NORMAL_CLASS, n_normal), *((d, n_per_defect) for d in DEFECT_CLASSES)]:
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        # A rerun with fewer images must not leave stale files from a larger run in the class
        # folder; only files with this generator's own naming pattern are removed.
        for old in folder.glob(f"{label}_*.png"):
            old.unlink()
        width = max(4, len(str(max(n - 1, 0))))
        for i in range(n):
            path = folder / f"{label}_{i:0{width}d}.png"
            if not cv2.imwrite(str(path), cv2.cvtColor(gen.make(label), cv2.COLOR_RGB2BGR)):
                raise OSError(f"{path}: could not write image")
        counts[label] = n
        if progress:
            print(f"wrote {n} {label} images to {folder}", file=sys.stderr)
    return counts
