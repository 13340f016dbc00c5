import numpy as np
import pytest

from edge.decision import DecisionRule, aggregate_maps
from training.calibrate import binary_metrics, per_class_accuracy, youden_threshold


def test_youden_threshold_hand_computed():
    # normal: 0.1 0.2 0.3 0.6 ; anomalous: 0.5 0.7 0.8 0.9
    scores = np.array([0.1, 0.2, 0.3, 0.6, 0.5, 0.7, 0.8, 0.9])
    anomalous = np.array([0, 0, 0, 0, 1, 1, 1, 1], bool)
    # threshold 0.7: TPR 3/4, FPR 0 -> J = 0.75; threshold 0.5: TPR 1, FPR 1/4 -> J = 0.75;
    # sklearn keeps the first maximum (the higher threshold, 0.7); next lower score is 0.6
    assert youden_threshold(scores, anomalous) == pytest.approx(0.65)
    with pytest.raises(ValueError, match="both normal and anomalous"):
        youden_threshold(scores, np.zeros(8, bool))


def test_binary_metrics_hand_computed():
    scores = np.array([0.1, 0.2, 0.7, 0.4, 0.8, 0.9])
    anomalous = np.array([0, 0, 0, 1, 1, 1], bool)
    m = binary_metrics(scores, anomalous, threshold=0.5)
    assert m["confusion"] == [[2, 1], [1, 2]]  # [[tn, fp], [fn, tp]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(2 / 3)
    assert m["fpr"] == pytest.approx(1 / 3) and m["fnr"] == pytest.approx(1 / 3)
    assert m["auroc"] == pytest.approx(8 / 9)  # 8 of 9 (anomalous, normal) pairs ordered
    # a score equal to the threshold is a reject
    assert binary_metrics(np.array([0.5, 0.1]), np.array([1, 0], bool), 0.5)["confusion"] == [[1, 0], [0, 1]]


def test_per_class_accuracy():
    acc = per_class_accuracy(np.array([0.1, 0.9, 0.9, 0.2, 0.8]),
                             ["normal", "normal", "chip", "chip", "dirt"], "normal", 0.5)
    assert acc == {"chip": {"n": 2, "accuracy": 0.5}, "dirt": {"n": 1, "accuracy": 1.0},
                   "normal": {"n": 2, "accuracy": 0.5}}


def test_aggregates_and_decision_rule():
    maps = np.zeros((2, 10, 10), np.float32)
    maps[0, 0, :5] = 10.0  # 5 hot patches of 100
    assert aggregate_maps(maps, "mean")[0] == pytest.approx(0.5)
    assert aggregate_maps(maps, "max")[0] == pytest.approx(10.0)
    assert aggregate_maps(maps, "topk:5")[0] == pytest.approx(10.0)
    assert aggregate_maps(maps, "topk:10")[0] == pytest.approx(5.0)
    with pytest.raises(ValueError):
        aggregate_maps(maps, "median")
    rule = DecisionRule(threshold=0.5, norm_min=0.0, norm_max=2.0)
    d = rule.decide(np.array([0.5, 0.49], np.float32), maps)
    assert [x.decision for x in d] == ["reject", "accept"]
    assert d[0].score_norm == pytest.approx(0.25)
    # an aggregate the graph does not compute is taken from the map
    d = DecisionRule(threshold=5.0, aggregate="max").decide(np.array([0.5, 0.0], np.float32), maps)
    assert [x.decision for x in d] == ["reject", "accept"]
