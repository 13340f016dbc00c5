"""Overlays: OpenCV's JET colormap through a prebuilt table, the display range, the banner."""
import cv2
import numpy as np
import pytest

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


def test_overlay_policy_every_reject_and_every_nth_accept():
    from edge.decision import ERROR
    from edge.overlay import OverlayPolicy

    def decision(kind: str) -> Decision:
        return Decision(0.0, 0.0, 1.0, kind)

    policy = OverlayPolicy(accepts_every=3)
    # 7 accepts with rejects and an error between them: accepts 1, 4 and 7 get an overlay
    stream = [ACCEPT, ACCEPT, REJECT, ACCEPT, ACCEPT, ERROR, ACCEPT, REJECT, ACCEPT, ACCEPT]
    wanted = [policy.wants(decision(kind)) for kind in stream]
    assert wanted == [True, False, True, False, True, False, False, True, False, True]
    accepts = [w for kind, w in zip(stream, wanted) if kind == ACCEPT]
    assert accepts == [True, False, False, True, False, False, True]
    assert OverlayPolicy(0).wants(decision(ACCEPT)) is False and OverlayPolicy(0).wants(decision(REJECT)) is True
    every = OverlayPolicy(1)
    assert [every.wants(decision(ACCEPT)) for _ in range(3)] == [True] * 3
    with pytest.raises(ValueError, match="accepts_every must be >= 0"):
        OverlayPolicy(-1)
