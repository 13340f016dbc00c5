import cv2
import numpy as np
import pytest
from scipy.stats import boxcox

from edge.decision import DecisionRule, aggregate_maps
from training.calibrate import (AGGREGATE_CANDIDATES, binary_metrics, binormal_cutoff, binormal_fit, choose_aggregate,
                                cost_threshold, f1_threshold, fpr_threshold, parse_threshold_method, per_class_accuracy,
                                pick_threshold, youden_threshold)


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


def test_a_score_that_is_not_a_number_is_an_error_never_an_accept():
    # NaN >= threshold is False: a bare comparison would accept a part the engine could not judge
    scores = np.array([np.nan, np.inf, -np.inf, 0.49, 0.5], np.float32)
    d = DecisionRule(threshold=0.5).decide(scores, np.zeros((5, 2, 2), np.float32))
    assert [x.decision for x in d] == ["error", "error", "error", "accept", "reject"]
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="must be a finite number"):
            DecisionRule(threshold=bad)


# The same calibration set as test_youden_threshold_hand_computed:
# normal 0.1 0.2 0.3 0.6 ; anomalous 0.5 0.7 0.8 0.9 (reject if score >= threshold)
HAND_SCORES = np.array([0.1, 0.2, 0.3, 0.6, 0.5, 0.7, 0.8, 0.9])
HAND_ANOMALOUS = np.array([0, 0, 0, 0, 1, 1, 1, 1], bool)


def test_f1_threshold_hand_computed():
    # t = 0.5: tp 4, fp 1, fn 0 -> F1 8/9 ; t = 0.7: tp 3 fp 0 fn 1 -> 6/7 ; t = 0.6: 3/4 ; t = 0.3: 8/10
    # best is 0.5; the next lower score is 0.3 -> threshold 0.4
    assert f1_threshold(HAND_SCORES, HAND_ANOMALOUS) == pytest.approx(0.4)
    m = binary_metrics(HAND_SCORES, HAND_ANOMALOUS, 0.4)
    assert m["f1"] == pytest.approx(8 / 9) and m["confusion"] == [[3, 1], [0, 4]]


@pytest.mark.parametrize("rate, expected, false_rejects", [
    (0.0, 0.65, 0),    # no good part may be rejected: above 0.6 (the top normal), below 0.7
    (0.25, 0.4, 1),    # 1 of 4 normal may go: 0.6 is rejected, lowest then is 0.5 -> (0.5 + 0.3) / 2
    (0.5, 0.25, 2),    # 2 of 4: 0.3 and 0.6 rejected -> (0.3 + 0.2) / 2
    (0.74, 0.25, 2),   # 2.96 of 4 rounds down to 2
    (0.75, 0.15, 3),
])
def test_fpr_threshold_hand_computed(rate, expected, false_rejects):
    t = fpr_threshold(HAND_SCORES, HAND_ANOMALOUS, rate)
    assert t == pytest.approx(expected)
    m = binary_metrics(HAND_SCORES, HAND_ANOMALOUS, t)
    assert m["confusion"][0][1] == false_rejects and m["fpr"] <= rate


@pytest.mark.parametrize("normal, anomalous, expected", [
    ((0.0, 1.0), (4.0, 1.0), 2.0),  # equal spreads: halfway
    # N(0, 1) vs N(3, 2): the densities cross where t^2/2 - (t - 3)^2/8 = ln 2, i.e.
    # 3t^2 + 6t - 9 - 8 ln 2 = 0 -> t = -1 + sqrt(1 + (9 + 8 ln 2) / 3) = 1.41834...
    ((0.0, 1.0), (3.0, 2.0), -1 + np.sqrt(1 + (9 + 8 * np.log(2)) / 3)),
    ((10.0, 0.5), (11.0, 0.5), 10.5),
    # 20 SDs apart: TPR - FPR is 1 to float64 over most of the gap, yet the cutoff is still found
    ((0.0, 1.0), (40.0, 1.0), 20.0),
    # N(0, 1) vs N(40, 3): t^2/2 = (t - 40)^2/18 + ln 3 -> 8t^2 + 80t - 1600 - 18 ln 3 = 0
    ((0.0, 1.0), (40.0, 3.0), (-80 + np.sqrt(80**2 + 32 * (1600 + 18 * np.log(3)))) / 16),
])
def test_binormal_cutoff_hand_computed(normal, anomalous, expected):
    assert binormal_cutoff(*normal, *anomalous) == pytest.approx(expected, rel=1e-6)


def _spread_defects(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Good parts in a tight cluster, defects spread wide (as every detector scores pillQC)."""
    rng = np.random.default_rng(seed)
    scores = np.concatenate([np.exp(rng.normal(0.0, 0.05, 30)), np.exp(rng.normal(0.5, 0.2, 30))])
    return scores, np.repeat([False, True], 30)


def test_binormal_fit_agrees_with_the_closed_form_and_leans_toward_the_tight_class():
    from scipy.special import inv_boxcox
    from scipy.stats import boxcox

    scores, anomalous = _spread_defects()
    fit = binormal_fit(scores, anomalous)
    # independently: scipy's lambda, then the crossing of the two fitted normals as a quadratic's root
    x, lam = boxcox(scores)
    mn, sn = x[~anomalous].mean(), x[~anomalous].std(ddof=1)
    md, sd = x[anomalous].mean(), x[anomalous].std(ddof=1)
    roots = np.roots([1 / sn**2 - 1 / sd**2, 2 * (md / sd**2 - mn / sn**2),
                      mn**2 / sn**2 - md**2 / sd**2 + 2 * np.log(sn / sd)])
    root = next(r.real for r in roots if mn < r.real < md)
    assert fit.boxcox_lambda == pytest.approx(lam)
    assert fit.threshold == pytest.approx(inv_boxcox(root, lam), rel=1e-6)
    assert pick_threshold(scores, anomalous, "binormal") == fit.threshold
    # the reason it exists: nearer the good parts than the middle of the gap youden takes
    assert scores[~anomalous].max() < scores[anomalous].min()  # the classes do not overlap here
    assert fit.threshold < youden_threshold(scores, anomalous)
    # a change of score units moves the threshold with them (Box-Cox's lambda does not change),
    # however large or small the units
    for units in (37.0, 1e12, 1e-9):
        assert binormal_fit(scores * units, anomalous).threshold == pytest.approx(units * fit.threshold, rel=1e-5)


@pytest.mark.parametrize("change, message", [
    (lambda s, a: (s[[0, 1, 2, 3, 30, 31, 32, 33]], a[[0, 1, 2, 3, 30, 31, 32, 33]]), "at least 5 .* it has 4"),
    (lambda s, a: (s - 1.0, a), "positive scores .* go down to -"),
    (lambda s, a: (s, ~a), "do not score above"),
    (lambda s, a: (np.where(a, s, 1.0), a), "all equal"),
])
def test_binormal_fit_says_why_it_cannot_fit(change, message):
    with pytest.raises(ValueError, match=message):
        binormal_fit(*change(*_spread_defects()))


def test_calibration_falls_back_to_youden_and_says_so_when_binormal_cannot_fit():
    from types import SimpleNamespace

    from training.train import calibrate_on

    def calibration_set(scores: np.ndarray, anomalous: np.ndarray) -> SimpleNamespace:
        maps = np.broadcast_to(scores[:, None, None], (len(scores), 4, 4)).astype(np.float32)
        classes = ["dirt" if a else "normal" for a in anomalous]
        return SimpleNamespace(anomalous=anomalous, maps=maps, graph_scores=scores.astype(np.float32),
                               images=SimpleNamespace(classes=classes), normal="normal", scores=None)

    scores, anomalous = _spread_defects()
    fitted = calibrate_on(calibration_set(scores, anomalous))
    assert fitted["method"] == fitted["method_requested"] == "binormal" and fitted["method_fallback"] is None
    assert fitted["threshold"] == pytest.approx(binormal_fit(scores, anomalous).threshold, rel=1e-5)
    assert fitted["threshold_fit"]["boxcox_lambda"] == pytest.approx(binormal_fit(scores, anomalous).boxcox_lambda,
                                                                     rel=1e-4)
    small = calibrate_on(calibration_set(HAND_SCORES, HAND_ANOMALOUS))  # 4 of each
    assert small["method"] == "youden" and small["method_requested"] == "binormal"
    assert "at least 5" in small["method_fallback"]
    assert set(small["threshold_fit"]) == set(fitted["threshold_fit"])  # metrics.json keeps its keys
    assert set(small["threshold_fit"].values()) == {None} and set(small) == set(fitted)
    youden = calibrate_on(calibration_set(scores, anomalous), method="youden")
    assert youden["method"] == "youden" and set(youden["threshold_fit"].values()) == {None}
    from training.report import _fallback_text  # the report says it too

    assert "<b>binormal</b> was asked for" in _fallback_text(small) and "at least 5" in _fallback_text(small)
    assert _fallback_text(fitted) == ""
    assert small["threshold"] == pytest.approx(0.65)  # the hand-computed Youden point


def test_threshold_methods_by_name():
    assert pick_threshold(HAND_SCORES, HAND_ANOMALOUS, "youden") == pytest.approx(0.65)
    assert pick_threshold(HAND_SCORES, HAND_ANOMALOUS, "f1") == pytest.approx(0.4)
    assert pick_threshold(HAND_SCORES, HAND_ANOMALOUS, "fpr:0.5") == pytest.approx(0.25)
    assert pick_threshold(HAND_SCORES, HAND_ANOMALOUS, "cost:20@0.1") == pytest.approx(0.4)
    assert parse_threshold_method("cost:20@0.01") == ("cost", (20.0, 0.01))
    for bad in ("otsu", "fpr:", "fpr:x", "fpr:1.5", "fpr:-0.1", "cost:", "cost:5", "cost:0@0.1", "cost:5@1",
                "cost:5@0", "cost:x@0.1", "cost:inf@0.5", "cost:nan@0.5", "cost:5@0.1@2"):
        with pytest.raises(ValueError, match=r"binormal, youden, f1, fpr:RATE .* or cost:C@P"):
            parse_threshold_method(bad)


@pytest.mark.parametrize("escape_cost, prevalence, expected, confusion", [
    # ROC of the hand set, thresholds high to low: 0.9 (FPR 0, TPR 1/4), 0.8 (0, 1/2), 0.7 (0, 3/4),
    # 0.6 (1/4, 3/4), 0.5 (1/4, 1), 0.3 (1/2, 1) ... cost = (1 - P) FPR + C P (1 - TPR)
    (1.0, 0.5, 0.65, [[4, 0], [1, 3]]),   # C P = 1 - P: Youden's point (0.7: cost 1/8, ties 0.5, higher wins)
    (2.0, 0.25, 0.65, [[4, 0], [1, 3]]),  # 0.7: 0.5 x 1/4 = 0.125 ; 0.5: 0.75 x 1/4 = 0.1875
    (4.0, 0.25, 0.4, [[3, 1], [0, 4]]),   # 0.7: 1 x 1/4 = 0.25 ; 0.5: 0.1875 -> (0.5 + 0.3) / 2
    (20.0, 0.1, 0.4, [[3, 1], [0, 4]]),   # escapes dear: 0.7 costs 0.5, 0.5 costs 0.225, 0.3 costs 0.45
])
def test_cost_threshold_hand_computed(escape_cost, prevalence, expected, confusion):
    t = cost_threshold(HAND_SCORES, HAND_ANOMALOUS, escape_cost, prevalence)
    assert t == pytest.approx(expected)
    assert binary_metrics(HAND_SCORES, HAND_ANOMALOUS, t)["confusion"] == confusion


def test_cost_threshold_is_youden_when_the_costs_balance():
    rng = np.random.default_rng(3)
    for _ in range(20):
        anomalous = rng.random(60) < 0.4
        scores = rng.normal(size=60) + 1.5 * anomalous
        p = rng.uniform(0.01, 0.5)
        assert cost_threshold(scores, anomalous, (1 - p) / p, p) == pytest.approx(youden_threshold(scores, anomalous))


def test_choose_aggregate_by_calibration_auroc():
    # 8x8 maps (64 patches). Normal: uniform 1.0, 1.1, 1.2, 1.3. Anomalous (3): uniform 1.0 with
    # one patch at 2.0. Aggregates of an anomalous map: mean 1 + 1/64, top 25% (16 patches)
    # 17/16, top 10% (6) 7/6, top 5% (3) 4/3, top 1% (1) = max = 2. Against the normal scores
    # these beat 1, 1, 2, 4, 4, 4 of the 4 normals: AUROC 1/4, 1/4, 2/4, 1, 1, 1.
    normal = np.stack([np.full((8, 8), v, np.float32) for v in (1.0, 1.1, 1.2, 1.3)])
    defect = np.ones((3, 8, 8), np.float32)
    defect[:, 2, 5] = 2.0
    maps, anomalous = np.concatenate([normal, defect]), np.array([0] * 4 + [1] * 3, bool)
    choice = choose_aggregate(maps, anomalous)
    assert {k: choice.auroc[k] for k in ("mean", "topk:25", "topk:10", "topk:5", "topk:1", "max")} == \
        pytest.approx({"mean": 0.25, "topk:25": 0.25, "topk:10": 0.5, "topk:5": 1.0, "topk:1": 1.0, "max": 1.0})
    assert list(choice.auroc) == list(AGGREGATE_CANDIDATES) == list(choice.separation)
    # topk:5, topk:1 and max tie on AUROC; on the Box-Cox scale of the calibration scores the
    # single hot cell stands further above the good parts under topk:1 and max (2) than under
    # topk:5 (4/3): the widest wins, and between the two equal ones the earlier
    s = np.array([1.0, 1.1, 1.2, 1.3, 2.0, 2.0, 2.0])
    t, _ = boxcox(s / np.exp(np.log(s).mean()))
    assert choice.separation["max"] == pytest.approx((t[4:].mean() - t[:4].mean()) / np.std(t[:4], ddof=1), rel=1e-4)
    assert choice.separation["topk:5"] < choice.separation["max"]
    assert choice.chosen == "topk:1" and "widest separation" in choice.reason


def test_separation_ignores_the_units_and_power_of_a_score():
    from training.calibrate import separation

    rng = np.random.default_rng(3)
    good, bad = rng.lognormal(0.0, 0.3, 60), rng.lognormal(1.0, 0.5, 20)
    scores, anomalous = np.concatenate([good, bad]), np.array([0] * 60 + [1] * 20, bool)
    base = separation(scores, anomalous)
    # a squared distance and a plain one, in any units, order and spread the parts alike
    assert separation(7.0 * scores ** 2, anomalous) == pytest.approx(base, rel=1e-4)
    assert separation(scores ** 0.5 / 100, anomalous) == pytest.approx(base, rel=1e-4)
    raw = lambda s: (s[60:].mean() - s[:60].mean()) / s[:60].std(ddof=1)  # noqa: E731 - the raw scale moves
    assert abs(raw(7.0 * scores ** 2) / raw(scores) - 1) > 0.2
    assert base > 1 and separation(-scores, anomalous) < 0  # scores <= 0: measured as they are


def test_auroc_standard_error_and_the_tie_it_makes():
    from training.calibrate import auroc_standard_error, choose_best

    # Hanley & McNeil's example: AUROC 0.8 on 50 + 50 images has SE ~0.044
    assert auroc_standard_error(0.8, 50, 50) == pytest.approx(0.0447, abs=5e-4)
    assert auroc_standard_error(1.0, 30, 30) == 0.0
    assert auroc_standard_error(0.85, 25, 95) > auroc_standard_error(0.85, 250, 950)
    aurocs, seps = {"a": 0.86, "b": 0.83}, {"a": 1.0, "b": 2.0}
    assert choose_best(aurocs, seps, 25, 95).chosen == "b"  # 0.03 apart is noise at 25 defects
    assert choose_best(aurocs, seps, 2500, 9500).chosen == "a"  # and a real difference at 2,500


def test_aggregate_tie_goes_to_the_widest_separation_not_the_list_order():
    rng = np.random.default_rng(0)
    good = 1.0 + 0.01 * rng.standard_normal((40, 8, 8)).astype(np.float32)
    bad = 1.0 + 0.01 * rng.standard_normal((20, 8, 8)).astype(np.float32)
    bad[:, 3, 3] += 1.0  # one bright cell: every aggregate separates, max by far the most
    maps, anomalous = np.concatenate([good, bad]), np.array([0] * 40 + [1] * 20, bool)
    choice = choose_aggregate(maps, anomalous, ("mean", "max"))
    assert choice.auroc == {"mean": 1.0, "max": 1.0}
    assert choice.chosen == "max"
    # the same shape of defect, but good parts with a stray hot cell each: the max of a good part
    # is now noisy, the mean is not, and the mean wins although it comes first either way
    good[np.arange(40), rng.integers(0, 8, 40), rng.integers(0, 8, 40)] += rng.uniform(0, 0.9, 40)
    bad += 0.5
    maps = np.concatenate([good, bad])
    choice = choose_aggregate(maps, anomalous, ("max", "mean"))
    assert choice.auroc["mean"] == 1.0 and choice.chosen == "mean"


def test_blurred_aggregate_matches_opencv_and_quiets_a_lone_cell():
    from edge.decision import aggregate_maps, split_blur

    maps = np.zeros((2, 16, 16), np.float32)
    maps[0, 5, 5] = 1.0  # a lone hot cell
    maps[1, 4:7, 4:7] = 1.0  # a 3x3 defect of the same peak
    raw, blurred = aggregate_maps(maps, "max"), aggregate_maps(maps, "max+blur:1")
    assert raw.tolist() == [1.0, 1.0]
    expected = [cv2.GaussianBlur(m, (0, 0), 1.0, borderType=cv2.BORDER_REFLECT).max() for m in maps]
    assert blurred == pytest.approx(expected)
    assert blurred[0] < 0.5 * blurred[1]  # the blur tells the defect from the lone cell
    assert split_blur("topk:1+blur:2.5") == ("topk:1", 2.5)
    for bad in ("max+blur:0", "max+blur:x", "max+blur:-1", "nope+blur:1"):
        with pytest.raises(ValueError, match="aggregate"):
            aggregate_maps(maps, bad)


@pytest.mark.pillqc
def test_auto_aggregate_never_looks_at_the_test_set(small_runs, tmp_path):
    """Re-evaluate a run with its test set replaced by noise images with shuffled labels: the
    test metrics change, the calibration (aggregate choice, its AUROCs, threshold, ranges)
    does not change at all."""
    import json
    import shutil

    import cv2

    from training.train import evaluate

    run = tmp_path / "run"
    shutil.copytree(small_runs("padim"), run)
    before = evaluate(run, aggregate="auto", report=False)
    split = json.loads((run / "split.json").read_text())
    rng = np.random.default_rng(0)
    noise = tmp_path / "noise"
    noise.mkdir()
    classes = [c for _, c in split["test"]]
    rng.shuffle(classes)
    for i, cls in enumerate(classes):
        cv2.imwrite(str(noise / f"{i}.png"), rng.integers(0, 256, (80, 80, 3), dtype=np.uint8))
    split["test"] = [[str(noise / f"{i}.png"), cls] for i, cls in enumerate(classes)]
    (run / "split.json").write_text(json.dumps(split))
    after = evaluate(run, aggregate="auto", report=False)
    assert after["calibration"] == before["calibration"]
    assert after["calibration"]["aggregate_requested"] == "auto"
    assert after["test"]["auroc"] != before["test"]["auroc"]
    assert after["test"]["aggregate_auroc"] != before["test"]["aggregate_auroc"]


@pytest.mark.parametrize("kwargs, message", [
    ({"aggregate": "median"}, "--aggregate 'median'"),
    ({"threshold": "fpr:2"}, "youden, f1, fpr:RATE .* or cost:C@P"),
    ({"model": "padim", "epochs": 5}, "--epochs applies to fcdd only"),
    ({"model": "fcdd", "coreset_ratio": 0.2}, "--coreset-ratio applies to patchcore only"),
    ({"model": "svdd"}, "use one of padim, fcdd, patchcore"),
])
def test_bad_training_choices_fail_before_any_work(tmp_path, kwargs, message):
    from training.train import train

    with pytest.raises(ValueError, match=message):
        train(tmp_path / "no-such-data", tmp_path / "run", **kwargs)
    assert not (tmp_path / "run").exists()  # nothing was written


def test_threshold_placement_study_brackets_the_youden_midpoint(tmp_path):
    """benchmarks.threshold_placement: the Youden gap of the hand case above, its "mid" is the
    threshold training uses, and the study reads a run's predictions.csv."""
    import csv

    from benchmarks.threshold_placement import place, study, youden_gap

    assert youden_gap(HAND_SCORES, HAND_ANOMALOUS) == (0.6, pytest.approx(0.7))
    hand = place(HAND_SCORES, HAND_ANOMALOUS)  # 4 of each: binormal cannot fit, training's fallback
    assert hand["binormal"] == hand["mid"] == pytest.approx(0.65)
    scores, anomalous = _spread_defects()
    low, high = youden_gap(scores, anomalous)
    placed = place(scores, anomalous)
    assert low < placed["low"] < placed["mid"] < placed["high"] == pytest.approx(high)
    assert placed["mid"] == pytest.approx(youden_threshold(scores, anomalous))
    assert placed["binormal"] == pytest.approx(binormal_fit(scores, anomalous).threshold)
    rng = np.random.default_rng(1)
    run = tmp_path / "padim-seed0"
    run.mkdir()
    with open(run / "predictions.csv", "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["set", "path", "class", "score", "decision"])
        for which, n in (("calibration", 20), ("test", 40)):
            for cls, centre in (("normal", 5.0), ("dirt", 8.0)):  # positive, as Box-Cox needs
                for i in range(n):
                    out.writerow([which, f"{cls}{i}.png", cls, rng.normal(centre), ""])
    result = study(run, splits=20)
    assert result["calibration_anomalous_fraction"] == 0.5
    for kind in ("calibration_cv_accuracy", "test_accuracy"):
        assert set(result[kind]) == {"low", "mid", "high", "binormal"}
        assert all(0.8 < v <= 1.0 for v in result[kind].values())  # two well separated classes
