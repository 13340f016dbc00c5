"""Frame geometry (edge/tiling.py, training/geometry.py): the tile grid, stitching, the
manifest block, the default rule, and a decision taken over the whole stitched map."""
import copy
import math

import numpy as np
import pytest

from edge.bundle import BundleError, validate_manifest
from edge.decision import DecisionRule, aggregate_maps
from edge.images import resize
from edge.tiling import STRIDE, Geometry, GeometryError, plan_tiles, tile_starts
from training.geometry import (
    MAX_TILES,
    aspect_input,
    auto_tile,
    choose_geometry,
    parse_geometry,
)


@pytest.mark.parametrize("length, side, overlap", [(224, 224, 0.25), (544, 224, 0.25), (576, 224, 0.25),
                                                    (1216, 224, 0.5), (256, 64, 0.25), (2048, 224, 0.0)])
def test_tile_starts_cover_the_length_with_the_overlap_on_the_stride(length, side, overlap):
    starts = tile_starts(length, side, overlap)
    assert starts[0] == 0 and starts[-1] == length - side  # flush with both edges
    assert all(s % STRIDE == 0 for s in starts)
    gaps = np.diff(starts)
    assert (gaps > 0).all()
    # every pixel covered, and neighbours overlap by at least the fraction asked, less the rounding to the stride
    assert (gaps <= side).all()
    assert (side - gaps >= overlap * side - STRIDE / 2).all()


def test_tile_starts_refuse_a_length_shorter_than_a_tile():
    with pytest.raises(GeometryError, match="shorter than the tile"):
        tile_starts(192, 224, 0.25)


def test_plan_tiles_for_a_portrait_frame():
    work, tiles = plan_tiles((1250, 500), 500, 224, 0.25)
    # the frame shown at 224 / 500: 560 x 224 rounded to the stride; one tile across, four down
    assert work == (576, 224)
    assert [x for _, x in tiles] == [0] * 4 and [y for y, _ in tiles][-1] == 576 - 224
    with pytest.raises(GeometryError, match="multiple of 32"):
        plan_tiles((1250, 500), 500, 100, 0.25)


def _tiled(work=(576, 224), side=224, overlap=0.25) -> Geometry:
    rows, cols = tile_starts(work[0], side, overlap), tile_starts(work[1], side, overlap)
    return Geometry("tile", (side, side), "area", work, tuple((y, x) for y in rows for x in cols), overlap, side)


def test_stitch_puts_each_tile_map_at_its_place_and_averages_overlaps():
    geo = _tiled((320, 288), side=224)  # 2 x 2 tiles, overlapping
    stride = 4
    mh = mw = 224 // stride
    truth = np.random.default_rng(0).random((320 // stride, 288 // stride)).astype(np.float32)
    # tile maps cut from one frame map: stitching must give that map back exactly
    cut = np.stack([truth[y // stride:y // stride + mh, x // stride:x // stride + mw] for y, x in geo.tiles])
    np.testing.assert_allclose(geo.stitch(cut), truth, rtol=1e-6)
    # tiles that disagree: a cell seen by all four tiles is their mean, a corner cell its one tile's
    values = np.arange(1, 5, dtype=np.float32)[:, None, None] * np.ones((4, mh, mw), np.float32)
    out = geo.stitch(values)
    assert out.shape == (80, 72)
    assert out[0, 0] == 1 and out[-1, -1] == 4 and out[40, 36] == pytest.approx(2.5)
    batch = geo.stitch_many(np.stack([cut, values]))
    np.testing.assert_allclose(batch[0], truth, rtol=1e-6)
    np.testing.assert_allclose(batch[1], out)
    with pytest.raises(GeometryError, match="3 tile maps"):
        geo.stitch(values[:3])


def test_prepare_cuts_the_resized_frame_into_the_recorded_tiles():
    rgb = np.random.default_rng(1).integers(0, 255, (1250, 500, 3), dtype=np.uint8)
    work, tiles = plan_tiles(rgb.shape[:2], 500, 224, 0.25)
    geo = Geometry("tile", (224, 224), "staged", work, tuple(tiles), 0.25, 500)
    out = geo.prepare(rgb)
    assert out.shape == (len(tiles), 3, 224, 224) and out.dtype == np.float32
    resized = resize(rgb, work, "staged")
    for t, (y, x) in zip(out, tiles):
        np.testing.assert_array_equal(t, resized[y:y + 224, x:x + 224].transpose(2, 0, 1))
    assert geo.tensor_shape == (3, 224, 224) and geo.tile_count == len(tiles)
    flat = Geometry("aspect", (352, 160), "staged")
    assert flat.prepare(rgb).shape == (3, 352, 160)
    assert flat.stitch(np.ones((1, 88, 40))).shape == (88, 40)


def _manifest(geometry=None) -> dict:
    m = {"format_version": 1, "model_id": "m", "detector": "padim",
         "input": {"name": "pixels", "shape": [-1, 3, 224, 224], "layout": "NCHW", "colour": "RGB",
                   "resize": "stretch", "normalisation": {"where": "in_graph"}},
         "outputs": {"score": {"name": "score", "aggregate": "mean"}, "map": {"name": "anomaly_map", "shape": [-1, 56, 56]}},
         "decision": {"aggregate": "mean", "threshold": 1.0, "method": "youden",
                      "normalisation": {"min": 0.0, "max": 2.0}},
         "display_range": [0.0, 2.0], "classes": {"normal": "good", "anomalous": ["defect"]},
         "files": {"model.onnx": {"kind": "onnx", "precision": "fp32", "sha256": "0"}}}
    if geometry is not None:
        m["geometry"] = geometry
    return m


def test_manifest_geometry_round_trips_and_old_bundles_stretch():
    old = Geometry.from_manifest(_manifest())
    assert (old.mode, old.input_size, old.tiled, old.interpolation) == ("stretch", (224, 224), False, "area")
    geo = _tiled()
    block = geo.to_json()
    validate_manifest(_manifest(block))
    back = Geometry.from_manifest(_manifest(block))
    assert back == Geometry("tile", (224, 224), "area", geo.work_size, geo.tiles, geo.overlap, geo.tile)
    assert back.describe().startswith(f"tile: {len(geo.tiles)} tiles of 224x224")


@pytest.mark.parametrize("change, message", [
    (lambda g: g.update(mode="mosaic"), "geometry.mode' is 'mosaic'"),
    (lambda g: g.update(input=[256, 256]), "differs from the model input"),
    (lambda g: g.pop("tiles"), "geometry.tiles' is missing"),
    (lambda g: g["tiles"].pop(), "leave part of the work frame"),
    (lambda g: g["tiles"].__setitem__(0, [0, 16]), r"geometry.tiles\[0\]' \[0, 16\]"),
    (lambda g: g["tiles"].__setitem__(0, [576, 0]), r"must lie inside the work frame"),
    (lambda g: g.update(work=[100, 224]), "smaller than one tile"),
    (lambda g: g.update(stitch="max"), "geometry.stitch' is 'max'"),
    (lambda g: g.update(work="576x224"), "geometry.work' is '576x224'"),
])
def test_a_broken_geometry_block_is_refused_naming_the_key(change, message):
    block = copy.deepcopy(_tiled().to_json())
    change(block)
    with pytest.raises(BundleError, match=message):
        validate_manifest(_manifest(block))


def test_the_decision_of_a_tiled_frame_is_taken_over_its_whole_stitched_map():
    geo = _tiled((320, 288))
    tile_maps = np.zeros((1, 4, 56, 56), np.float32)
    tile_maps[0, 3, -5:, -5:] = 9.0  # a defect in the last tile's corner only
    frame_map = geo.stitch_many(tile_maps)
    rule = DecisionRule(threshold=5.0, aggregate="max")
    (decision,) = rule.decide(None, frame_map)
    assert decision.decision == "reject" and decision.score == 9.0
    mean_rule = DecisionRule(threshold=0.01, aggregate="mean")
    (mean,) = mean_rule.decide(None, frame_map)
    assert mean.score == pytest.approx(float(aggregate_maps(frame_map, "mean")[0]))
    assert mean.score != pytest.approx(float(tile_maps[0].mean()))  # not the mean of the tiles


@pytest.mark.parametrize("spec, parsed", [("auto", ("auto", None, 0.25)), ("stretch", ("stretch", None, 0.25)),
                                          ("aspect", ("aspect", None, 0.25)), ("tile:448", ("tile", 448, 0.25)),
                                          ("tile:600,0.5", ("tile", 600, 0.5))])
def test_geometry_specs(spec, parsed):
    assert parse_geometry(spec) == parsed


@pytest.mark.parametrize("spec", ["tiles", "tile:", "tile:0", "tile:448,1.5", "tile:448,0.2,3", "square"])
def test_bad_geometry_specs_name_the_option(spec):
    with pytest.raises(ValueError, match="--geometry"):
        parse_geometry(spec)


def _images(tmp_path, size, n=3):
    import cv2

    paths = []
    for i in range(n):
        path = tmp_path / f"{size[0]}x{size[1]}_{i}.png"
        cv2.imwrite(str(path), np.zeros((*size, 3), np.uint8))
        paths.append(str(path))
    return paths


@pytest.mark.parametrize("size, mode, input_size", [
    ((225, 225), "stretch", (224, 224)),  # pillQC: as before
    ((300, 300), "stretch", (224, 224)),  # ELPV
    ((600, 300), "aspect", (320, 160)),  # an elongated part not much larger than the input
    ((1250, 500), "tile", (224, 224)),  # KolektorSDD
    ((900, 900), "tile", (224, 224)),  # a large object frame
    ((2048, 2448), "tile", (224, 224)),  # a 5 MP camera
])
def test_auto_geometry_from_the_training_images_sizes(tmp_path, size, mode, input_size):
    geo = choose_geometry("auto", _images(tmp_path, size), 224)
    assert (geo.mode, geo.input_size) == (mode, input_size)
    assert geo.frame_size == size and geo.reason.startswith("auto:")
    shrink = math.sqrt(size[0] * size[1]) / 224
    if mode == "tile":
        assert 1 < geo.tile_count <= MAX_TILES
        # tiles see the frame shrunk less than the whole frame would be
        assert geo.tile / 224 < shrink
    else:
        assert shrink <= 2


def test_auto_tiles_of_kolektorsdd_frames():
    tile = auto_tile((1250, 500), 224)
    work, tiles = plan_tiles((1250, 500), tile, 224, 0.25)
    assert len(tiles) == 3 and work[1] == 224  # one tile across the 500 px width
    assert 2.0 <= tile / 224 <= 2.5
    assert aspect_input((1250, 500), 224) == (352, 128)


def test_forced_geometries(tmp_path):
    paths = _images(tmp_path, (1250, 500))
    assert choose_geometry("stretch", paths, 224).input_size == (224, 224)
    assert choose_geometry("aspect", paths, 224).input_size == (352, 128)
    geo = choose_geometry("tile:224,0.5", paths, 224)
    assert geo.tiled and geo.work_size == (1248, 512) and geo.tile == 224 and geo.overlap == 0.5
    with pytest.raises(ValueError, match="multiple of 32"):
        choose_geometry("tile:224", paths, 100)
    assert choose_geometry("auto", paths, 100).mode == "stretch"  # said in its reason
