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

# Scratch and spot return a Paint: an alpha map (0..1, float32) and the RGB colour that
# replaces the surface under it.
Paint = tuple[np.ndarray, np.ndarray]
ToImage = Callable[[np.ndarray, np.ndarray], np.ndarray]  # part coordinates -> image pixels (N x 2)


def _upsample(noise: np.ndarray, size: int) -> np.ndarray:
    """Smooth random blobs: a small grid of noise resized (cubic) to size x size."""
    return cv2.resize(noise, (size, size), interpolation=cv2.INTER_CUBIC)


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
        self._noise = self._rng.standard_normal((3, 2 * size, 2 * size), dtype=np.float32)  # per channel
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
        # Everything stays float32 and single-channel until the end: numpy scalars would promote
        # images to float64, and broadcasting over a trailing axis of 3 is slow in numpy.
        s, q = self.size, self.size // 4

        def uni(lo: float, hi: float) -> float:
            return float(rng.uniform(lo, hi))

        # Pose: small jitter around the centre and a small rotation, as on a fixtured line.
        cx, cy = s / 2 + uni(-0.04, 0.04) * s, s / 2 + uni(-0.04, 0.04) * s
        theta = np.deg2rad(uni(-12.0, 12.0))
        a = s * 0.34 * uni(0.98, 1.02)  # semi-axes: parts vary slightly in size
        b = a * 0.72
        cos_t, sin_t = float(np.cos(theta)), float(np.sin(theta))
        dx, dy = self._xs - cx, self._ys - cy
        un = dx * (cos_t / a) + dy * (sin_t / a)  # part coordinates, scaled so the rim is at 1
        vn = dy * (cos_t / b) - dx * (sin_t / b)
        rn = np.sqrt(un * un + vn * vn)  # 0 at the centre, 1 on the rim

        def to_image(pu: np.ndarray, pv: np.ndarray) -> np.ndarray:
            """Part coordinates (pixels) -> image pixel coordinates (N x 2)."""
            return np.stack([cx + pu * cos_t - pv * sin_t, cy + pu * sin_t + pv * cos_t], axis=-1)

        # Part mask with a one-pixel anti-aliased rim, computed analytically from rn.
        mask = np.clip((1.0 - rn) * b + 0.5, 0.0, 1.0)
        if label == "chip":
            mask = self._chip(drng, mask, a, b, to_image)

        # Tray: plain slate with faint low-frequency mottling and a soft drop shadow, both made
        # at quarter resolution (smooth anyway, and an order of magnitude cheaper).
        shadow = cv2.GaussianBlur(cv2.resize(mask, (q, q), interpolation=cv2.INTER_AREA), (0, 0), q * 0.02)
        shadow = np.roll(shadow, (max(1, q // 64), max(1, q // 100)), axis=(0, 1))  # light from top left
        mottle = _upsample(rng.standard_normal((8, 8), dtype=np.float32), q)
        bg_lum = (1.0 + 0.02 * mottle) * (1.0 - 0.45 * shadow)
        bg_lum = cv2.resize(bg_lum, (s, s), interpolation=cv2.INTER_LINEAR)
        bg_colour = np.array([62, 72, 84]) * uni(0.9, 1.1)

        # Tablet surface: domed shading, blotchy two-scale texture, sparse darker speckles and an
        # embossed score line. Mid-tone, so bright scratches keep contrast in the brightest light.
        base = np.array([192, 180, 152]) * uni(0.94, 1.06) * rng.uniform(0.98, 1.02, size=3)
        texture = _upsample(rng.standard_normal((24, 24), dtype=np.float32), 64)
        texture += 0.6 * rng.standard_normal((64, 64), dtype=np.float32)
        texture = _upsample(texture, s)
        rc = np.minimum(rn, 1.0)
        lum = (1.08 - 0.30 * rc * rc * rc) * (1.0 + 0.025 * texture)
        lum *= 1.0 - 0.35 * cv2.GaussianBlur(self._window(rng, self._dots), (0, 0), 0.6)
        groove = np.zeros((s, s), np.uint8)
        line = to_image(np.array([-0.8 * a, 0.8 * a]), np.zeros(2))
        cv2.polylines(groove, [_fixed(line)], False, 255, max(1, round(s / 150)), cv2.LINE_AA, _SHIFT)
        groove_f = cv2.GaussianBlur(groove, (3, 3), 0).astype(np.float32) * (1 / 255)
        # Highlight just below the groove, where light from above hits its far wall.
        lum *= 1.0 - 0.22 * groove_f + 0.10 * np.roll(groove_f, 1 + s // 112, axis=0)

        # Lighting: global gain, a soft linear gradient in a random direction, slight colour cast.
        gain, phi, slope = uni(0.8, 1.12), uni(0.0, 2 * np.pi), uni(0.0, 0.35)
        tilt = gain * slope / s
        light = gain + dx * (tilt * float(np.cos(phi))) + dy * (tilt * float(np.sin(phi)))
        cast = 1.0 + np.clip(rng.normal(0.0, 0.03, size=3), -0.05, 0.05)
        sigma = uni(1.5, 4.0)  # sensor noise, drawn last and the same for a normal/defect twin
        noise = [self._window(rng, bank) for bank in self._noise]

        # Channel c = cast_c * light * (mask * (surface_c or paint_c) + (1 - mask) * tray_c) + noise:
        # single-channel terms weighted per channel, ending in OpenCV's saturating cast to uint8.
        lit_part = mask * light
        terms = [lum * lit_part, bg_lum * (light - lit_part)]
        colours = [base, bg_colour]
        if label in ("scratch", "spot"):
            draw = self._scratch if label == "scratch" else self._spot
            alpha, paint = draw(drng, a, b, to_image)
            terms[0] *= 1.0 - alpha
            terms.append(alpha * lit_part)
            colours.append(paint)
        channels = []
        for c in range(3):
            w = [float(cast[c] * colour[c]) for colour in colours]
            acc = cv2.addWeighted(terms[0], w[0], terms[1], w[1], 0.0)
            if len(terms) == 3:
                acc = cv2.scaleAdd(terms[2], w[2], acc)
            channels.append(cv2.addWeighted(acc, 1.0, noise[c], sigma, 0.0, dtype=cv2.CV_8U))
        return cv2.merge(channels)

    def _window(self, rng: np.random.Generator, bank: np.ndarray) -> np.ndarray:
        """A random size x size window of a pre-drawn bank: fresh-looking per-pixel randomness
        for microseconds instead of drawing 150k normals (about 2 ms) per image."""
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
            return alpha, np.array([64, 58, 50]) * rng.uniform(0.6, 1.3)  # a dark groove
        return alpha, np.full(3, rng.uniform(245, 255))  # bright: the coating scraped off

    def _spot(self, rng: np.random.Generator, a: float, b: float, to_image: ToImage) -> Paint:
        """One to three dark, dirt-coloured, soft-edged blobs on the tablet."""
        s = self.size
        ink = np.zeros((s, s), np.uint8)
        n = int(rng.integers(1, 4))
        rad, ang = rng.uniform(0.0, 0.7, size=n), rng.uniform(0, 2 * np.pi, size=n)
        for x, y in to_image(rad * a * np.cos(ang), rad * b * np.sin(ang)):
            axes = s * rng.uniform(0.025, 0.05, size=2) * (1.3 if rng.random() < 0.5 else 1.0)
            centre = (round(x * _ONE), round(y * _ONE))
            half_axes = (round(axes[0] * _ONE), round(axes[1] * _ONE))
            angle = float(rng.uniform(0, 180))
            cv2.ellipse(ink, centre, half_axes, angle, 0, 360, 255, -1, cv2.LINE_AA, _SHIFT)
        alpha = cv2.GaussianBlur(ink, (0, 0), max(0.5, s * 0.006)).astype(np.float32)
        alpha *= float(rng.uniform(0.8, 0.95) / 255)
        return alpha, np.array([78, 60, 42]) * rng.uniform(0.6, 1.2)

    def _chip(self, rng: np.random.Generator, mask: np.ndarray, a: float, b: float,
              to_image: ToImage) -> np.ndarray:
        """Cuts a jagged bite out of the rim so the tray shows through."""
        s = self.size
        ang = rng.uniform(0, 2 * np.pi)
        centre = np.array([a * np.cos(ang), b * np.sin(ang)])  # on the rim
        # A jagged star-shaped polygon: evenly spread spokes (so it always has area) of random length.
        k = 9
        radius = s * rng.uniform(0.08, 0.12) * rng.uniform(0.65, 1.0, size=k)
        spokes = np.arange(k) * (2 * np.pi / k) + rng.uniform(-0.25, 0.25, size=k)
        poly = to_image(centre[0] + radius * np.cos(spokes), centre[1] + radius * np.sin(spokes))
        bite = np.zeros((s, s), np.uint8)
        cv2.fillPoly(bite, [_fixed(poly)], 255, cv2.LINE_AA, _SHIFT)
        return mask * (1.0 - bite.astype(np.float32) / 255.0)


def write_dataset(root: str | Path, n_normal: int, n_per_defect: int, size: int = 224, seed: int = 0,
                  progress: bool = False) -> dict[str, int]:
    """Write root/normal/*.png and root/<defect>/*.png (folder per class, names like
    normal_0000.png); return counts per class."""
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
