"""Overriding the bundle's calibrated decision at run time: DecisionRule.from_bundle, the run
config's [decision] section and `linegate run --threshold/--aggregate`, on the tiny bundle
(score = mean brightness / 255; calibrated: aggregate mean, threshold 0.5) with a real ONNX
Runtime session, real ZeroMQ sockets and the real `linegate run` process."""
from __future__ import annotations

import subprocess

import cv2
import numpy as np
import pytest

from conftest import free_tcp_endpoint, linegate_cmd, write_grey_images
from edge.bundle import load_bundle
from edge.decision import DecisionRule
from runtime_helpers import Collector, RunProcess, write_config

LEVELS = [10, 100, 140, 200, 250]


def _bundle_rule(level: int) -> str:
    return "reject" if level / 255 >= 0.5 else "accept"


def test_from_bundle_takes_the_overrides_and_refuses_an_aggregate_without_a_threshold(tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    calibrated = DecisionRule.from_bundle(bundle)
    assert (calibrated.threshold, calibrated.aggregate) == (0.5, "mean")
    lower = DecisionRule.from_bundle(bundle, threshold=0.3)
    assert (lower.threshold, lower.aggregate) == (0.3, "mean")
    maps = np.full((2, 16, 16), 0.4, np.float32)
    scores = np.array([0.4, 0.4], np.float32)
    assert [d.decision for d in calibrated.decide(scores, maps)] == ["accept"] * 2
    assert [d.decision for d in lower.decide(scores, maps)] == ["reject"] * 2
    # the calibrated aggregate named again needs no threshold; another one does
    assert DecisionRule.from_bundle(bundle, aggregate="mean").threshold == 0.5
    peak = DecisionRule.from_bundle(bundle, threshold=0.9, aggregate="max")
    assert (peak.threshold, peak.aggregate) == (0.9, "max")
    with pytest.raises(ValueError, match="aggregate 'max' differs from the calibrated 'mean'.*give a threshold too"):
        DecisionRule.from_bundle(bundle, aggregate="max")


def test_run_threshold_flag_changes_the_decisions(tiny_bundle, tmp_path):
    names = write_grey_images(tmp_path / "parts", LEVELS)
    endpoint = free_tcp_endpoint()
    sub = Collector(endpoint, ("decision",))
    sub.start()
    try:
        out = subprocess.run(linegate_cmd("run", "--bundle", str(tiny_bundle), "--source",
                                          f"folder:{tmp_path / 'parts'}", "--publish", endpoint,
                                          "--wait-subscribers", "1", "--threshold", "0.3"),
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        sub.wait_for(lambda: len(sub.decisions()) >= len(LEVELS), 30, "a decision per image")
    finally:
        sub.stop()
    decisions = sub.decisions()
    assert [d["source"] for d in decisions] == names
    expected = ["reject" if v / 255 >= 0.3 else "accept" for v in LEVELS]
    assert [d["decision"] for d in decisions] == expected == ["accept", "reject", "reject", "reject", "reject"]
    assert expected != [_bundle_rule(v) for v in LEVELS]  # level 100 is an accept at the bundle's 0.5
    for d, level in zip(decisions, LEVELS):
        assert d["threshold"] == 0.3 and d["aggregate"] == "mean"
        assert d["score"] == pytest.approx(level / 255, abs=1e-5)


def test_config_decision_section_with_another_aggregate(tiny_bundle, tmp_path):
    """[decision] aggregate = "max", threshold = 0.9: a dark part with one bright spot (mean
    low, max high) is now a reject, a uniformly bright part (max 0.78) an accept; the bundle's
    own rule (mean >= 0.5) decides both the other way."""
    parts = tmp_path / "parts"
    parts.mkdir()
    spot = np.full((40, 46, 3), 20, np.uint8)
    spot[4:18, 4:18] = 255
    images = {"a_spot.png": spot, "b_bright.png": np.full((40, 46, 3), 200, np.uint8),
              "c_dark.png": np.full((40, 46, 3), 10, np.uint8)}
    for name, image in images.items():
        cv2.imwrite(str(parts / name), image)
    endpoint = free_tcp_endpoint()
    config = write_config(tmp_path / "linegate.toml", {
        "engine": {"bundle": str(tiny_bundle)},
        "decision": {"threshold": 0.9, "aggregate": "max"},
        "publisher": {"endpoint": endpoint, "wait_subscribers": 1},
        "source": [{"uri": f"folder:{parts}"}],
    })
    sub = Collector(endpoint, ("decision",))
    sub.start()
    run = RunProcess(config, tmp_path / "run.log")
    try:
        assert run.wait(timeout=120) == 0, run.log()
        sub.wait_for(lambda: len(sub.decisions()) >= len(images), 30, "a decision per image")
    finally:
        run.kill()
        sub.stop()
    got = {d["source"]: d for d in sub.decisions()}
    assert list(got) == list(images)
    assert [got[n]["decision"] for n in images] == ["reject", "accept", "accept"]
    assert all(d["aggregate"] == "max" and d["threshold"] == 0.9 for d in got.values())
    assert got["a_spot.png"]["score"] > 0.9  # the spot's peak, not the part's mean (about 0.18)
    assert got["b_bright.png"]["score"] == pytest.approx(200 / 255, abs=1e-4)
    # the bundle's own rule decides the spot and the bright part the other way
    bundle = load_bundle(tiny_bundle)
    mean_scores = np.array([images[n].mean() / 255 for n in images], np.float32)
    calibrated = DecisionRule.from_bundle(bundle).decide(mean_scores, np.zeros((3, 16, 16), np.float32))
    assert [d.decision for d in calibrated] == ["accept", "reject", "accept"]


def test_an_aggregate_without_a_threshold_is_a_configuration_error(tiny_bundle, tmp_path):
    write_grey_images(tmp_path / "parts", [10, 250])
    out = subprocess.run(linegate_cmd("run", "--bundle", str(tiny_bundle), "--source", f"folder:{tmp_path / 'parts'}",
                                      "--publish", free_tcp_endpoint(), "--aggregate", "max"),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert ("command line: key 'decision.aggregate': aggregate 'max' differs from the calibrated 'mean': "
            "the bundle's threshold does not apply to it; give a threshold too") in out.stderr
    assert "running:" not in out.stderr  # refused before any frame was read
    path = write_config(tmp_path / "linegate.toml", {
        "engine": {"bundle": str(tiny_bundle)}, "decision": {"aggregate": "topk:10"},
        "publisher": {"endpoint": free_tcp_endpoint()}, "source": [{"uri": f"folder:{tmp_path / 'parts'}"}]})
    out = subprocess.run(linegate_cmd("run", "--config", str(path)), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"{path}: key 'decision.aggregate': aggregate 'topk:10' differs" in out.stderr
    assert "give a threshold too" in out.stderr
