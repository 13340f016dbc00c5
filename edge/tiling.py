"""Frame geometry: what the detector sees of a frame, shared by training and the runtime.

A bundle's `geometry` block (edge/bundle.py) says how a frame (or its ROI) becomes model
input and how the model's maps become one frame map:

- "stretch": the frame is resized to the input size (the seed's way; bundles without a
  `geometry` block mean this, at `input.shape`).
- "aspect": the same, but the input size follows the training frames' aspect ratio (chosen by
  training; the runtime does exactly what "stretch" does).
- "tile": the frame is resized to `work` (H, W), which is cut into overlapping tiles of the
  input size at the recorded top-left corners `tiles`; the tiles of a frame go through the
  engine together, and their feature-resolution maps are put back at their places and
  averaged where they overlap ("stitch": "mean") into one map of the whole frame. The image
  score is then an aggregate of that whole map, and overlays draw it over the whole frame.

Why the numbers are multiples of 32 (the backbone's total stride): a tile whose corner sits
on a multiple of 32 sees the same feature grid as its neighbours, so each map cell of the
stitched map lines up exactly with every tile's map cell over it (no resampling when
stitching, so training and the runtime cannot differ by an interpolation), and the
backbone's TF "same" padding is identical for every input size that is a multiple of 32.

Training plans the grid once (training/geometry.py) and records it; the runtime never
re-plans it, it applies the recorded `work` and `tiles`. numpy and OpenCV only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .images import DEFAULT_INTERPOLATION, resize

MODES = ("stretch", "aspect", "tile")
STITCHES = ("mean",)
STRIDE = 32  # the backbone's total stride: tile corners and work sizes are multiples of it


class GeometryError(ValueError):
    """A geometry block that cannot be applied; the message names the key."""


def round_to_stride(value: float, minimum: int = STRIDE) -> int:
    """The nearest multiple of STRIDE, at least `minimum`."""
    return max(minimum, int(round(value / STRIDE)) * STRIDE)


def tile_starts(length: int, side: int, overlap: float) -> list[int]:
    """Top (or left) corners of tiles of `side` covering `length` work pixels, spread evenly,
    each pair overlapping by at least about `overlap` x side, on multiples of STRIDE.

    `length` and `side` are multiples of STRIDE, length >= side.
    """
    if length < side:
        raise GeometryError(f"work length {length} is shorter than the tile side {side}")
    if length == side:
        return [0]
    step = max(STRIDE, side - int(round(overlap * side)))  # the largest step that keeps the overlap
    count = 1 + math.ceil((length - side) / step)
    span = length - side
    # even spread, each corner on the stride grid; the last tile ends exactly at the edge
    return sorted({int(round(i * span / (count - 1) / STRIDE)) * STRIDE for i in range(count)})


def plan_tiles(frame_size: tuple[int, int], tile: int, side: int, overlap: float) -> tuple[tuple[int, int], list[tuple[int, int]]]:
    """(work size, tile corners) for frames of `frame_size` (H, W) cut into square tiles of
    about `tile` frame pixels, each shown to the model at `side` x `side` pixels.

    The frame is resized by side / tile (each axis rounded to a multiple of STRIDE, and at
    least one tile: a frame narrower than a tile is stretched to one tile along that axis).
    """
    if side % STRIDE:
        raise GeometryError(f"tile input side {side}: tiling needs a multiple of {STRIDE} (e.g. 224)")
    if not 0 <= overlap < 1:
        raise GeometryError(f"tile overlap {overlap}: must be in [0, 1) (a fraction of the tile)")
    scale = side / tile
    work = (round_to_stride(frame_size[0] * scale, side), round_to_stride(frame_size[1] * scale, side))
    rows, cols = tile_starts(work[0], side, overlap), tile_starts(work[1], side, overlap)
    return work, [(y, x) for y in rows for x in cols]


@dataclass(frozen=True)
class Geometry:
    mode: str
    input_size: tuple[int, int]  # (h, w) of the model input (of one tile when tiled)
    interpolation: str = DEFAULT_INTERPOLATION
    work_size: tuple[int, int] | None = None  # tile: the frame is resized to this first
    tiles: tuple[tuple[int, int], ...] = ()  # tile: top-left corners (y, x) in work pixels
    overlap: float = 0.0  # tile: the minimum overlap asked for (the corners say what it is)
    tile: int | None = None  # tile: about how many frame pixels one tile covers (for people)
    frame_size: tuple[int, int] | None = None  # the training frames' typical size it was planned for
    blend: str = "mean"  # how overlapping tile maps combine (the block's "stitch")
    reason: str = ""  # why training chose it (for people; the runtime ignores it)
    _cover: dict = field(default_factory=dict, compare=False, repr=False)  # map shape -> 1 / coverage

    @property
    def tiled(self) -> bool:
        return self.mode == "tile"

    @property
    def tile_count(self) -> int:
        return len(self.tiles) if self.tiled else 1

    # -- frames -> model input ----------------------------------------------------------------

    def prepare(self, rgb: np.ndarray) -> np.ndarray:
        """RGB uint8 frame -> model input: (3, h, w) float32, or (tiles, 3, h, w) when tiled."""
        if not self.tiled:
            work = resize(rgb, self.input_size, self.interpolation)
            return np.ascontiguousarray(work.transpose(2, 0, 1), dtype=np.float32)
        work = resize(rgb, self.work_size, self.interpolation)
        h, w = self.input_size
        out = np.empty((len(self.tiles), 3, h, w), np.float32)
        for i, (y, x) in enumerate(self.tiles):
            out[i] = work[y:y + h, x:x + w].transpose(2, 0, 1)
        return out

    def preprocess(self, rgb: np.ndarray) -> np.ndarray:  # the name edge.active and the sources call
        return self.prepare(rgb)

    @property
    def tensor_shape(self) -> tuple[int, int, int]:
        """One engine item's shape: a frame's input, or one tile of it."""
        return (3, *self.input_size)

    # -- model maps -> frame map ----------------------------------------------------------------

    def stitch(self, tile_maps: np.ndarray) -> np.ndarray:
        """(tiles, mh, mw) maps of one frame -> (MH, MW) map of the whole (work) frame: each
        tile's map at its place, the mean where tiles overlap. Not tiled: the map itself."""
        if not self.tiled:
            return tile_maps[0] if tile_maps.ndim == 3 else tile_maps
        return self.stitch_many(tile_maps[None])[0]

    def stitch_many(self, tile_maps: np.ndarray) -> np.ndarray:
        """(frames, tiles, mh, mw) -> (frames, MH, MW)."""
        frames, n, mh, mw = tile_maps.shape
        if n != len(self.tiles):
            raise GeometryError(f"{n} tile maps for a geometry of {len(self.tiles)} tiles")
        stride, inverse = self._coverage(mh, mw)
        out = np.zeros((frames, self.work_size[0] // stride, self.work_size[1] // stride), np.float32)
        for i, (y, x) in enumerate(self.tiles):
            out[:, y // stride:y // stride + mh, x // stride:x // stride + mw] += tile_maps[:, i]
        out *= inverse
        return out

    def _coverage(self, mh: int, mw: int) -> tuple[int, np.ndarray]:
        key = (mh, mw)
        if key not in self._cover:
            h, w = self.input_size
            stride = h // mh
            if h % mh or w % mw or w // mw != stride or STRIDE % stride:
                raise GeometryError(f"a {mh} x {mw} map does not divide a {h} x {w} tile evenly by a "
                                    f"stride that divides {STRIDE}; this model cannot be tiled")
            count = np.zeros((self.work_size[0] // stride, self.work_size[1] // stride), np.float32)
            for y, x in self.tiles:
                count[y // stride:y // stride + mh, x // stride:x // stride + mw] += 1
            self._cover[key] = (stride, (1.0 / count).astype(np.float32))
        return self._cover[key]

    # -- the manifest block ---------------------------------------------------------------------

    def to_json(self) -> dict:
        out: dict = {"mode": self.mode, "input": list(self.input_size)}
        if self.frame_size is not None:
            out["frame"] = list(self.frame_size)
        if self.tiled:
            out.update(work=list(self.work_size), tiles=[list(t) for t in self.tiles], tile=self.tile,
                       overlap=self.overlap, stitch=self.blend)
        if self.reason:
            out["reason"] = self.reason
        return out

    @classmethod
    def from_json(cls, block: object, input_size: tuple[int, int],
                  interpolation: str = DEFAULT_INTERPOLATION, where: str = "geometry") -> "Geometry":
        """Validate a geometry block against the model's input size. None: "stretch" to it."""
        input_size = (int(input_size[0]), int(input_size[1]))
        if block is None:
            return cls("stretch", input_size, interpolation)
        if not isinstance(block, dict):
            raise GeometryError(f"key '{where}' should be an object (mode, input, ...)")
        mode = block.get("mode")
        if mode not in MODES:
            raise GeometryError(f"key '{where}.mode' is {mode!r}; expected one of {', '.join(MODES)}")
        if block.get("input") is not None and _pair(block["input"], f"{where}.input") != input_size:
            raise GeometryError(f"key '{where}.input' {block['input']} differs from the model input "
                                f"{list(input_size)}; re-export the bundle")
        frame = _pair(block["frame"], f"{where}.frame") if block.get("frame") is not None else None
        reason = block.get("reason", "")
        if mode != "tile":
            return cls(mode, input_size, interpolation, frame_size=frame, reason=str(reason))
        for key in ("work", "tiles"):
            if key not in block:
                raise GeometryError(f"key '{where}.{key}' is missing (a tiled geometry needs it); re-export")
        work = _pair(block["work"], f"{where}.work")
        tiles = block["tiles"]
        if not isinstance(tiles, list) or not tiles:
            raise GeometryError(f"key '{where}.tiles' should be a non-empty list of [y, x] corners")
        corners = tuple(_pair(t, f"{where}.tiles[{i}]", minimum=0) for i, t in enumerate(tiles))
        h, w = input_size
        if work[0] < h or work[1] < w:
            raise GeometryError(f"key '{where}.work' {list(work)} is smaller than one tile {list(input_size)}")
        covered = np.zeros(work, bool)
        for i, (y, x) in enumerate(corners):
            if y % STRIDE or x % STRIDE or y + h > work[0] or x + w > work[1]:
                raise GeometryError(f"key '{where}.tiles[{i}]' {[y, x]}: a tile must lie inside the work "
                                    f"frame {list(work)} with its corner on a multiple of {STRIDE}")
            covered[y:y + h, x:x + w] = True
        if not covered.all():
            raise GeometryError(f"key '{where}.tiles': the tiles leave part of the work frame {list(work)} "
                                "uncovered; re-export the bundle")
        stitch = block.get("stitch", "mean")
        if stitch not in STITCHES:
            raise GeometryError(f"key '{where}.stitch' is {stitch!r}; expected one of {', '.join(STITCHES)}")
        overlap, tile = block.get("overlap", 0.0), block.get("tile")
        return cls("tile", input_size, interpolation, work, corners,
                   float(overlap) if isinstance(overlap, (int, float)) else 0.0,
                   int(tile) if isinstance(tile, int) else None, frame, stitch, str(reason))

    @classmethod
    def from_manifest(cls, manifest: dict) -> "Geometry":
        """The bundle's geometry; a bundle without the block stretches to `input.shape`."""
        _, _, h, w = manifest["input"]["shape"]
        return cls.from_json(manifest.get("geometry"), (h, w),
                             manifest["input"].get("interpolation", "area"))

    def describe(self) -> str:
        h, w = self.input_size
        if not self.tiled:
            return f"{self.mode} to {h}x{w} (height x width)"
        return (f"tile: {self.tile_count} tiles of {h}x{w} over the frame resized to "
                f"{self.work_size[0]}x{self.work_size[1]} (height x width)")


def _pair(value: object, key: str, minimum: int = 1) -> tuple[int, int]:
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in value)):
        raise GeometryError(f"key '{key}' is {value!r}; expected [height, width], two integers >= {minimum}")
    return int(value[0]), int(value[1])
