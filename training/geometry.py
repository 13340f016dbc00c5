"""Training's side of the frame geometry (edge/tiling.py): choosing it from the training
images' sizes, and reading, fitting and scoring images through it, so that training, export
and the runtime all go through the same `Geometry.prepare` and `Geometry.stitch`.

`--geometry auto` (the default) decides from the training images alone; `stretch`, `aspect`
and `tile:SIZE[,OVERLAP]` force one.
"""
from __future__ import annotations

import logging
import math

import numpy as np
from PIL import Image

from edge.images import DEFAULT_INTERPOLATION, ImageReadError, read_image
from edge.tiling import STRIDE, Geometry, GeometryError, plan_tiles, round_to_stride

from .data import LoadedImages

log = logging.getLogger(__name__)

# The default rule (`--geometry auto`), for parts in general, from the median training frame
# (H, W) and the input budget side x side (224 x 224 unless --image-size says otherwise):
#
# 1. shrink = sqrt(H * W) / side: how much the frame must shrink to fit the budget whole with
#    its aspect ratio kept. Up to TILE_ABOVE (2x), the whole frame goes into one input whose
#    sides follow the frame's aspect ratio (multiples of 32, area about side^2); that is
#    "stretch" when it rounds to a square (pillQC's 225 px, ELPV's 300 px stay exactly as
#    before). Stretching a 2.5:1 frame into a square squeezes one axis 2.5x more than the
#    other and bends every defect's shape; the aspect input does not.
# 2. Beyond 2x, small defects are what is lost: the backbone's finest features have a
#    stride of 4 input pixels, so a crack 4 frame pixels wide shrunk 4x is one pixel, a
#    quarter of a feature cell, and averages away (KolektorSDD stretched to 224: 5.6x along
#    its length). So the frame is tiled: square tiles shown at about TILE_SHRINK (2x), with
#    at least a quarter tile of overlap (a defect on one tile's border, where the padding
#    weakens features, is inside its neighbour). Up to 25% more shrink is accepted when it
#    saves tiles (a 500 px wide frame: one tile across at 2.2x instead of two at 2x).
# 3. Cost: a tiled frame costs about (tiles x one input). MAX_TILES (16) bounds it: a frame
#    that would need more (a 5 MP camera frame: 42 tiles at 2x) is shown at the shrink that
#    needs 16. The line's rate is a budget of its own; `--geometry tile:SIZE` spends more.
#
# Sizes alone cannot tell an object from a surface; the rule only uses what is true of every
# part: what shrinking does to a defect a few pixels wide, and what the frame costs.
TILE_ABOVE = 2.0
TILE_SHRINK = 2.0
SAVE_TILES_SHRINK = 1.25
MAX_TILES = 16
DEFAULT_OVERLAP = 0.25
GEOMETRY_HELP = ("what the detector sees of a frame: auto (from the training images' sizes: the whole "
                 "frame for frames up to 2x the input, its aspect ratio kept; overlapping tiles for larger "
                 "ones), stretch (to a square, the seed's), aspect, or tile:SIZE[,OVERLAP] (square tiles of "
                 "SIZE frame pixels each shown at --image-size; OVERLAP a fraction of a tile, default 0.25)")


def image_size_of(path: str) -> tuple[int, int] | None:
    """(H, W) from the file's header, without decoding it (None if unreadable)."""
    try:
        with Image.open(path) as im:
            return im.size[1], im.size[0]
    except Exception:  # noqa: BLE001 - read_image names the file later
        return None


def typical_size(paths: list[str]) -> tuple[int, int]:
    """The median height and width of the images (ones that cannot be opened are skipped)."""
    sizes = [s for s in (image_size_of(p) for p in paths) if s is not None]
    if not sizes:
        raise ValueError(f"none of the {len(paths)} training images can be opened to read its size")
    hs, ws = zip(*sizes)
    return int(np.median(hs)), int(np.median(ws))


def aspect_input(frame: tuple[int, int], side: int) -> tuple[int, int]:
    """Input (h, w), multiples of 32, area about side^2, following the frame's aspect ratio."""
    ratio = frame[0] / frame[1]
    return round_to_stride(side * math.sqrt(ratio)), round_to_stride(side / math.sqrt(ratio))


def _tile_count(frame: tuple[int, int], tile: int, side: int, overlap: float) -> int:
    return len(plan_tiles(frame, tile, side, overlap)[1])


def auto_tile(frame: tuple[int, int], side: int, overlap: float = DEFAULT_OVERLAP) -> int:
    """The tile size (frame pixels) of rule 2-3 above."""
    base = TILE_SHRINK * side
    while _tile_count(frame, round(base), side, overlap) > MAX_TILES:
        base *= 1.02
    candidates = range(round(base), round(base * SAVE_TILES_SHRINK) + 1)
    return min(candidates, key=lambda t: (_tile_count(frame, t, side, overlap), t))


def parse_geometry(spec: str) -> tuple[str, int | None, float]:
    """"auto" | "stretch" | "aspect" | "tile:SIZE[,OVERLAP]" -> (mode, tile, overlap)."""
    if spec in ("auto", "stretch", "aspect"):
        return spec, None, DEFAULT_OVERLAP
    if spec.startswith("tile:"):
        parts = spec[5:].split(",")
        try:
            tile = int(parts[0])
            overlap = float(parts[1]) if len(parts) > 1 else DEFAULT_OVERLAP
            if len(parts) > 2 or tile < 1 or not 0 <= overlap < 1:
                raise ValueError
        except ValueError:
            raise ValueError(f"--geometry {spec!r}: tile:SIZE[,OVERLAP] takes a tile size in frame pixels and "
                             "an overlap fraction in [0, 1), e.g. tile:448 or tile:448,0.25") from None
        return "tile", tile, overlap
    raise ValueError(f"--geometry {spec!r}: use auto, stretch, aspect or tile:SIZE[,OVERLAP]")


def choose_geometry(spec: str, train_paths: list[str], side: int = 224,
                    interpolation: str = DEFAULT_INTERPOLATION) -> Geometry:
    """The geometry a run trains with (see the rule above for "auto")."""
    mode, tile, overlap = parse_geometry(spec)
    if mode == "stretch":
        return Geometry("stretch", (side, side), interpolation, reason="asked: --geometry stretch")
    frame = typical_size(train_paths)
    if side % STRIDE:
        if mode == "auto":
            return Geometry("stretch", (side, side), interpolation, frame_size=frame,
                            reason=f"--image-size {side} is not a multiple of {STRIDE}: stretch")
        raise ValueError(f"--geometry {spec}: needs --image-size a multiple of {STRIDE} (e.g. 224), got {side}")
    shrink = math.sqrt(frame[0] * frame[1]) / side
    if mode == "auto":
        if shrink <= TILE_ABOVE:
            size = aspect_input(frame, side)
            mode = "stretch" if size == (side, side) else "aspect"
            return Geometry(mode, size, interpolation, frame_size=frame,
                            reason=f"auto: {frame[0]}x{frame[1]} frames shrink {shrink:.2f}x into {side}^2 "
                                   f"(<= {TILE_ABOVE}x): whole frame, {size[0]}x{size[1]}")
        tile = auto_tile(frame, side, overlap)
        reason = (f"auto: {frame[0]}x{frame[1]} frames would shrink {shrink:.2f}x into {side}^2 (> {TILE_ABOVE}x): "
                  f"tiles of {tile} px shown at {side} ({tile / side:.2f}x)")
    elif mode == "aspect":
        size = aspect_input(frame, side)
        return Geometry("aspect", size, interpolation, frame_size=frame, reason="asked: --geometry aspect")
    else:
        reason = f"asked: --geometry {spec}"
    work, corners = plan_tiles(frame, tile, side, overlap)
    return Geometry("tile", (side, side), interpolation, work, tuple(corners), overlap, tile, frame, reason=reason)


def geometry_of_run(meta: dict) -> Geometry:
    """The geometry a run was trained with; runs from before the key stretched to image_size."""
    try:
        return Geometry.from_json(meta.get("geometry"), tuple(meta["image_size"]), meta.get("interpolation", "area"),
                                  where="run.json: geometry")
    except GeometryError as exc:
        raise ValueError(f"{exc}; re-train the run") from None


def load_prepared(items: list[tuple[str, str]], geometry: Geometry) -> LoadedImages:
    """Read (path, class) pairs through the geometry: tensors (N, 3, h, w), or every image's
    tiles (N * tiles, 3, h, w) when tiled (what a detector fits on: one model for all tiles).
    An unreadable file is logged and skipped, as training/data.load_images does."""
    tensors, paths, classes, skipped = [], [], [], []
    for path, cls in items:
        try:
            prepared = geometry.prepare(read_image(path))
        except ImageReadError as exc:
            log.warning("skipping %s", exc)
            skipped.append(path)
            continue
        tensors.append(prepared if geometry.tiled else prepared[None])
        paths.append(path)
        classes.append(cls)
    h, w = geometry.input_size
    stacked = np.concatenate(tensors) if tensors else np.zeros((0, 3, h, w), np.float32)
    return LoadedImages(stacked, paths, classes, skipped)


def frame_maps(predict, model, images: LoadedImages, geometry: Geometry, batch_size: int,
               desc: str) -> tuple[np.ndarray, np.ndarray]:
    """(image scores, frame maps) for images read by load_prepared: tiled, the tiles' maps are
    stitched into one map per image and the graph's per-tile score is replaced by the mean of
    that whole map (edge.decision.aggregate_maps, the function the runtime applies)."""
    from edge.decision import aggregate_maps

    scores, maps = predict(model, images.tensors, batch_size, desc=desc)
    if not geometry.tiled:
        return scores, maps
    n = geometry.tile_count
    stitched = geometry.stitch_many(maps.reshape(len(images.paths), n, *maps.shape[1:]))
    return aggregate_maps(stitched, "mean"), stitched
