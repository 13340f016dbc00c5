"""Overlays: OpenCV's JET colormap through a prebuilt table, the display range, the banner."""
import cv2
import numpy as np

from edge.decision import ACCEPT, REJECT, Decision
from edge.overlay import colourise, render_overlay


def test_colourise_is_opencvs_jet_colormap():
    rng = np.random.default_rng(0)
    for shape in ((1, 256), (225, 225), (31, 57)):
        grey = rng.integers(0, 256, shape, dtype=np.uint8)
        np.testing.assert_array_equal(colourise(grey), cv2.applyColorMap(grey, cv2.COLORMAP_JET))


def test_overlay_maps_the_display_range_onto_the_colormap_and_draws_the_decision():
    frame = np.full((120, 160, 3), 128, np.uint8)
    amap = np.zeros((14, 20), np.float32)
    amap[:, 10:] = 9.0  # right half at the top of the display range, left half at the bottom
    out = render_overlay(frame, amap, (1.0, 9.0), Decision(5.0, 0.5, 4.0, REJECT), alpha=1.0)
    assert out.shape == (120, 160, 3) and out.dtype == np.uint8
    b, g, r = (int(c) for c in out[80, 40])  # cold: JET's dark blue
    assert b > 100 and r < 30
    b, g, r = (int(c) for c in out[80, 130])  # hot: JET's dark red
    assert r > 100 and b < 30
    assert tuple(int(c) for c in out[119, 80]) == (0, 0, 255)  # the red reject border
    accepted = render_overlay(frame, amap, (1.0, 9.0), Decision(1.0, 0.0, 4.0, ACCEPT), alpha=1.0)
    assert tuple(int(c) for c in accepted[119, 80]) == (0, 200, 0)
