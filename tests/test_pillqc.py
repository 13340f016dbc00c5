"""Real pill images (../shared/datasets/pillqc), seed protocol, --seed 0: train -> calibrate ->
evaluate -> export -> the edge runtime with a real subscriber."""
import csv
import os
import subprocess
import time

import numpy as np
import pytest

from conftest import free_tcp_endpoint, linegate_cmd, read_json
from edge.bundle import load_bundle
from edge.decision import DecisionRule
from edge.engine import open_engine
from edge.subscriber import Subscriber
from training.data import load_images

pytestmark = pytest.mark.pillqc


def _predictions(run, subset):
    with open(run / "predictions.csv") as fh:
        return [r for r in csv.DictReader(fh) if r["set"] == subset]


def test_metrics_and_split_follow_the_seed_protocol(pillqc_run):
    m = read_json(pillqc_run / "metrics.json")
    for key in ("auroc", "accuracy", "precision", "recall", "specificity", "f1", "fpr", "fnr"):
        assert 0.0 <= m["test"][key] <= 1.0, key
    assert m["test"]["auroc"] >= 0.98  # the foundation's bar on held-back images
    (tn, fp), (fn, tp) = m["test"]["confusion"]
    assert tn + fp == 49 and fn + tp == 26 + 121  # the protocol's test counts
    assert set(m["test"]["per_class"]) == {"normal", "chip", "dirt"}
    assert m["calibration"]["method"] == "binormal" and m["calibration"]["auroc"] > 0.9
    fit = m["calibration"]["threshold_fit"]  # the default threshold fits a normal to each class
    assert fit["normal_mean"] < fit["anomalous_mean"] and fit["threshold"] == m["calibration"]["threshold"]
    assert isinstance(m["calibration"]["threshold"], float)
    split = m["split"]
    assert (len(split["train"]), len(split["train_anomalous"]), len(split["calibration"])) == (70, 4, 60)
    sets = [{p for p, _ in split[k]} for k in ("train", "train_anomalous", "calibration", "test")]
    assert sum(map(len, sets)) == len(set().union(*sets)) == 330  # every image once


def test_onnx_runtime_matches_torch_on_real_images(pillqc_run):
    bundle = load_bundle(pillqc_run / "bundle")
    rows = _predictions(pillqc_run, "test")
    loaded = load_images([(r["path"], r["class"]) for r in rows], bundle.input_size)
    engine = open_engine(bundle)
    rule = DecisionRule.from_bundle(bundle)  # the calibrated image score, from the graph's outputs
    ort_scores = np.concatenate([rule.scores(*engine.infer(loaded.tensors[i:i + 16]))
                                 for i in range(0, len(rows), 16)])
    torch_scores = np.array([float(r["score"]) for r in rows])
    np.testing.assert_allclose(ort_scores, torch_scores, rtol=1e-3)
    threshold = bundle.decision["threshold"]
    assert [("reject" if s >= threshold else "accept") for s in ort_scores] == [r["decision"] for r in rows]
    assert bundle.manifest["parity"]["decision_mismatches"] == 0


def test_edge_runtime_decisions_equal_offline_evaluation(pillqc_run, tmp_path):
    rows = _predictions(pillqc_run, "test")
    folder = tmp_path / "line"
    folder.mkdir()
    for r in rows:  # the held-back images, linked (never copied into the repository)
        os.symlink(r["path"], folder / os.path.basename(r["path"]))
    endpoint = free_tcp_endpoint()
    got = []
    with Subscriber(endpoint) as sub:
        proc = subprocess.Popen(linegate_cmd("run", "--bundle", str(pillqc_run / "bundle"), "--source",
                                             f"folder:{folder}", "--publish", endpoint, "--max-batch", "8",
                                             "--wait-subscribers", "1"), stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 240
        while len(got) < len(rows) and time.monotonic() < deadline:
            msg = sub.recv(timeout_ms=1000)
            if msg is not None:
                got.append(msg.header)
        extra = sub.recv(timeout_ms=1500)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert extra is None, "more decisions than images"
    assert len(got) == len(rows)
    assert [h["seq"] for h in got] == list(range(len(rows)))
    offline = {os.path.basename(r["path"]): r for r in rows}
    assert sorted(h["source"] for h in got) == sorted(offline)  # exactly one decision per image
    for h in got:
        expected = offline[h["source"]]
        assert h["decision"] == expected["decision"], h["source"]
        assert h["score"] == pytest.approx(float(expected["score"]), rel=1e-3)
